"""Telemetry: Prometheus metrics (Istio names), access logs, readiness."""
