"""Cluster state for the node agent: workloads, services and policies.

Two sources fill one `ClusterState`: the Kubernetes API (list + watch with the
official client, kube.py) or local YAML/JSON files of the same objects (file_source.py).
model.py and policy_model.py parse the objects; the policy package decides with them.
"""
