"""mapped_buffer: the HBONE receive and scratch buffers live in anonymous mappings
of their own (not glibc's heap), zeroed, writable, and resident only where written."""
from __future__ import annotations

import ctypes
import mmap

from ambit.agent.proxy.hbone.buffers import ScratchBuffers, mapped_buffer

SIZE = 256 * 1024


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _mapping(address: int) -> tuple[int, int, str, int]:
    """(start, end, name, Rss KiB) of the mapping in /proc/self/smaps that holds `address`."""
    found: tuple[int, int, str] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(part, 16) for part in head[0].split("-"))
                found = (start, end, head[5] if len(head) > 5 else "") if start <= address < end else None
            elif found and head[0] == "Rss:":
                return (*found, int(head[1]))
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_mapped_buffer_is_zeroed_writable_and_its_own_private_mapping() -> None:
    buffer = mapped_buffer(SIZE)
    assert len(buffer) == SIZE and buffer[:] == bytes(SIZE)
    buffer[10:13] = b"abc"
    buffer[0:3] = buffer[10:13]  # the moves the receive buffer makes
    view = memoryview(buffer)
    assert bytes(view.toreadonly()[0:3]) == b"abc" and view.toreadonly().readonly
    start, end, name, _ = _mapping(_address(buffer))
    assert name != "[heap]" and end - start >= SIZE
    view.release()


def test_only_written_pages_of_a_mapped_buffer_are_resident() -> None:
    # The kernel may merge the mapping with anonymous neighbours: compare its Rss before and after.
    buffer = mapped_buffer(SIZE)
    address = _address(buffer)
    *_, untouched = _mapping(address)
    buffer[0:1] = b"x"
    *_, one_page = _mapping(address)
    buffer[:] = b"y" * SIZE
    *_, all_pages = _mapping(address)
    assert one_page - untouched < SIZE // 1024 // 4, f"writing one byte made {one_page - untouched} KiB resident"
    assert all_pages - untouched >= SIZE // 1024 - 8


def test_scratch_buffers_are_mapped_once_and_shared() -> None:
    scratch = ScratchBuffers()
    tls, tcp = scratch.tls, scratch.tcp
    assert scratch.tls is tls and scratch.tcp is tcp
    assert len(tls) == SIZE and not tls.readonly
    assert isinstance(tls.obj, mmap.mmap) and isinstance(tcp.obj, mmap.mmap)
