"""Socket helpers the relay and the HBONE tunnels share: closing with a reset, naming an error."""
from __future__ import annotations

import errno
import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_socket(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead; close() is all that is left
    sock.close()


def errno_name(exc: BaseException) -> str:
    """ECONNRESET and the like for an OSError, else the exception's type (logs, access log, metrics)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__
