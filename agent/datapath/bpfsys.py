"""The bpf(2) calls the long-running agent makes, through libbpf.so.1.

The agent holds pinned programs and maps by file descriptor and reads and
updates maps; it never compiles. libbpf is Debian's `libbpf1` (a dependency
of bcc's own package): loading it adds ~0.2 MB to the process, where
importing bcc maps LLVM and clang (~64 MB, measured). Only libbpf's
low-level wrappers are used (one syscall each); libbpf 1.x returns
-errno from them, turned into OSError here.
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

LIBBPF = "libbpf.so.1"
BPF_ANY = 0
BPF_OBJ_NAME_LEN = 16

# enum bpf_map_type / bpf_prog_type values ambit uses (uapi/linux/bpf.h)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
PROG_TYPE_SCHED_CLS = 3


class LibbpfUnavailable(OSError):
    """libbpf.so.1 cannot be loaded on this host."""


class _MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info; the kernel fills what fits.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info, up to its name.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


@cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as exc:
        raise LibbpfUnavailable(errno.ENOENT, f"{LIBBPF} not found (Debian: apt-get install libbpf1)") from exc
    vp, i, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
    for name, args in (("bpf_obj_get", [ctypes.c_char_p]), ("bpf_obj_pin", [i, ctypes.c_char_p]),
                       ("bpf_map_lookup_elem", [i, vp, vp]), ("bpf_map_update_elem", [i, vp, vp, ctypes.c_uint64]),
                       ("bpf_map_delete_elem", [i, vp]), ("bpf_map_get_next_key", [i, vp, vp]),
                       ("bpf_obj_get_info_by_fd", [i, vp, u32p]), ("libbpf_num_possible_cpus", [])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i
    return lib


def available() -> bool:
    try:
        _lib()
    except LibbpfUnavailable:
        return False
    return True


def _check(result: int, what: str) -> int:
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


def obj_get(path: str) -> int:
    """A new file descriptor for the object pinned at path."""
    return _check(_lib().bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


@cache
def possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return ProgInfo(info.type, info.id, info.name.decode())


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str

    @property
    def per_cpu(self) -> bool:
        return self.type == MAP_TYPE_PERCPU_ARRAY


class BpfMap:
    """One map by file descriptor: keys and values as bytes, laid out as the
    C structs are (the caller packs them; sizes are checked here)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"map info {path}")
        self.info = MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                            info.name.decode())
        # A per-CPU lookup returns one 8-byte-aligned slot per possible CPU.
        self._value_buffer_size = (((info.value_size + 7) & ~7) * possible_cpus() if self.info.per_cpu
                                   else info.value_size)

    @classmethod
    def open_pinned(cls, path: str) -> BpfMap:
        fd = obj_get(path)
        try:
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.info.key_size:
            raise ValueError(f"{self.info.name}: key of {len(key)} bytes, the map's are {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        """The value (for a per-CPU map: every CPU's slot, concatenated), or None."""
        value = ctypes.create_string_buffer(self._value_buffer_size)
        result = _lib().bpf_map_lookup_elem(self.fd, self._key(key), value)
        if result == -errno.ENOENT:
            return None
        _check(result, f"lookup in {self.info.name}")
        return value.raw

    def per_cpu_values(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key) or b""
        slot = (self.info.value_size + 7) & ~7
        return [raw[i:i + self.info.value_size] for i in range(0, len(raw), slot)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.info.value_size or self.info.per_cpu:
            raise ValueError(f"{self.info.name}: value of {len(value)} bytes, the map's are {self.info.value_size}")
        _check(_lib().bpf_map_update_elem(self.fd, self._key(key), ctypes.create_string_buffer(value, len(value)),
                                          flags), f"update in {self.info.name}")

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        result = _lib().bpf_map_delete_elem(self.fd, self._key(key))
        if result == -errno.ENOENT:
            return False
        _check(result, f"delete in {self.info.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        size = self.info.key_size
        current: ctypes.Array | None = None
        following = ctypes.create_string_buffer(size)
        while True:
            result = _lib().bpf_map_get_next_key(self.fd, current, following)
            if result == -errno.ENOENT:
                return
            _check(result, f"next key in {self.info.name}")
            key = following.raw
            yield key
            current = ctypes.create_string_buffer(key, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
