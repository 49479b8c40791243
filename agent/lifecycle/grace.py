"""How long a stopping agent may drain: under the pod's termination grace
period, so it is done before the kubelet's SIGKILL."""
from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger(__name__)

KUBERNETES_DEFAULT_GRACE_S = 30
MARGIN_S = 5.0  # GOAWAY, resets, the access log and exit after the deadline
MIN_DRAIN_S = 1.0
READ_TIMEOUT_S = 5.0


def drain_seconds_for_grace(grace_s: float | None) -> float:
    """The drain deadline for a termination grace period (Kubernetes' default when unknown)."""
    grace = KUBERNETES_DEFAULT_GRACE_S if grace_s is None else grace_s
    return max(MIN_DRAIN_S, grace - MARGIN_S)


async def own_pod_grace(api_client: Any, namespace: str, name: str) -> int | None:
    """spec.terminationGracePeriodSeconds of the agent's own pod (the
    downward API does not offer it), or None when it cannot be read."""
    from kubernetes import client as k8s  # only with --discovery kube

    def read() -> int | None:
        pod = k8s.CoreV1Api(api_client).read_namespaced_pod(name, namespace, _request_timeout=READ_TIMEOUT_S)
        return pod.spec.termination_grace_period_seconds

    try:
        return await asyncio.wait_for(asyncio.to_thread(read), READ_TIMEOUT_S + 1)
    except Exception as exc:  # no permission, no API, a timeout: the default applies
        log.warning("cannot read the agent's own pod for its termination grace period", pod=f"{namespace}/{name}",
                    error=f"{type(exc).__name__}: {exc}")
        return None
