"""ambit-cni: the chained CNI plugin.

It runs after the primary plugin (bridge, ptp, Calico, ...), passes its result
through untouched and asks the node agent, over gRPC on a Unix socket, to enrol
or release the pod. It never touches the kernel itself and imports only the
standard library and protobuf, because the runtime starts it once per pod per
command, often twenty at a time when a node boots.
"""
