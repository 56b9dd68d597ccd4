"""Worker nodes: capacity registration, and the nodes of a multi-node job (issue 11).

Registration. When a worker node is ready it registers its capacity (``service.workers.detect_capacity``:
the GPU ids of ``GID_WORKER_DEVICES``, else ``CUDA_VISIBLE_DEVICES``, else every GPU the driver
lists; no GPU: ``GID_WORKER_CPU_DEVICES`` CPU device slots) in ``workers`` and heartbeats it every
``job_heartbeat_seconds`` from a thread of its main process (``service.workers``).

Devices. The worker runs one Celery pool process per job slot; each job (or node of a gang) locks
the devices it needs (``DeviceSlots``) and its child sees only those (``CUDA_VISIBLE_DEVICES``).

Multi-node jobs (``nodes > 1``), see ``service.workers`` for the gang lease:

* ``GangLeader`` (node 0, the task that claimed the job) publishes the rendezvous endpoint
  (``<worker_address>:<free port>``), wakes other workers up with messages while its gang gathers,
  and gives the job back if the gang is not complete within ``gang_timeout_seconds`` or an older
  gang is waiting for nodes. Then it runs its node like a single-node job (``JobSupervisor``:
  lease heartbeat, cancel grace, outcome, artifacts), and stops when a peer node's slot expires.
* ``GangFollower`` (nodes 1..N-1, any task that found a gathering gang) waits for the gang, runs its
  node and stops when the gang is over (job requeued or finished, a peer lost).

Every node runs ``torch.distributed.run`` (c10d rendezvous on node 0's endpoint, ``devices`` ranks,
no elastic restarts) with ``worker.rank`` as the entry point; rank and collective timeouts are
``rendezvous_timeout_seconds``, so an attempt never hangs on a lost peer. Any failed or lost node
ends the whole attempt: node 0 sends the job back to the queue (``release_gang``), and a fresh gang
of any N workers resumes it from its newest checkpoint, while attempts are left. Each node's output
is ``logs/attempt-<n>.node<k>.log`` in the job's folder (shared by every node, same path).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready, worker_shutdown

from gid_core.processes import die_with_parent, free_port, kill_process_group
from service import leases, workers
from service.core.config import settings
from service.models import Job
from service.queue import enqueue_job
from service.status import JobStatus
from gid_core.fileio import write_json_atomic
from worker.rank import first_rank_failure
from worker.supervisor import KILL_WAIT_SECONDS, POLL_SECONDS, JobSupervisor, child_env, db_call

logger = logging.getLogger(__name__)

WAKE_UP_SECONDS = 2.0  # while a gang gathers, node 0 sends a wake-up message this often


# --------------------------------------------------------------------------- capacity


class DeviceSlots:
    """This worker node's devices, shared out among its concurrent jobs (one Celery pool process
    each): ``take(n)`` locks ``n`` free devices for the calling process, ``give_back()`` frees
    them. The locks are ``flock``s on one file per device in a folder of this node's own: the
    kernel frees them when the pool process dies, so a crash never leaks a GPU."""

    def __init__(self, worker_node: str, capacity: workers.Capacity, root: Path | None = None) -> None:
        self.capacity = capacity
        self.root = (root or Path(tempfile.gettempdir()) / "gid-devices") / worker_node.replace("/", "_")
        self.held: list[tuple[str, int]] = []  # (device id, locked fd)

    def take(self, count: int) -> list[str] | None:
        """Lock ``count`` free devices (all or none), or None when fewer are free."""
        self.root.mkdir(parents=True, exist_ok=True)
        guard = os.open(self.root / ".take", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # one scan at a time: two jobs never split the last devices
            for device in self.capacity.devices:
                if len(self.held) == count:
                    break
                fd = os.open(self.root / f"{device}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.held.append((device, fd))
        finally:
            os.close(guard)
        if len(self.held) < count:
            self.give_back()
            return None
        return [d for d, _ in self.held]

    def give_back(self) -> None:
        for _, fd in self.held:
            os.close(fd)  # closing the only descriptor releases its flock
        self.held = []

    def env(self) -> dict[str, str]:
        """The child's view: only its own GPUs (CPU slots change nothing)."""
        if self.capacity.kind != "cuda":
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(d for d, _ in self.held)}


def devices_per_node(job: Job) -> int:
    return int(job.engine_config.get("devices", 1)) // max(int(job.nodes), 1)


def worker_address() -> str:
    return settings.worker_address or socket.gethostname()


