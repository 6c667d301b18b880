"""Process helpers of the tests that start Ray heads of their own: free ports, and finding and killing exactly
the processes a test started (never anyone else's Ray)."""

from __future__ import annotations

import os
import signal
import socket

import psutil


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ours(markers: list[str]) -> list:
    """Live processes of this user whose command line names one of our unique paths (a head's temp dir, the
    test's tmp dir): the Ray processes and job drivers a test started, never anyone else's."""
    me = os.getuid()
    found = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or p.pid == os.getpid():
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in markers):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def kill_all(procs: list, sig=signal.SIGKILL) -> None:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=10)
