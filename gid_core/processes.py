"""Child processes on Linux: die with the parent, stop a whole process group, a free local port.

No torch import here: the launchers (``gid up``) import this without loading the engine.

Used by every launcher that starts long-lived children: the worker's training supervisor
(``worker.tasks``, ``worker.runner``) and the embedded stack (``gid up``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
KILL_WAIT_SECONDS = 10.0  # how long to wait for the leader to be reaped after SIGKILL
_POLL_SECONDS = 0.05


def die_with_parent(expected_parent: int | None = None, *, death_signal: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``death_signal`` to this process when its parent exits.

    ``expected_parent`` closes the race with a parent that died before the request took effect:
    if this process's parent is no longer that pid, it exits at once. Call it first thing in a
    child, or give it to ``subprocess.Popen`` as ``preexec_fn``, e.g.
    ``functools.partial(die_with_parent, os.getpid(), death_signal=signal.SIGTERM)``.
    A no-op outside Linux.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def kill_process_group(process: subprocess.Popen | int, *, grace_seconds: float) -> int | None:
    """Stop the process group that ``process`` leads (started with ``start_new_session=True``).

    SIGTERM the group, give the leader ``grace_seconds`` to exit, then SIGKILL the group: at once
    once the leader is gone (whatever it left behind, such as DDP ranks or a pool process), and in
    any case when the grace period is over. ``grace_seconds=0`` kills at once.

    ``process`` is a ``Popen`` of this process (the leader is reaped and its exit code returned,
    None if it did not exit in time) or the pid of a leader this process did not start (returns
    None; such a leader is not waited for after SIGKILL, only its parent can reap it).
    """
    pid = process.pid if isinstance(process, subprocess.Popen) else int(process)
    if grace_seconds > 0:
        _signal_group(pid, signal.SIGTERM)
        _wait_for_leader(process, grace_seconds)
    _signal_group(pid, signal.SIGKILL)
    if not isinstance(process, subprocess.Popen):
        return None
    _wait_for_leader(process, KILL_WAIT_SECONDS)
    return process.poll()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (macOS answers EPERM for a group of zombies)


def _wait_for_leader(process: subprocess.Popen | int, timeout: float) -> None:
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(process, 0)
        except ProcessLookupError:
            return
        time.sleep(_POLL_SECONDS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