class RegistryThread(threading.Thread):
    """Registers this node and heartbeats its row until stopped; unregisters on the way out."""

    def __init__(self, worker_node: str) -> None:
        super().__init__(name="gid-registry", daemon=True)
        self.worker_node = worker_node
        self.stopped = threading.Event()

    def _register(self) -> None:
        cap = workers.detect_capacity(settings)
        db_call(workers.register_worker, worker_node=self.worker_node, address=worker_address(), kind=cap.kind,
                devices=list(cap.devices), slots=cap.slots)
        logger.info("worker %s registered: %s %s, %d slot(s)", self.worker_node, cap.kind, cap.devices, cap.slots)

    def run(self) -> None:
        registered = False
        while not self.stopped.is_set():
            try:
                if not registered or not db_call(workers.heartbeat_worker, worker_node=self.worker_node):
                    self._register()
                registered = True
            except Exception:
                logger.warning("worker registry heartbeat failed (retrying)", exc_info=True)
            self.stopped.wait(settings.job_heartbeat_seconds)
        try:
            db_call(workers.unregister_worker, worker_node=self.worker_node)
        except Exception:
            logger.warning("could not unregister worker %s", self.worker_node, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


_registry: RegistryThread | None = None


@worker_ready.connect
def _start_registry(sender=None, **_kwargs) -> None:
    global _registry
    name = getattr(sender, "hostname", None) or socket.gethostname()
    if _registry is None or not _registry.is_alive():
        _registry = RegistryThread(name)
        _registry.start()


@worker_shutdown.connect
def _stop_registry(**_kwargs) -> None:
    if _registry is not None:
        _registry.stop()


# --------------------------------------------------------------------------- a node's launcher


def node_command(*, job: Job, attempt: int, endpoint: str, is_host: bool, rank_args: list[str]) -> list[str]:
    """``torch.distributed.run`` for one node of ``job``'s gang (c10d rendezvous at ``endpoint``)."""
    world = int(job.engine_config["devices"])
    timeout = settings.rendezvous_timeout_seconds
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={job.nodes}", f"--nproc-per-node={world // job.nodes}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job.id}-{attempt}",
        f"--rdzv-conf=is_host={int(is_host)},join_timeout={timeout},read_timeout={timeout}",
        "--max-restarts=0", "--monitor-interval=0.5", f"--local-addr={worker_address()}",
        "-m", "worker.rank", *rank_args,
        "--cancel-poll-seconds", str(settings.cancel_poll_seconds),
        "--progress-interval-seconds", str(settings.progress_interval_seconds),
        "--collective-timeout-seconds", str(timeout),
    ]


def start_node(cmd: list[str], log_path: Path, cwd: Path, device_env: dict[str, str]) -> subprocess.Popen:
    """The node's launcher in its own session (one killpg stops it and its ranks); it dies with us."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**child_env(), **device_env},
            cwd=str(cwd),
            start_new_session=True, preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )


def node_log(job_dir, attempt: int, node_rank: int) -> Path:
    return job_dir.logs / f"attempt-{attempt}.node{node_rank}.log"


# --------------------------------------------------------------------------- node 0


class GangLeader(JobSupervisor):
    """Node 0 of a multi-node job: gathers the gang, runs its node, decides the job's outcome."""

    def __init__(self, job: Job, worker_id: str, *, worker_node: str | None) -> None:
        super().__init__(job, worker_id)
        self.worker_node = worker_node or socket.gethostname()
        self.endpoint = f"{worker_address()}:{free_port()}"
        self.log_path = node_log(self.job_dir, self.attempt, 0)

    def run(self) -> str:
        self.job_dir.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, self.job.engine_config)
        db_call(workers.open_gang, job_id=self.job_id, attempt=self.attempt, worker_node=self.worker_node,
                worker_id=self.worker_id, endpoint=self.endpoint, lease_seconds=settings.job_lease_seconds)
        why_not = self._gather()
        if why_not is not None:
            status = self._release(why_not, started=False)
            logger.info("job %s: gang not started (%s); job %s", self.job_id, why_not, status)
            return f"gang released: {why_not}"
        self.result_path.unlink(missing_ok=True)
        try:
            self.proc = start_node(self._command(), self.log_path, self.job_dir.root, self.device_env)
            outcome = self._supervise()
        except SoftTimeLimitExceeded:  # the job's time limit fails it, as on one node
            self._kill_child()
            self._register_leftovers()
            try:
                return self._time_limit_exceeded()
            finally:
                db_call(workers.clear_gang, job_id=self.job_id)
        except BaseException:
            self._kill_child()
            self._release("the worker stopped", started=True)
            raise
        if not self.result_path.is_file() and (failure := first_rank_failure(self.result_path)) is not None:
            write_json_atomic(self.result_path, failure)  # the first failed rank speaks for the gang
        cause = self._retry_cause(outcome)
        if cause is not None:
            self._register_leftovers()
            status = self._release(cause, started=True)
            return f"gang attempt {self.attempt} ended ({cause}); job {status}"
        self._register_node_logs()
        try:
            return self._conclude(outcome)
        finally:
            db_call(workers.clear_gang, job_id=self.job_id)

    def _command(self) -> list[str]:
        args = ["--config", str(self.config_path), "--output-dir", str(self.job_dir.root),
                "--result", str(self.result_path), "--job-id", self.job_id, "--worker-id", self.worker_id,
                "--attempt", str(self.attempt)]
        return node_command(job=self.job, attempt=self.attempt, endpoint=self.endpoint, is_host=True, rank_args=args)

    def _gather(self) -> str | None:
        """Wait for the gang (None), or say why it will not start now."""
        deadline = time.monotonic() + settings.gang_timeout_seconds
        next_wake = 0.0
        while True:
            lease = db_call(leases.renew_lease, job_id=self.job_id, worker_id=self.worker_id,
                            lease_seconds=settings.job_lease_seconds)
            if not lease.alive:
                return "lease lost"
            if lease.cancel_requested:
                return "cancel requested"
            state = db_call(workers.renew_node, job_id=self.job_id, attempt=self.attempt, node_rank=0,
                            worker_id=self.worker_id, lease_seconds=settings.job_lease_seconds)
            if state.complete:
                logger.info("job %s: gang of %d nodes complete (attempt %d)", self.job_id, state.nodes, self.attempt)
                return None
            if db_call(workers.joinable_gang, worker_node=self.worker_node, older_than=(self.job.created_at, self.job_id)):
                return "an older job is gathering its nodes"
            now = time.monotonic()
            if now > deadline:
                return (f"gang timeout: {state.members} of {state.nodes} nodes within "
                        f"{settings.gang_timeout_seconds:g} s")
            if now >= next_wake:
                next_wake = now + WAKE_UP_SECONDS
                enqueue_job(self.job_id)  # wakes an idle worker up; it joins (service.workers)
            time.sleep(POLL_SECONDS)

    def _node_lost(self) -> str | None:
        try:
            state = db_call(workers.renew_node, job_id=self.job_id, attempt=self.attempt, node_rank=0,
                            worker_id=self.worker_id, lease_seconds=settings.job_lease_seconds)
        except Exception:
            logger.warning("job %s: gang heartbeat failed", self.job_id, exc_info=True)
            return None
        if state.lost:
            return f"node {', '.join(map(str, state.lost))} of {state.nodes} lost"
        return None

    def _release(self, cause: str, *, started: bool) -> str | None:
        status = db_call(workers.release_gang, job_id=self.job_id, worker_id=self.worker_id, cause=cause,
                         started=started, max_attempts=settings.max_attempts)
        if status == JobStatus.QUEUED.value:
            enqueue_job(self.job_id)  # a failed send is retried by the reaper's sweep
        return status

    def _register_leftovers(self) -> None:
        super()._register_leftovers()
        self._register_node_logs()

    def _register_node_logs(self) -> None:
        """Every node's log of this attempt is an artifact (node 0's is ``log_path``)."""
        for path in sorted(self.job_dir.logs.glob(f"attempt-{self.attempt}.node*.log")):
            if path != self.log_path:
                try:
                    self._register(path.name, path)
                except Exception:
                    logger.warning("job %s: could not register %s", self.job_id, path, exc_info=True)


