"""HBONE: TCP tunnels as HTTP/2 CONNECT streams over mutual TLS (docs/hbone.md).

Sans-I/O core, shaped like h2 (bytes in, events and bytes out, no sockets):
  settings.py   tunables and abuse limits of one connection
  events.py     what the core reports
  connect.py    what a CONNECT request and its answer may look like
  frames.py     the framing the core does itself (DATA, WINDOW_UPDATE)
  stream.py     per-stream bookkeeping beside h2's
  connection.py what both sides share: parsing, flow control, teardown
  h2_events.py  what the core does with the events h2 reports (part of connection.py's class)
  client.py, server.py   the two sides
On asyncio:
  protocol.py   one mTLS connection driving one core
  tunnel.py     one stream spliced to one TCP socket
  outcomes.py   how tunnels end, why they could not open
  buffers.py, tls_contexts.py   memory and TLS contexts shared by a pool or an inbound
"""
