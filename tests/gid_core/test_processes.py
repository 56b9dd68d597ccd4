"""``gid_core.processes``: a process group stops with TERM -> KILL escalation, and a child set up
with ``die_with_parent`` does not outlive its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gid_core.processes import kill_process_group

ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# A group leader that starts a member of its group, writes both pids and sleeps; with IGNORE_TERM
# the leader and the member ignore SIGTERM.
GROUP = """
import os, signal, subprocess, sys, time
ignore_term = sys.argv[2] == "1"
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
member = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           "open(r'" + sys.argv[1] + ".ready', 'w').close(); time.sleep(120)"])
while not os.path.exists(sys.argv[1] + ".ready"):
    time.sleep(0.01)
open(sys.argv[1], "w").write(str(member.pid))
time.sleep(120)
"""


def start_group(tmp_path: Path, *, ignore_term: bool) -> tuple[subprocess.Popen, int]:
    pid_file = tmp_path / "member.pid"
    leader = subprocess.Popen([sys.executable, "-c", GROUP, str(pid_file), "1" if ignore_term else "0"],
                              start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and leader.poll() is None
        time.sleep(0.02)
    return leader, int(pid_file.read_text())


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.02)


def test_a_group_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path):
    leader, member = start_group(tmp_path, ignore_term=True)
    start = time.monotonic()
    assert kill_process_group(leader, grace_seconds=1.0) == -signal.SIGKILL
    assert time.monotonic() - start >= 1.0
    wait_gone(member)


def test_leftovers_are_killed_as_soon_as_the_leader_exits(tmp_path: Path):
    leader, member = start_group(tmp_path, ignore_term=False)
    start = time.monotonic()
    assert kill_process_group(leader, grace_seconds=60) == -signal.SIGTERM
    assert time.monotonic() - start < 30  # not the grace period: the leader went on SIGTERM
    wait_gone(member)  # it ignored SIGTERM: the SIGKILL that followed took it


def test_grace_zero_and_a_bare_pid_kill_at_once(tmp_path: Path):
    leader, member = start_group(tmp_path, ignore_term=False)
    assert kill_process_group(leader.pid, grace_seconds=0) is None
    assert leader.wait(timeout=10) == -signal.SIGKILL  # no SIGTERM first
    wait_gone(member)


def test_a_child_dies_with_its_parent_when_set_up_in_preexec_fn(tmp_path: Path):
    """The form ``gid up`` uses: own session, and SIGTERM when the launcher dies."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import functools, os, signal, subprocess, sys, time\n"
        "from gid_core.processes import die_with_parent\n"
        "setup = functools.partial(die_with_parent, os.getpid(), death_signal=signal.SIGTERM)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True,\n"
        "                     preexec_fn=setup)\n"
        f"open(r'{pid_file}', 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env=CHILD_ENV)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert os.getsid(child) == child  # its own session
    parent.kill()
    parent.wait()
    wait_gone(child)


def test_die_with_parent_exits_when_the_parent_is_already_gone():
    code = "from gid_core.processes import die_with_parent; die_with_parent(expected_parent=1); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=CHILD_ENV)
    assert out.returncode == 1 and "alive" not in out.stdout