# --------------------------------------------------------------------------- nodes 1..N-1


def run_claimed(job: Job, worker_id: str, *, worker_node: str | None) -> str:
    """Run a job this task claimed, on devices of its own: node 0 of a gang, or a single-node job.
    Too few free devices (the worker's other jobs hold them): the job goes back to the queue
    without spending an attempt, and waits for the next job to end here (or another worker)."""
    slots = DeviceSlots(worker_node or socket.gethostname(), workers.detect_capacity(settings))
    if slots.take(devices_per_node(job)) is None:
        status = db_call(workers.release_gang, job_id=job.id, worker_id=worker_id, cause="no free devices",
                         started=False, max_attempts=settings.max_attempts)
        return f"job {job.id}: too few free devices here; job {status}"
    try:
        supervisor = GangLeader(job, worker_id, worker_node=worker_node) if job.nodes > 1 else JobSupervisor(job, worker_id)
        supervisor.device_env = slots.env()
        return supervisor.run()
    finally:
        slots.give_back()
        _wake_up_queued()


def _wake_up_queued() -> None:
    """Devices were freed: a message for the oldest queued job (one that found too few free
    devices here waits for it; the claim takes the oldest queued job whatever the message says)."""
    try:
        queued = db_call(leases.list_queued_job_ids, older_than_seconds=0)
        if queued:
            enqueue_job(queued[0])
    except Exception:
        logger.warning("could not wake up queued jobs (the reaper's sweep will)", exc_info=True)


