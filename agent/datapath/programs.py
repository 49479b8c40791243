"""ambit's tc programs and the maps they share: what the program set is,
where it is pinned, and the agent's handle on it (file descriptors only).

No compiler in the agent: bcc (with LLVM and clang, ~85 MB mapped and a
compiler heap that stays dirty) runs in a short-lived child process,
`python -m ambit.agent.datapath.loader`, which compiles bpf/*.c for the
running kernel, has the kernel verify and load the programs, pins them and
exits. The agent opens the pins (bpfsys, libbpf) and attaches programs by
fd with pyroute2.

Pins, one bpffs directory per agent (pin_dir):

    proxy_link, local_pods, verdict_counts   the maps (BPF_TABLE_PINNED): created
                                             once, re-adopted by every later set
    programs-<set id>/<program>              one loaded program set; the id is a
                                             hash of the sources and the defines

A start whose set is already pinned opens it and compiles nothing. A new
set is pinned by the loader into a scratch directory that is renamed into
place once complete, so a set directory is never half there; the agent
then points every ambit filter at it (tc replace: one netlink call per
hook, no moment without a filter) and unpins the older sets, whose
programs the kernel frees with their last filter. Filters keep programs
alive either way, so capture (and fail-closed dropping) goes on while no
agent runs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import ipaddress
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import bpfsys, constants
from .errors import require_backend

log = structlog.get_logger(__name__)

# bpf/ sits at the top of the repository, next to agent/.
BPF_SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER_FILE = "ambit.h"
PROGRAM_FILES = ("capture_outbound.c", "capture_inbound.c", "proxy_ingress.c")
PROGRAM_NAMES = ("capture_outbound", "capture_inbound", "proxy_ingress")
MAP_NAMES = ("proxy_link", "local_pods", "verdict_counts")
MAX_LOCAL_PODS = 1024
BPFFS_MOUNT = "/sys/fs/bpf"
SET_DIR_PREFIX = "programs-"
SCRATCH_PREFIX = "loading-"  # bpffs refuses names with a dot
LOADER_MODULE = "ambit.agent.datapath.loader"
LOADER_TIMEOUT = 300.0  # seconds; a compile takes ~1-2 s, more on a loaded node

VERDICTS = constants.VERDICTS  # index order of the verdict_counts map

# The C structs of bpf/ambit.h as the maps hold them (native byte order,
# addresses in network order): packed and unpacked here only.
PROXY_LINK_VALUE = struct.Struct("=I6s2x")   # struct proxy_link
LOCAL_POD_VALUE = struct.Struct("=II")       # struct local_pod
U32_KEY = struct.Struct("=I")
COUNTER = struct.Struct("=Q")


class ProgramLoadFailed(RuntimeError):
    """The loader could not compile, load or pin the program set."""


def verdict_counts_of(bpf_map: bpfsys.BpfMap) -> dict[str, int]:
    """Packets per verdict held by a verdict_counts map (summed over CPUs);
    also read from the pin by tests that watch the datapath from outside."""
    return {name: sum(COUNTER.unpack(v)[0] for v in bpf_map.per_cpu_values(U32_KEY.pack(i)))
            for i, name in enumerate(VERDICTS)}


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
        f"-DNODE_LINK_ADDR={int(ipaddress.IPv4Address(constants.NODE_LINK_ADDR)):#x}",
        f"-DMETRICS_PORT={constants.METRICS_PORT}",
        f"-DREADINESS_PORT={constants.READINESS_PORT}",
        f"-DMAX_LOCAL_PODS={MAX_LOCAL_PODS}",
        f"-DVERDICT_SLOTS={constants.VERDICT_SLOTS}",
    ]
    flags += [f"-DVERDICT_{name.upper()}={i}" for i, name in enumerate(VERDICTS)]
    return flags


@dataclass(frozen=True)
class ProgramSet:
    """The sources and defines of one compile, and where its programs are pinned.

    The text is ambit.h followed by the program files, compiled as one unit:
    bcc rewrites map accesses (map.lookup()) only in its main file, and the
    header's include guard turns each file's #include into a no-op."""

    pin_dir: str
    source_dir: Path
    text: str
    flags: tuple[str, ...]

    @classmethod
    def read(cls, pin_dir: str, source_dir: Path = BPF_SOURCE_DIR) -> ProgramSet:
        text = "\n".join((source_dir / f).read_text() for f in (HEADER_FILE, *PROGRAM_FILES))
        return cls(pin_dir, source_dir, text, (f"-I{source_dir}", *cflags(pin_dir)))

    @property
    def set_id(self) -> str:
        digest = hashlib.sha256(self.text.encode())
        digest.update(b"\0".join(f.encode() for f in self.flags if not f.startswith("-I")))
        return digest.hexdigest()[:16]

    @property
    def directory(self) -> str:
        return os.path.join(self.pin_dir, SET_DIR_PREFIX + self.set_id)

    def program_pin(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def pinned(self) -> bool:
        return all(os.path.exists(self.program_pin(name)) for name in PROGRAM_NAMES)


def ipv4_key(ip: ipaddress.IPv4Address) -> bytes:
    """A local_pods key: the address in network byte order (__be32)."""
    return ip.packed


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


def remove_tree(path: str) -> None:
    """Unpin everything under a set (or scratch) directory and remove it."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def remove_program_sets(pin_dir: str, keep: str | None = None) -> list[str]:
    """Unpin every program set (and loader scratch) directory but `keep`;
    returns the names removed."""
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        path = os.path.join(pin_dir, name)
        if name.startswith((SET_DIR_PREFIX, SCRATCH_PREFIX)) and path != keep:
            remove_tree(path)
            removed.append(name)
    return removed


def drop_resized_counters(pin_dir: str) -> None:
    """Unpin a verdict_counts of another size than the programs declare (an
    older agent's): BPF_TABLE_PINNED would re-adopt it silently, without the
    slots of new verdicts. Counters are all it loses."""
    path = os.path.join(pin_dir, "verdict_counts")
    if not os.path.exists(path):
        return
    counters = bpfsys.BpfMap.open_pinned(path)
    try:
        slots = counters.info.max_entries
    finally:
        counters.close()
    if slots != constants.VERDICT_SLOTS:
        os.unlink(path)
        log.info("bpf_map_resized", map="verdict_counts", pinned=slots, now=constants.VERDICT_SLOTS)


def remove_pins(pin_dir: str) -> None:
    """Unpin the maps and every program set (the kernel frees each object
    with its last user) and remove the directory if it is then empty.
    Missing pins are not an error."""
    remove_program_sets(pin_dir)
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


def run_loader(program_set: ProgramSet) -> float:
    """Compile, load and pin the set in a child process (loader.py); returns
    its seconds. The child is exec'd at once (no Python code of the agent
    runs in it), so it shares nothing with the agent's event loop."""
    argv = [sys.executable, "-m", LOADER_MODULE, "--pin-dir", program_set.pin_dir,
            "--source-dir", str(program_set.source_dir)]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=LOADER_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ProgramLoadFailed(f"the eBPF loader did not finish in {LOADER_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        raise ProgramLoadFailed(f"the eBPF loader failed (exit {done.returncode}): {done.stderr.strip()[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("set") != program_set.set_id or not program_set.pinned():
        raise ProgramLoadFailed(f"the eBPF loader pinned set {result.get('set')}, expected {program_set.set_id}")
    return time.monotonic() - started


class Programs:
    """One agent's pinned programs and maps, held by file descriptor."""

    def __init__(self, program_set: ProgramSet, compiled: bool) -> None:
        self.program_set = program_set
        self.pin_dir = program_set.pin_dir
        self.compiled = compiled  # False: the pinned set was reused as it was
        self._fds: list[int] = []
        self._maps: list[bpfsys.BpfMap] = []
        try:
            self.capture_outbound, self.capture_inbound, self.proxy_ingress = (
                self._program(name) for name in PROGRAM_NAMES)
            self._proxy_link = self._map("proxy_link", PROXY_LINK_VALUE.size)
            self._local_pods = self._map("local_pods", LOCAL_POD_VALUE.size)
            self._verdict_counts = self._map("verdict_counts", COUNTER.size)
        except BaseException:
            self.close()
            raise

    def _program(self, name: str) -> TcProgram:
        fd = bpfsys.obj_get(self.program_set.program_pin(name))
        self._fds.append(fd)
        info = bpfsys.prog_info(fd)
        if info.type != bpfsys.PROG_TYPE_SCHED_CLS:
            raise ProgramLoadFailed(f"{self.program_set.program_pin(name)} is not a tc program (type {info.type})")
        return TcProgram(name=name, fd=fd)

    def _map(self, name: str, value_size: int) -> bpfsys.BpfMap:
        bpf_map = bpfsys.BpfMap.open_pinned(os.path.join(self.pin_dir, name))
        self._maps.append(bpf_map)
        if bpf_map.info.value_size != value_size:
            raise ProgramLoadFailed(f"pinned map {name} holds {bpf_map.info.value_size}-byte values, "
                                    f"ambit's are {value_size}: remove the pins (ambit-agent --cleanup)")
        return bpf_map

    @classmethod
    def open(cls, pin_dir: str, source_dir: Path = BPF_SOURCE_DIR) -> Programs:
        """The set of the current sources, loaded by the child process unless
        it is pinned already; maps are created or re-adopted on the way."""
        require_backend("ebpf")
        ensure_bpffs(pin_dir)
        program_set = ProgramSet.read(pin_dir, source_dir)
        compiled = not program_set.pinned()
        seconds = 0.0
        if compiled:
            remove_tree(program_set.directory)  # a partial set (someone unpinned a program)
            drop_resized_counters(pin_dir)
            seconds = run_loader(program_set)
        programs = cls(program_set, compiled)
        log.info("bpf_programs_loaded" if compiled else "bpf_programs_reused", pin_dir=pin_dir,
                 program_set=program_set.set_id, seconds=round(seconds, 3))
        return programs

    def remove_other_sets(self) -> list[str]:
        """Unpin every set but this one (call once no filter uses them)."""
        return remove_program_sets(self.pin_dir, keep=self.program_set.directory)

    # proxy_link ---------------------------------------------------------
    def set_proxy_link(self, link: ProxyLink) -> None:
        value = PROXY_LINK_VALUE.pack(link.node_ifindex, bytes.fromhex(link.proxy_mac.replace(":", "")))
        self._proxy_link.update(U32_KEY.pack(0), value)

    def proxy_link(self) -> ProxyLink | None:
        value = self._proxy_link.lookup(U32_KEY.pack(0))
        if value is None:
            return None
        node_ifindex, mac = PROXY_LINK_VALUE.unpack(value)
        if node_ifindex == 0:
            return None
        return ProxyLink(node_ifindex=node_ifindex, proxy_mac=":".join(f"{b:02x}" for b in mac))

    def clear_proxy_link(self) -> None:
        self._proxy_link.update(U32_KEY.pack(0), bytes(PROXY_LINK_VALUE.size))

    # local_pods ---------------------------------------------------------
    def add_local_pod(self, ip: ipaddress.IPv4Address, host_ifindex: int) -> None:
        self._local_pods.update(ipv4_key(ip), LOCAL_POD_VALUE.pack(host_ifindex, 0))

    def remove_local_pod(self, ip: ipaddress.IPv4Address) -> None:
        self._local_pods.delete(ipv4_key(ip))

    def local_pod(self, ip: ipaddress.IPv4Address) -> int | None:
        """The host veth ifindex the map holds for one address, if any."""
        value = self._local_pods.lookup(ipv4_key(ip))
        return None if value is None else LOCAL_POD_VALUE.unpack(value)[0]

    def local_pods(self) -> dict[ipaddress.IPv4Address, int]:
        """Pod IP -> host veth ifindex, as the kernel map holds it."""
        found = {}
        for key in self._local_pods.keys():
            value = self._local_pods.lookup(key)
            if value is not None:  # deleted meanwhile
                found[ipaddress.IPv4Address(key)] = LOCAL_POD_VALUE.unpack(value)[0]
        return found

    # verdict_counts -----------------------------------------------------
    def verdict_counts(self) -> dict[str, int]:
        """Packets per verdict since the map was created (summed over CPUs)."""
        return verdict_counts_of(self._verdict_counts)

    def close(self) -> None:
        """Drop this process's descriptors; pins and attached programs stay
        in the kernel."""
        for bpf_map in self._maps:
            bpf_map.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []
