"""The hand-over protocol's messages, as pure data (docs/lifecycle.md).

One message per SOCK_SEQPACKET record, a JSON object with a "type"; the
listening sockets travel as SCM_RIGHTS with the `frozen` message, in the
order its `sockets` names them. The successor speaks first:

    successor -> hello     serving agent -> welcome | refuse
    successor -> api-taken serving agent -> frozen (+ descriptors)
    successor -> ready     serving agent -> draining
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

MAX_MESSAGE = 16 * 1024
PROTOCOL = 1


class HandoverProtocolError(Exception):
    """A message that is not part of the protocol (or not at this step)."""


@dataclass(frozen=True)
class NodeSettings:
    """What two agents must agree on to serve the same node's pods."""

    node: str
    socket: str
    state_dir: str
    proxy_netns: str
    bpffs_dir: str
    capture: str
    netns_inode: int  # the network namespace the agent runs in (st_ino of /proc/self/ns/net)

    @classmethod
    def of_this_process(cls, node: str, socket: str, state_dir: str, proxy_netns: str, bpffs_dir: str,
                        capture: str) -> "NodeSettings":
        return cls(node=node, socket=os.path.abspath(socket), state_dir=os.path.abspath(state_dir),
                   proxy_netns=proxy_netns, bpffs_dir=os.path.abspath(bpffs_dir), capture=capture,
                   netns_inode=os.stat("/proc/self/ns/net").st_ino)

    def mismatch(self, successor: "NodeSettings") -> str | None:
        """Why `successor` may not take this agent's place, or None."""
        if successor.netns_inode != self.netns_inode:
            return ("the successor runs in another network namespace: it cannot see this node's pods "
                    "(a second agent started by mistake?)")
        for name in ("node", "socket", "state_dir", "proxy_netns", "bpffs_dir", "capture"):
            mine, theirs = getattr(self, name), getattr(successor, name)
            if mine != theirs:
                return f"the successor's {name.replace('_', ' ')} is {theirs!r}, this agent's is {mine!r}"
        return None


@dataclass(frozen=True)
class Hello:
    type: ClassVar[str] = "hello"
    pid: int
    version: str
    settings: NodeSettings
    protocol: int = PROTOCOL


@dataclass(frozen=True)
class Welcome:
    type: ClassVar[str] = "welcome"
    pid: int
    version: str


@dataclass(frozen=True)
class Refuse:
    type: ClassVar[str] = "refuse"
    reason: str


@dataclass(frozen=True)
class ApiTaken:
    """The successor's API socket now answers at the agent socket path."""

    type: ClassVar[str] = "api-taken"


@dataclass(frozen=True)
class Frozen:
    """The serving agent changes no record any more; its listening sockets
    come with this message, named in `sockets`."""

    type: ClassVar[str] = "frozen"
    sockets: tuple[str, ...]


@dataclass(frozen=True)
class Ready:
    """The successor serves the node: the old agent may stop accepting."""

    type: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Draining:
    type: ClassVar[str] = "draining"
    connections: int


Message = Hello | Welcome | Refuse | ApiTaken | Frozen | Ready | Draining
_TYPES: dict[str, type] = {cls.type: cls for cls in (Hello, Welcome, Refuse, ApiTaken, Frozen, Ready, Draining)}


def encode(message: Message) -> bytes:
    return json.dumps({"type": message.type, **asdict(message)}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """One message; HandoverProtocolError for anything else."""
    if not data:
        raise HandoverProtocolError("connection closed")
    if len(data) > MAX_MESSAGE:
        raise HandoverProtocolError(f"message of {len(data)} bytes")
    try:
        raw = json.loads(data)
        cls = _TYPES[raw.pop("type")]
        values: dict[str, Any] = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if cls is Hello:
            values["settings"] = NodeSettings(**values["settings"])
        if cls is Frozen:
            values["sockets"] = tuple(values["sockets"])
        return cls(**values)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HandoverProtocolError(f"not a hand-over message: {exc!r}") from None


def expect(message: Message, *kinds: type) -> Message:
    if not isinstance(message, kinds):
        names = " or ".join(k.type for k in kinds)  # type: ignore[attr-defined]
        raise HandoverProtocolError(f"expected {names}, got {message.type}")
    return message
