"""libnftables (Debian's python3-nftables) bound to one network namespace.

A libnftables context opens its netlink socket when it is created, in the
namespace of the creating thread, and keeps it: so the context is made on a
throwaway thread that entered the namespace (agent/netns.py, no fork) and
then used from any thread. One command list is one kernel transaction:
all of it applies or none does. Contexts are not thread-safe, hence the lock.

A command list made only of element creates and deletes on sets whose
types the session was given goes to the kernel as one nfnetlink batch
instead (agent/datapath/nft_netlink.py: same transaction, no cache
refresh); when that cannot be decided (an element it cannot spell, no
answer), libnftables runs the same list.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any

import structlog

from ..netns import run_in_netns
from .errors import require_backend
from .nft_netlink import ElementBatcher, ElementTypes, element_changes

log = structlog.get_logger(__name__)


class NftError(RuntimeError):
    """A rejected transaction, with the kernel's errno when libnftables named it."""

    def __init__(self, message: str, commands: list[dict[str, Any]], code: int | None = None) -> None:
        super().__init__(message)
        self.commands = commands
        self.errno = code if code is not None else _errno_of(message)


def _errno_of(message: str) -> int | None:
    # libnftables reports kernel refusals as "Could not process rule: <strerror>".
    for code in (errno.ENOENT, errno.EEXIST, errno.EBUSY, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        if os.strerror(code) in message:
            return code
    return None


def _new_context() -> Any:
    require_backend("nftables")
    import nftables  # Debian's python3-nftables (system site packages)

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


class NftSession:
    """libnftables in one namespace (None: the caller's).

    Changes and reads go through two contexts. A listing leaves libnftables'
    cache holding everything it printed (`list counters` fills all of it:
    every set's elements and every rule), and the next command on that
    context frees it first: on a shared context each enrol or release after
    a metrics scrape paid O(pods) for it (0.2 ms at 100 pods, 2.7 ms at
    1000). The changes' context only ever caches tables, chains and sets."""

    def __init__(self, netns: str | None = None, element_types: ElementTypes | None = None) -> None:
        """element_types: (family, set name) -> (key type, data type) of the
        sets whose element creates and deletes may bypass libnftables
        (nft_ruleset.element_types)."""
        self.netns = netns
        self._nft: Any | None = run_in_netns(netns, _new_context)
        self._reader: Any | None = None  # made on the first read
        self._element_types = element_types or {}
        self._batcher: ElementBatcher | None = None  # made on the first batch
        self.batched = 0  # transactions applied as a batch (tests read it)
        self._closed = False
        self._lock = threading.Lock()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply commands as one transaction; returns the objects of the
        answer (empty for changes)."""
        return self._call(commands, read=False)

    def read(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """List something (on the reading context); returns the objects of the answer."""
        return self._call(commands, read=True)

    def _call(self, commands: list[dict[str, Any]], *, read: bool) -> list[dict[str, Any]]:
        if not commands:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("nftables session is closed")
            if read and self._reader is None:
                self._reader = run_in_netns(self.netns, _new_context)
            if not read and self._element_types and self._batch(commands):
                return []
            nft = self._reader if read else self._nft
            rc, output, error = nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(" ".join(str(error).split()), commands)
        if not output:
            return []
        return [obj for obj in output.get("nftables", []) if "metainfo" not in obj]

    def _batch(self, commands: list[dict[str, Any]]) -> bool:
        """Element creates and deletes as one batch (lock held): True when
        applied, NftError when the kernel refused them (nothing applied),
        False when libnftables must decide (not only creates and deletes of
        known sets, or no answer: a lost acknowledgement then makes
        libnftables see EEXIST or ENOENT, which callers already take for
        "some of it is there" or "some of it is gone")."""
        try:
            changes = element_changes(commands, self._element_types)
        except ValueError:  # Unencodable among them: libnftables decides
            return False
        try:
            if self._batcher is None:
                self._batcher = run_in_netns(self.netns, ElementBatcher)
            code = self._batcher.apply(changes)
        except (OSError, ValueError) as exc:
            log.warning("nftables batch without answer; libnftables retries it", netns=self.netns or "<own>",
                        error=str(exc))
            self._drop_batcher()
            return False
        if code:
            raise NftError(f"Could not process rule: {os.strerror(code)}", commands, code)
        self.batched += 1
        return True

    def ruleset(self) -> list[dict[str, Any]]:
        """`list ruleset` of the namespace (every family)."""
        return self.read([{"list": {"ruleset": None}}])

    def close(self) -> None:
        """Drop the context (its socket keeps the namespace alive)."""
        with self._lock:
            self._closed = True
            self._nft = self._reader = None
            self._drop_batcher()

    def _drop_batcher(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self._batcher = None

    def __enter__(self) -> NftSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
