"""Workload keys made, and the CA's answers checked, in a short-lived child process.

`cryptography` maps ~9 MB into a process (its Rust extension carries its
own OpenSSL), and the node agent needs it only a few times per certificate
lifetime: to make a key and its CSR, and to check the chain the CA returns.
So a child does both and exits, the way the eBPF loader compiles in a
child: the agent holds PEM bytes and dates (`HeldCredentials`), which is all
`ssl` and the rotation need. One child per issuance, JSON lines over its
stdin/stdout: the CSR out, the CA's chain in, the verdict out. The key is
made in the child and reaches only the agent (through the pipe) and the
0600 key file, as before. Runs as `python -m ambit.agent.identity.credentials_child
SPIFFE-ID`; this module must not import `cryptography` at its top.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .istio_ca import BadCertificate, IssueError, IstioCaClient
from .spiffe import SpiffeId
from .validity import Clock, utc_now

CHILD_MODULE = __name__ if __name__ != "__main__" else "ambit.agent.identity.credentials_child"
CHILD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class HeldCredentials:
    """A checked certificate as the agent keeps it: PEM bytes and its dates, no X.509 objects."""

    spiffe_id: SpiffeId
    serial: int
    not_before: datetime
    not_after: datetime
    private_key_pem: bytes
    chain_pem: bytes  # leaf and intermediates: what a TLS endpoint presents
    root_pem: bytes
    issuer: str = ""


class ChildProcessCaIssuer:
    """An IstioCaIssuer (impersonating each identity, as a node agent does) whose
    key, CSR and chain check run in a child process."""

    def __init__(self, client: IstioCaClient, trust_domain: str, *, clock: Clock = utc_now) -> None:
        self.client = client
        self.trust_domain = trust_domain
        self.clock = clock
        self.description = client.description

    async def issue_new_key(self, identity: SpiffeId, ttl: timedelta) -> HeldCredentials:
        child = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", CHILD_MODULE, str(identity)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            first = await asyncio.to_thread(child.stdout.readline)
            if not first:  # it died before its CSR: say why
                _, err = await asyncio.to_thread(child.communicate, None, CHILD_TIMEOUT_S)
                raise IssueError(f"the credentials child failed: {_last_line(err, child)}")
            csr = _field(first, "csr")
            chain = await self.client.create_certificate(csr, int(ttl.total_seconds()), identity)
            request = json.dumps({"chain": chain, "now": self.clock().isoformat(), "issuer": self.description})
            try:
                out, err = await asyncio.to_thread(child.communicate, request + "\n", CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise IssueError(f"the credentials child did not answer in {CHILD_TIMEOUT_S:.0f} s") from None
            if not out:
                raise IssueError(f"the credentials child failed: {_last_line(err, child)}")
            answer = _answer(out)
            if "refused" in answer:
                raise BadCertificate(answer["refused"])
            return HeldCredentials(
                spiffe_id=identity, serial=int(answer["serial"]),
                not_before=datetime.fromisoformat(answer["not_before"]),
                not_after=datetime.fromisoformat(answer["not_after"]),
                private_key_pem=answer["private_key_pem"].encode("ascii"),
                chain_pem=answer["chain_pem"].encode("ascii"), root_pem=answer["root_pem"].encode("ascii"),
                issuer=self.description)
        finally:
            if child.poll() is None:
                child.kill()
            await asyncio.to_thread(child.wait)
            for pipe in (child.stdin, child.stdout, child.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()


def _last_line(stderr: str | None, child: subprocess.Popen[str]) -> str:
    lines = (stderr or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {child.returncode}"


def _answer(line: str) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise IssueError(f"the credentials child answered {line[:200]!r}")
    return answer


def _field(line: str, name: str) -> str:
    value = _answer(line).get(name)
    if not isinstance(value, str):
        raise IssueError(f"the credentials child sent no {name}")
    return value


def _write(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def child_main(identity_text: str) -> int:
    """In the child: make a key and its CSR, then check the chain the parent sends back."""
    from .csr import certificate_request, new_workload_key
    from .issuer import verified_chain

    identity = SpiffeId.parse(identity_text)
    key = new_workload_key()
    _write({"csr": certificate_request(identity, key)})
    request = json.loads(sys.stdin.readline())
    try:
        issued = verified_chain(identity, key, request["chain"], datetime.fromisoformat(request["now"]),
                                request["issuer"])
    except IssueError as exc:
        _write({"refused": str(exc)})
        return 0
    assert issued.root is not None  # verified_chain always ends at a root
    _write({"serial": str(issued.serial), "not_before": issued.not_before.isoformat(),
            "not_after": issued.not_after.isoformat(),
            "private_key_pem": issued.private_key_pem.decode("ascii"),
            "chain_pem": issued.chain_pem.decode("ascii"), "root_pem": issued.root_pem.decode("ascii")})
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
