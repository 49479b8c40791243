"""HBONE's TLS contexts, one per workload identity and side, rebuilt when its certificate rotates."""
from __future__ import annotations

import ssl

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import client_context, server_context


class TlsContextCache:
    """HBONE TLS contexts per workload identity, rebuilt when its certificate rotates.

    Building a context loads a key and a certificate from disk; doing that per
    connection would cost more than the handshake. The serial of the store's
    current certificate is part of the key, so a rotation is picked up by the
    next connection. Asking may wait for the CA when the identity has no
    usable certificate yet (a pod's very first connection).
    """

    def __init__(self, store: CertificateStore) -> None:
        self._store = store
        self._contexts: dict[tuple[bool, SpiffeId], tuple[int, ssl.SSLContext]] = {}
        store.subscribe(self._on_certificate)

    def _on_certificate(self, identity: SpiffeId, cert: object) -> None:
        """An identity's certificate was removed (its last pod left): its contexts go
        with it, or pod churn would keep one context per departed service account."""
        if cert is None:
            self._contexts.pop((True, identity), None)
            self._contexts.pop((False, identity), None)

    def __len__(self) -> int:
        return len(self._contexts)

    @property
    def trust_domain(self) -> str:
        return self._store.trust_domain

    async def server(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(True, identity))[1]

    async def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(False, identity))[1]

    async def client_with_serial(self, identity: SpiffeId) -> tuple[int, ssl.SSLContext]:
        """The client context and the serial of the certificate it presents
        (the pool retires connections made with a certificate since replaced)."""
        return await self._get(False, identity)

    async def _get(self, server_side: bool, identity: SpiffeId) -> tuple[int, ssl.SSLContext]:
        serial = (await self._store.certificate(identity)).serial
        cached = self._contexts.get((server_side, identity))
        if cached is not None and cached[0] == serial:
            return cached
        make = server_context if server_side else client_context
        made = (serial, make(self._store, identity))
        self._contexts[(server_side, identity)] = made
        return made
