"""Compiling and loading ambit's tc programs, and the maps they share.

bcc compiles bpf/*.c once per agent start (the kernel is the one we run on,
so no prebuilt object has to match it). What is pinned: the maps only, under
one bpffs directory per agent (BPF_TABLE_PINNED creates or re-adopts them),
so a restarted agent sees the enrolled pods and the proxy link it left
behind. The programs are not pinned: the tc filters hold them, so capture
(and fail-closed dropping) keeps working while the agent is down, and a
restarted agent replaces them with its fresh compile.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import constants
from .errors import require_backend

log = structlog.get_logger(__name__)

# bpf/ sits at the top of the repository, next to agent/.
BPF_SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER_FILE = "ambit.h"
PROGRAM_FILES = ("capture_outbound.c", "capture_inbound.c", "proxy_ingress.c")
MAP_NAMES = ("proxy_link", "local_pods", "verdict_counts")
MAX_LOCAL_PODS = 1024
BPFFS_MOUNT = "/sys/fs/bpf"

# Index order of the verdict_counts map; passed to C as VERDICT_<NAME>.
VERDICTS = (
    "out_redirect", "out_pass_not_tcp4", "out_pass_to_node",
    "in_redirect", "in_pass_not_tcp4", "in_pass_from_node", "in_pass_from_proxy",
    "drop_no_proxy_link", "drop_rewrite_failed",
    "proxy_pass_not_tcp4", "proxy_pass_own_addr", "proxy_owned", "proxy_no_owner",
    "proxy_to_outbound", "proxy_to_inbound_plaintext", "proxy_to_hbone",
    "proxy_drop_malformed", "proxy_drop_no_listener", "proxy_drop_assign_failed",
)


@dataclass(frozen=True)
class TcProgram:
    """A loaded SCHED_CLS program: what tc needs to attach it."""

    name: str
    fd: int


@dataclass(frozen=True)
class ProxyLink:
    """Where captured packets go: ambit0 as the node sees it, eth0's MAC."""

    node_ifindex: int
    proxy_mac: str


def cflags(pin_dir: str) -> list[str]:
    """Every constant the C code uses, from constants.py (no second copy)."""
    flags = [
        f'-DAMBIT_PIN_DIR="{pin_dir}"',
        f"-DOUTBOUND_PORT={constants.OUTBOUND_PORT}",
        f"-DINBOUND_PLAINTEXT_PORT={constants.INBOUND_PLAINTEXT_PORT}",
        f"-DHBONE_PORT={constants.HBONE_PORT}",
        f"-DMARK_CAPTURED={constants.MARK_CAPTURED:#x}",
        f"-DPROXY_LINK_ADDR={int(ipaddress.IPv4Address(constants.PROXY_LINK_ADDR)):#x}",
        f"-DMAX_LOCAL_PODS={MAX_LOCAL_PODS}",
        f"-DVERDICT_COUNT={len(VERDICTS)}",
    ]
    flags += [f"-DVERDICT_{name.upper()}={i}" for i, name in enumerate(VERDICTS)]
    return flags


def ipv4_key(ip: ipaddress.IPv4Address) -> int:
    """A map key holding the address in network byte order (__be32)."""
    return ctypes.c_uint32.from_buffer_copy(ip.packed).value


def ipv4_from_key(key: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes(ctypes.c_uint32(key)))


def _bpffs_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "bpf"]


def ensure_bpffs(pin_dir: str) -> None:
    """Mount bpffs at /sys/fs/bpf if nothing under pin_dir is bpffs, then
    create pin_dir (bcc pins into an existing directory only)."""
    mounts = _bpffs_mounts()
    if not any(pin_dir == m or pin_dir.startswith(m.rstrip("/") + "/") for m in mounts):
        if not pin_dir.startswith(BPFFS_MOUNT + "/"):
            raise RuntimeError(f"pin directory {pin_dir} is not on a bpf filesystem")
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mount(b"bpffs", BPFFS_MOUNT.encode(), b"bpf", 0, b"mode=0700") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount bpffs at {BPFFS_MOUNT}: {os.strerror(err)}")
        log.info("bpffs_mounted", path=BPFFS_MOUNT)
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)


