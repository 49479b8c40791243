"""Cluster state for the node agent: workloads, services and policies.

Two sources fill one `ClusterState`: the Kubernetes API (list + watch with the
official client) or local YAML/JSON files of the same objects.
"""
