"""Starting distributed (DDP) processes, and the few collective helpers the engine needs.

``launch(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` processes
(start method ``spawn``) joined by a process group on a free TCP port of 127.0.0.1: NCCL when CUDA
has a GPU per process, gloo otherwise. An exception in any child stops all of them and is raised
in the caller with the child's traceback. Every child dies with the calling process
(``PR_SET_PDEATHSIG``): a launcher that is killed leaves no orphaned rank behind. ``world_size == 1``
runs ``fn`` in the calling process without a process group unless a ``backend`` is asked for.

``init_from_env()`` is the ``torchrun`` path: it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing import ProcessRaisedException

from .processes import die_with_parent, free_port

_TIMEOUT = datetime.timedelta(minutes=30)


# --------------------------------------------------------------------------- collective helpers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def barrier() -> None:
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU for NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend(world_size: int) -> str:
    if torch.cuda.is_available() and world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- process setup


def _init_process(
    rank: int, world_size: int, backend: str, init_method: str, local_rank: int,
    timeout: datetime.timedelta = _TIMEOUT,
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        # Processes share the machine's cores; oversubscription makes every rank slower.
        torch.set_num_threads(max(1, _cpu_count() // world_size))
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


class LaunchError(ProcessRaisedException):
    """A rank raised. Describes the rank that failed *first* (a peer's failure makes the other
    ranks fail too, with connection errors that hide the cause): ``rank``, ``exc_type`` (the
    exception's class name), ``exc_message`` (its ``str``); the message is that rank's traceback."""

    def __init__(self, *, rank: int, exc_type: str, exc_message: str, traceback_text: str, error_pid: int) -> None:
        super().__init__(f"\n\n-- rank {rank} failed first:\n{traceback_text}", rank, error_pid)
        self.rank, self.exc_type, self.exc_message = rank, exc_type, exc_message


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    backend: str,
    init_method: str,
    args: tuple[Any, ...],
    exchange: str,
    launcher_pid: int,
) -> None:
    die_with_parent(launcher_pid)
    try:
        _init_process(rank, world_size, backend, init_method, local_rank=rank)
        result = fn(rank, world_size, *args)
    except BaseException as exc:
        # Written synchronously before the exception unwinds: the parent may kill us right after.
        record = {"rank": rank, "time": time.time(), "traceback": traceback.format_exc(),
                  "exc_type": type(exc).__name__, "exc_message": str(exc)}
        with open(os.path.join(exchange, f"error_{rank}.pkl"), "wb") as f:
            pickle.dump(record, f)
        raise
    if rank == 0:
        with open(os.path.join(exchange, "result.pkl"), "wb") as f:
            pickle.dump(result, f)
    _destroy()


def _first_error(exchange: str) -> dict[str, Any] | None:
    records = []
    for name in os.listdir(exchange):
        if name.startswith("error_"):
            with open(os.path.join(exchange, name), "rb") as f:
                records.append(pickle.load(f))  # written by our own children
    return min(records, key=lambda r: r["time"]) if records else None


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    init_method: str | None = None,
) -> Any:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` ranks; returns rank 0's result.

    ``fn``, ``args`` and the result must be picklable (a top-level function, ``functools.partial``)
    when ``world_size > 1``. A failing rank stops all of them and raises ``LaunchError`` carrying
    the first failure's traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1 and backend is None:
        return fn(0, 1, *args)
    backend = backend or default_backend(world_size)
    init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
    if world_size == 1:
        saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        _init_process(0, 1, backend, init_method, local_rank=0)
        try:
            return fn(0, 1, *args)
        finally:
            _destroy()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    with tempfile.TemporaryDirectory(prefix="gid-launch-") as exchange:
        try:
            mp.start_processes(
                _child,
                args=(fn, world_size, backend, init_method, args, exchange, os.getpid()),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except ProcessRaisedException as e:
            first = _first_error(exchange)
            if first is None:
                raise
            raise LaunchError(rank=first["rank"], exc_type=first["exc_type"], exc_message=first["exc_message"],
                              traceback_text=first["traceback"], error_pid=e.error_pid) from e
        with open(os.path.join(exchange, "result.pkl"), "rb") as f:
            return pickle.load(f)


def init_from_env(
    backend: str | None = None, timeout: datetime.timedelta | None = None
) -> tuple[int, int, int]:
    """Joins the process group described by ``torchrun``'s environment; returns
    ``(rank, world_size, local_rank)``. Without ``WORLD_SIZE`` (or with 1) no group is made.
    ``timeout`` bounds every collective (a lost peer ends the run instead of hanging it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not is_distributed():
        backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        _init_process(rank, world_size, backend, "env://", local_rank, timeout or _TIMEOUT)
    return rank, world_size, local_rank


def destroy() -> None:
    """Leaves the process group (the counterpart of ``init_from_env``)."""
    _destroy()
