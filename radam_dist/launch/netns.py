"""Linux network namespaces for ``radam-dist launch --netns``: a task placed on a "host".

A named namespace (``ip netns add NAME``) is a file under /var/run/netns; ``setns(2)`` on it
moves the calling *thread* into that network. The launcher uses a short-lived thread to pick a
free port inside a task's namespace (so the port is free where the task will bind it), and
the task's supervisor enters the namespace before it starts the task. Standard library only:
the launcher and the supervisor must start in milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from typing import List

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)} "
                           "(entering a network namespace needs root / CAP_SYS_ADMIN)")


def namespace_path(name: str) -> str:
    """The file of the named namespace; a clear error when there is none."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a network namespace name: {name!r}")
    path = os.path.join(NETNS_DIR, name)
    if not os.path.exists(path):
        raise ValueError(f"no network namespace {name!r} ({path} does not exist; "
                         f"create it with `ip netns add {name}`)")
    return path


def enter(name: str) -> None:
    """Move the calling thread into namespace ``name`` (a process that has one thread, like
    the supervisor before it starts the task, moves as a whole)."""
    fd = os.open(namespace_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def free_ports_in(name: str, address: str, count: int) -> List[int]:
    """``count`` distinct free TCP ports on ``address`` inside namespace ``name``.

    Runs in a thread of its own that enters the namespace and ends, so the caller's thread
    stays where it is.
    """
    result: dict = {}

    def pick() -> None:
        try:
            enter(name)
            sockets = []
            try:
                for _ in range(count):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, 0))
                result["ports"] = [s.getsockname()[1] for s in sockets]
            finally:
                for sock in sockets:
                    sock.close()
        except BaseException as err:  # handed to the caller below
            result["error"] = err

    thread = threading.Thread(target=pick, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        err = result["error"]
        if isinstance(err, OSError) and err.errno == 99:  # EADDRNOTAVAIL
            raise ValueError(f"address {address} is not configured in network namespace "
                             f"{name!r}") from err
        raise err
    return result["ports"]
