"""A filesystem view of one's own: a mount namespace with a private tmpfs, and joining it.

For the lab's CA: its key lives on a tmpfs mounted only inside its mount
namespace, so no other process of the machine (the agents, the waypoints,
the lab itself) has a file holding it; elsewhere the mount point is an
empty directory. Both calls need a single-threaded process (the kernel
refuses a new or another mount namespace to a thread of many): the holder
calls the first as it starts, `python -m ambit.lab.labca join` the second
before it execs the CA. Never from a preexec_fn: that forks the lab, whose
gRPC fork handlers can deadlock. Python 3.11 has no os.unshare/os.setns,
hence libc through ctypes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.unshare.argtypes = (ctypes.c_int,)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_tmpfs_namespace(mount_point: str, size: str = "4m") -> None:
    """Move the calling process into a new mount namespace where nothing it
    mounts propagates out, and mount a tmpfs (mode 0700) at `mount_point`."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _check(libc.mount(b"tmpfs", os.fsencode(mount_point), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      f"mode=0700,size={size}".encode()), f"mount tmpfs on {mount_point}")


def enter(namespaces: list[tuple[str, int]]) -> None:
    """Join each (namespace file, CLONE_NEW*) in order; every file is opened
    first, since joining a mount namespace changes what paths mean."""
    libc = _libc()
    fds = [(os.open(path, os.O_RDONLY | os.O_CLOEXEC), kind, path) for path, kind in namespaces]
    try:
        for fd, kind, path in fds:
            _check(libc.setns(fd, kind), f"setns({path})")
    finally:
        for fd, _, _ in fds:
            os.close(fd)
