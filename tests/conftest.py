"""Session-wide settings of the test run, shared by every test folder.

``make test`` runs the suite on pytest-xdist workers, one per core. Each worker gets an equal share
of the cores for torch's intra-op threads, in its own process and in the training children it starts
(through ``OMP_NUM_THREADS``): two workers that each run a model on every core only slow each other
down (tests/gid_core/test_engine_e2e.py on this 2-core machine beside other busy processes: 80-105 s
with 2 threads, 21-23 s with 1). Set here, before any test module imports torch; a serial run keeps
the caller's settings.
"""

from __future__ import annotations

import os


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _share_cores_between_workers() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2:
        return
    threads = str(max(1, _cpu_count() // workers))
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ["MKL_NUM_THREADS"] = threads
    import torch

    torch.set_num_threads(int(threads))


_share_cores_between_workers()


def pytest_collection_modifyitems(config, items) -> None:
    """On xdist workers, files holding ``slow`` tests come first (each file keeps its order): a
    long end-to-end file started last would leave one worker running alone at the end."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
