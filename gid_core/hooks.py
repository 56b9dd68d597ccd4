"""Training hooks: everything the loop does besides the optimisation step.

Hooks subclass ``gid_core.trainer.HookBase``. They run on every rank, in registration order, and
see ``trainer.iter`` as the number of completed iterations (``before_step`` of the first step sees
0, ``after_step`` of it sees 1). A hook that performs a collective (metric reduction, checkpoint
RNG gathering, evaluation, the cancel decision) does so at the same iteration on every rank
because periods are the same everywhere; rank-0-only work (callbacks, file writes) happens inside.

A hook or callback may raise ``gid_core.trainer.TrainingCancelled``: the trainer turns it into a
stop request. With several ranks, stop requests are agreed upon by ``CancelHook`` (the engine adds
one), so every rank leaves the loop after the same iteration.

Order matters where hooks share state: ``LRSchedulerHook`` goes before ``CheckpointHook`` so that
a checkpoint holds the scheduler state of the iteration it saves.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer
from .fileio import flatten_metrics  # noqa: F401  (torch-free home; re-exported)
from .jobdir import checkpoint_filename
from .launch import barrier, comm_device, get_world_size, is_main_process
from .trainer import HookBase, Trainer

logger = logging.getLogger(__name__)


def _due(trainer: Trainer, period: int) -> bool:
    """True after iterations that are multiples of ``period`` and after the last iteration."""
    return trainer.iter % period == 0 or trainer.iter >= trainer.max_iters


class ProgressHook(HookBase):
    """Rank 0 calls ``callback({"iteration", "max_iters", "epoch", "eta_seconds"})`` every
    ``period`` iterations and after the last one. ``eta_seconds`` is None until two steps ran."""

    def __init__(self, callback: Callable[[dict[str, Any]], None], period: int = 1) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.callback = callback
        self.period = period
        self._t_first: float | None = None
        self._iter_first = 0

    def before_train(self) -> None:
        self._t_first = None

    def eta_seconds(self) -> float | None:
        t = self.trainer
        if self._t_first is None:  # the first step (warm-up, allocation) is not representative
            self._t_first, self._iter_first = time.perf_counter(), t.iter
            return None
        done = t.iter - self._iter_first
        if done <= 0:
            return None
        per_iter = (time.perf_counter() - self._t_first) / done
        return per_iter * max(t.max_iters - t.iter, 0)

    def after_step(self) -> None:
        eta = self.eta_seconds()
        if is_main_process() and _due(self.trainer, self.period):
            t = self.trainer
            self.callback(
                {"iteration": t.iter, "max_iters": t.max_iters, "epoch": t.epoch, "eta_seconds": eta}
            )


class MetricsHook(HookBase):
    """Every ``period`` iterations (and at the end) reduces the scalars logged since the last
    report across ranks (one collective) and, on rank 0, calls ``callback(iteration, metrics)``
    with the averages: the losses, ``total_loss``, ``lr``, ``images_per_second`` (global),
    ``data_time``, ``step_time``, ``gi/*`` model statistics and pending ``eval/*`` results."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None], period: int = 20) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.callback = callback
        self.period = period
        self._last_reported: int | None = None

    def _report(self) -> None:
        metrics = self.trainer.storage.reduce(self.trainer.iter)
        self._last_reported = self.trainer.iter
        if is_main_process() and metrics:
            self.callback(self.trainer.iter, metrics)

    def after_step(self) -> None:
        if _due(self.trainer, self.period):
            self._report()

    def after_train(self) -> None:
        # A cancelled run's last partial period, or evaluation results stored at the end.
        if self._last_reported != self.trainer.iter or self.trainer.storage.has_extra:
            self._report()


def log_metrics(iteration: int, metrics: Mapping[str, float]) -> None:
    """A ``MetricsHook`` callback that writes one log line."""
    logger.info(
        "iter %d: %s", iteration, "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    )


class LRSchedulerHook(HookBase):
    """Steps ``scheduler`` after every iteration; its state is part of the checkpoint."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def after_step(self) -> None:
        with warnings.catch_warnings():  # an optimizer step skipped by the GradScaler is expected
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


class CheckpointHook(HookBase):
    """Saves the trainer state every ``period`` iterations and when training ends (completed or
    cancelled). All ranks build the state (RNG states are gathered); rank 0 writes; all wait."""

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.checkpointer = checkpointer
        self.period = period
        self._last_saved: int | None = None

    def before_train(self) -> None:
        if self.trainer.start_iter > 0:  # resumed: that state is already on disk
            self._last_saved = self.trainer.start_iter

    def save(self) -> None:
        state = self.trainer.state_dict()
        if is_main_process():
            self.checkpointer.save(checkpoint_filename(self.trainer.iter), state)
        barrier()
        self._last_saved = self.trainer.iter

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period == 0 and t.iter < t.max_iters:
            self.save()

    def after_train(self) -> None:
        if self._last_saved != self.trainer.iter:
            self.save()


class EvalHook(HookBase):
    """Runs ``eval_fn()`` on every rank every ``period`` iterations (and after the last one when
    ``eval_at_end``). Rank 0 gets the metrics; they are stored as ``eval/<name>`` scalars and
    kept in ``latest``."""

    def __init__(
        self, eval_fn: Callable[[], dict[str, Any]], period: int, *, eval_at_end: bool = True
    ) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.eval_fn = eval_fn
        self.period = period
        self.eval_at_end = eval_at_end
        self.latest: dict[str, Any] = {}
        self._last_eval: int | None = None

    def evaluate(self) -> None:
        results = self.eval_fn() or {}
        self.trainer.model.train()  # eval_fn switches the model to eval mode
        self._last_eval = self.trainer.iter
        if results:
            self.latest = dict(results)
            self.trainer.storage.put_extra(flatten_metrics(results, "eval"))

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period == 0 and t.iter < t.max_iters:
            self.evaluate()

    def after_train(self) -> None:
        t = self.trainer
        if self.eval_at_end and t.status == "completed" and self._last_eval != t.iter:
            self.evaluate()


class CancelHook(HookBase):
    """Every ``period`` iterations rank 0 calls ``should_cancel()``; the decision, or-ed with any
    rank's pending stop request, is agreed on by one all_reduce so every rank stops after the
    same iteration. The trainer then ends as "cancelled" (and ``CheckpointHook`` saves)."""

    def __init__(self, should_cancel: Callable[[], bool] | None = None, period: int = 1) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.should_cancel = should_cancel
        self.period = period

    def _decide(self) -> None:
        t = self.trainer
        want = t.stop_requested
        if is_main_process() and self.should_cancel is not None and not want:
            want = bool(self.should_cancel())
        if get_world_size() > 1:
            flag = torch.tensor([int(want)], dtype=torch.int32, device=comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            want = bool(flag.item())
        if want:
            t.stop_agreed = True

    def before_train(self) -> None:
        self._decide()  # cancelled before the first step

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period == 0 and t.iter < t.max_iters:
            self._decide()


class TqdmProgressHook(HookBase):
    """A tqdm progress bar on rank 0 with the latest reduced loss in its postfix."""

    def __init__(self, desc: str = "train", **tqdm_kwargs: Any) -> None:
        self.desc = desc
        self.tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None

    def before_train(self) -> None:
        if is_main_process():
            from tqdm.auto import tqdm

            t = self.trainer
            self._bar = tqdm(
                total=t.max_iters, initial=t.iter, desc=self.desc, dynamic_ncols=True,
                **self.tqdm_kwargs,
            )

    def after_step(self) -> None:
        if self._bar is None:
            return
        self._bar.update(self.trainer.iter - self._bar.n)
        latest = self.trainer.storage.latest
        if "total_loss" in latest and math.isfinite(latest["total_loss"]):
            postfix = {"loss": f"{latest['total_loss']:.4f}", "lr": f"{latest.get('lr', 0.0):.2e}"}
            self._bar.set_postfix(postfix, refresh=False)

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