def remove_pins(pin_dir: str) -> None:
    """Unpin the maps (the kernel frees them with their last user) and remove
    the directory if it is then empty. Missing pins are not an error."""
    for name in MAP_NAMES:
        try:
            os.unlink(os.path.join(pin_dir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(pin_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("pin_dir_not_empty", pin_dir=pin_dir)


class Programs:
    """The compiled programs and the maps of one agent (one pin directory)."""

    def __init__(self, bpf: Any, pin_dir: str) -> None:
        from bcc import BPF  # bcc is only importable where it is installed

        self._bpf = bpf
        self.pin_dir = pin_dir
        self.capture_outbound = self._load(BPF, "capture_outbound")
        self.capture_inbound = self._load(BPF, "capture_inbound")
        self.proxy_ingress = self._load(BPF, "proxy_ingress")
        self._proxy_link = bpf[b"proxy_link"]
        self._local_pods = bpf[b"local_pods"]
        self._verdict_counts = bpf[b"verdict_counts"]

    def _load(self, bpf_cls: Any, name: str) -> TcProgram:
        fn = self._bpf.load_func(name.encode(), bpf_cls.SCHED_CLS)
        return TcProgram(name=name, fd=fn.fd)

    @classmethod
    def load(cls, pin_dir: str, source_dir: Path = BPF_SOURCE_DIR) -> Programs:
        """Compile bpf/*.c as one unit (one clang run) and load the three
        programs; creates or re-adopts the pinned maps.

        ambit.h is put in front of the text instead of being #included:
        bcc rewrites map accesses (map.lookup()) only in its main file.
        Its include guard then turns each file's #include into a no-op."""
        require_backend("ebpf")
        from bcc import BPF

        ensure_bpffs(pin_dir)
        text = "\n".join((source_dir / f).read_text() for f in (HEADER_FILE, *PROGRAM_FILES))
        started = time.monotonic()
        bpf = BPF(text=text.encode(), cflags=[f"-I{source_dir}", *cflags(pin_dir)])
        programs = cls(bpf, pin_dir)
        log.info("bpf_programs_loaded", pin_dir=pin_dir,
                 seconds=round(time.monotonic() - started, 3))
        return programs

    # proxy_link ---------------------------------------------------------
    def set_proxy_link(self, link: ProxyLink) -> None:
        value = self._proxy_link.Leaf()
        value.node_ifindex = link.node_ifindex
        for i, octet in enumerate(bytes.fromhex(link.proxy_mac.replace(":", ""))):
            value.proxy_mac[i] = octet
        self._proxy_link[ctypes.c_int(0)] = value

    def proxy_link(self) -> ProxyLink | None:
        value = self._proxy_link[ctypes.c_int(0)]
        if value.node_ifindex == 0:
            return None
        mac = ":".join(f"{b:02x}" for b in bytes(value.proxy_mac))
        return ProxyLink(node_ifindex=value.node_ifindex, proxy_mac=mac)

    def clear_proxy_link(self) -> None:
        self._proxy_link[ctypes.c_int(0)] = self._proxy_link.Leaf()

    # local_pods ---------------------------------------------------------
    def add_local_pod(self, ip: ipaddress.IPv4Address, host_ifindex: int) -> None:
        value = self._local_pods.Leaf()
        value.host_ifindex = host_ifindex
        value.flags = 0
        self._local_pods[self._local_pods.Key(ipv4_key(ip))] = value

    def remove_local_pod(self, ip: ipaddress.IPv4Address) -> None:
        try:
            del self._local_pods[self._local_pods.Key(ipv4_key(ip))]
        except KeyError:
            pass

    def local_pod(self, ip: ipaddress.IPv4Address) -> int | None:
        """The host veth ifindex the map holds for one address, if any."""
        value = self._local_pods.get(self._local_pods.Key(ipv4_key(ip)))
        return None if value is None else value.host_ifindex

    def local_pods(self) -> dict[ipaddress.IPv4Address, int]:
        """Pod IP -> host veth ifindex, as the kernel map holds it."""
        return {ipv4_from_key(k.value): v.host_ifindex for k, v in self._local_pods.items()}

    # verdict_counts -----------------------------------------------------
    def verdict_counts(self) -> dict[str, int]:
        """Packets per verdict since the map was created (summed over CPUs)."""
        return {name: int(self._verdict_counts.sum(ctypes.c_int(i)).value)
                for i, name in enumerate(VERDICTS)}

    def close(self) -> None:
        """Drop this process's handles; pinned maps and attached programs
        stay in the kernel."""
        self._bpf.cleanup()
