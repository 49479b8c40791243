"""The mesh's certificate authority as a tool (`ambit ca`)."""