def join_any_gang(worker_node: str | None, worker_id: str) -> str | None:
    """Join and run a node of the oldest gathering gang, if there is one and this worker has the
    devices one node of it needs free (returns what happened)."""
    worker_node = worker_node or socket.gethostname()
    found = db_call(workers.joinable_gang, worker_node=worker_node)
    if found is None:
        return None
    job_id, attempt = found
    job = db_call(leases.get_job, job_id=job_id)
    slots = DeviceSlots(worker_node, workers.detect_capacity(settings))
    if job is None or slots.take(devices_per_node(job)) is None:
        return None
    try:
        node_rank = db_call(workers.join_gang, job_id=job_id, attempt=attempt, worker_node=worker_node,
                            worker_id=worker_id, lease_seconds=settings.job_lease_seconds)
        if node_rank is None:
            return None
        logger.info("job %s: %s joined the gang of attempt %d as node %d", job_id, worker_id, attempt, node_rank)
        return GangFollower(job_id, attempt, node_rank, worker_id, device_env=slots.env()).run()
    finally:
        slots.give_back()


class GangFollower:
    """Node ``node_rank`` > 0 of a gang: waits for it to be complete, runs its node, stops with it."""

    def __init__(self, job_id: str, attempt: int, node_rank: int, worker_id: str, *,
                 device_env: dict[str, str] | None = None) -> None:
        from gid_core.jobdir import JobDir
        from service.storage import Storage

        self.job_id, self.attempt, self.node_rank, self.worker_id = job_id, attempt, node_rank, worker_id
        self.device_env = device_env or {}
        self.job_dir = JobDir(Storage(settings.data_dir).job_dir(job_id))
        self.proc: subprocess.Popen | None = None

    def _beat(self) -> workers.GangState:
        return db_call(workers.renew_node, job_id=self.job_id, attempt=self.attempt, node_rank=self.node_rank,
                       worker_id=self.worker_id, lease_seconds=settings.job_lease_seconds)

    def run(self) -> str:
        """The slot stays after the node ran (node 0 clears the gang when it concludes: a slot
        that left early would look like a lost node); it goes when the gang never started."""
        state = self._wait_for_gang()
        if state is None:
            db_call(workers.leave_gang, job_id=self.job_id, attempt=self.attempt, node_rank=self.node_rank,
                    worker_id=self.worker_id)
            return "gang released before it started"
        try:
            return self._run_node(state)
        finally:
            if self.proc is not None:
                kill_process_group(self.proc, grace_seconds=KILL_WAIT_SECONDS)

    def _wait_for_gang(self) -> workers.GangState | None:
        deadline = time.monotonic() + settings.gang_timeout_seconds + settings.job_lease_seconds
        while time.monotonic() < deadline:
            state = self._beat()
            if not state.alive:
                return None
            if state.complete:
                return state
            time.sleep(POLL_SECONDS)
        return None

    def _run_node(self, state: workers.GangState) -> str:
        job = db_call(leases.get_job, job_id=self.job_id)
        leader = job.lease_owner  # rank 0 reports progress under the job's lease
        result = self.job_dir.attempt_result(self.attempt)
        args = ["--config", str(self.job_dir.config), "--output-dir", str(self.job_dir.root), "--result", str(result),
                "--job-id", self.job_id, "--worker-id", str(leader), "--attempt", str(self.attempt)]
        cmd = node_command(job=job, attempt=self.attempt, endpoint=str(state.endpoint), is_host=False, rank_args=args)
        self.proc = start_node(cmd, node_log(self.job_dir, self.attempt, self.node_rank), self.job_dir.root,
                               self.device_env)
        cancel_seen: float | None = None
        next_beat = 0.0
        while True:
            try:
                code = self.proc.wait(timeout=POLL_SECONDS)
                return f"node {self.node_rank} of job {self.job_id} exited with {code}"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now < next_beat:
                continue
            next_beat = now + settings.job_heartbeat_seconds
            try:
                state = self._beat()
            except Exception:
                logger.warning("job %s: gang heartbeat failed", self.job_id, exc_info=True)
                continue
            if not state.alive or state.lost:
                logger.warning("job %s: the gang is over (alive=%s, lost nodes %s); stopping node %d",
                               self.job_id, state.alive, state.lost, self.node_rank)
                return f"node {self.node_rank} of job {self.job_id} stopped: the gang is over"
            if state.cancel_requested:
                cancel_seen = cancel_seen or now
                if now - cancel_seen > settings.cancel_grace_seconds:
                    return f"node {self.node_rank} of job {self.job_id} killed after the cancel request"
