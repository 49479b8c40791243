"""Kernel datapath: proxy namespace, policy routing, tc eBPF capture on pod veths."""
