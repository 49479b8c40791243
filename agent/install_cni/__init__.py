"""install-cni: put ambit-cni on a node and chain it after the primary CNI.

`cniconf` decides what the CNI configuration directory should look like
(pure: file names and bytes in, file operations out); `installer` reads the
directories, applies those operations atomically, copies the plugin and keeps
watching while the primary CNI rewrites its own file. The DaemonSet runs
`ambit install-cni` once as an init container and `--watch` as a sidecar.
"""
