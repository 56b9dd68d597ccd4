"""The iteration-based training loop (detectron2 style: a short ``run_step``, the rest in hooks).

``HookBase`` lives here and the concrete hooks (``gid_core.hooks``) import it; the loop itself
names no hook, and the LR schedule is a hook too. ``model(images, targets)`` in train mode returns
a dict of named loss tensors (torchvision detectors and ``GIDDistiller`` do); the step minimises
their sum. Mixed precision (autocast + GradScaler) is used only on CUDA. Scalars are accumulated
on the device and reduced across ranks only when a ``MetricsHook`` reports, so a step adds no host
synchronisation beyond the one non-finite-loss check.

``trainer.iter`` counts completed iterations. ``Trainer.state_dict`` (model, optimizer, scaler,
iteration, per-rank RNG states, data position, hook states such as the LR scheduler's) is a
collective when distributed (RNG states are gathered) and holds only weights_only-loadable values.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import capture_rng_state, restore_rng_state
from .launch import comm_device, get_rank, get_world_size

__all__ = [
    "Trainer",
    "HookBase",
    "TrainingCancelled",
    "MetricStorage",
    "unwrap_model",
    "lr_factor",
    "build_optimizer",
    "build_lr_scheduler",
]

logger = logging.getLogger(__name__)


class TrainingCancelled(Exception):
    """Raised by a hook or callback to stop training cleanly (the run ends as "cancelled")."""


class HookBase:
    """Base class of training hooks.

    ``trainer`` is a weak reference (``weakref.proxy``) to the trainer, set when the hook is
    registered: the trainer owns its hooks, a hook does not keep its trainer alive.
    """

    trainer: "Trainer"

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_train(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def move_to_device(
    images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]] | None, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]] | None]:
    """``targets`` None (a batch of unlabeled images, ``gid_core.unlabeled``) stays None."""
    images = [img.to(device, non_blocking=True) for img in images]
    if targets is None:
        return images, None
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


class MetricStorage:
    """Sums of per-step scalars since the last report; ``reduce`` averages them over steps and
    ranks with a single all_reduce of one stacked tensor."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}  # device-side sums (losses, grad norm)
        # steps that reported each tensor: a GT loss is absent from unlabeled steps (gid_core.unlabeled)
        self._tensor_steps: dict[str, int] = {}
        self._floats: dict[str, float] = {}  # host-side sums (timings, model statistics)
        self._count = 0
        self._lr = 0.0
        self._extra: dict[str, float] = {}  # rank-0 results (evaluation), reported once
        self._reduced_at: int | None = None
        self.latest: dict[str, float] = {}  # the last reduced metrics, for display

    def put_step(
        self,
        tensors: Mapping[str, torch.Tensor],
        floats: Mapping[str, float],
        *,
        lr: float,
    ) -> None:
        for k, v in tensors.items():
            v = v.detach().float().clone()  # a private copy: callers may reuse theirs
            self._tensors[k] = self._tensors[k] + v if k in self._tensors else v
            self._tensor_steps[k] = self._tensor_steps.get(k, 0) + 1
        for k, v in floats.items():
            self._floats[k] = self._floats.get(k, 0.0) + float(v)
        self._count += 1
        self._lr = float(lr)

    @property
    def has_extra(self) -> bool:
        return bool(self._extra)

    def put_extra(self, scalars: Mapping[str, float]) -> None:
        self._extra.update(scalars)
        self.latest.update(scalars)

    def reduce(self, iteration: int) -> dict[str, float]:
        """Averages since the last call. Collective when steps are pending (every rank has the
        same number of steps and the same keys); a second call at one iteration reuses the result."""
        if self._reduced_at == iteration and not self._extra:
            return dict(self.latest)
        out: dict[str, float] = {}
        if self._count:
            t_keys, f_keys = sorted(self._tensors), sorted(self._floats)
            device = comm_device()
            parts = [self._tensors[k].to(device, torch.float64).reshape(1) for k in t_keys]
            parts.append(torch.tensor([self._floats[k] for k in f_keys], dtype=torch.float64, device=device))
            vec = torch.cat(parts)
            world = get_world_size()
            if world > 1:
                dist.all_reduce(vec)
            steps = [self._tensor_steps[k] for k in t_keys] + [self._count] * len(f_keys)
            values = (vec / (world * torch.tensor(steps, dtype=torch.float64, device=device))).tolist()
            out = dict(zip(t_keys + f_keys, values))
            # images_per_step is a per-rank mean; times are per-rank means of per-step times.
            images_per_step = out.pop("images_per_step") * world
            out["images_per_second"] = images_per_step / max(out["step_time"], 1e-12)
            out["lr"] = self._lr
            self._tensors, self._tensor_steps, self._floats, self._count = {}, {}, {}, 0
        out.update(self._extra)
        self._extra = {}
        self._reduced_at = iteration
        self.latest = dict(out)
        return out


class Trainer:
    """Runs ``max_iters`` optimisation steps (from ``start_iter``) over an endless data stream.

    ``data_loader`` yields ``(images, targets)``; a finite iterable is restarted when exhausted,
    and one with ``state_dict``/``load_state_dict``/``epoch`` (``ResumableLoader``) is checkpointed.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: Iterable[Any],
        *,
        max_iters: int,
        device: torch.device | str,
        amp: bool = False,
        grad_clip: float | None = None,
        hooks: Iterable[HookBase] = (),
        start_iter: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.max_iters = max_iters
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.grad_clip = grad_clip
        self.iter = self.start_iter = start_iter
        self.storage = MetricStorage()
        self.status: str | None = None  # "completed" | "cancelled" once train() returns
        self.stop_requested = False  # local request (this rank)
        self.stop_agreed = False  # every rank stops after this iteration
        self._epochs_done = 0  # for plain (non-resumable) loaders
        self._data_iter: Iterator[Any] | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        """Appends ``hooks``; they run in registration order."""
        for h in hooks:
            h.trainer = weakref.proxy(self)
            self.hooks.append(h)

    @property
    def epoch(self) -> int:
        return int(getattr(self.data_loader, "epoch", self._epochs_done))

    def request_stop(self) -> None:
        """Asks the loop to end after the current iteration. It takes effect at once in a single
        process; with several ranks only once a hook has agreed on it across ranks and set
        ``stop_agreed`` (every rank must leave the loop after the same iteration)."""
        self.stop_requested = True

    def _should_stop(self) -> bool:
        return self.stop_agreed or (self.stop_requested and get_world_size() == 1)

    def _call_hooks(self, stage: str) -> None:
        for h in self.hooks:
            try:
                getattr(h, stage)()
            except TrainingCancelled as e:
                logger.info("stop requested by %s: %s", type(h).__name__, e)
                self.request_stop()

    def train(self) -> str:
        """Runs the loop; returns "completed" or "cancelled". After an exception, ``after_train``
        hooks do not run (nothing checkpoints a state that failed)."""
        logger.info("training from iteration %d to %d", self.iter, self.max_iters)
        self.model.train()
        self._data_iter = iter(self.data_loader)
        self._call_hooks("before_train")
        while self.iter < self.max_iters and not self._should_stop():
            self._call_hooks("before_step")
            self.run_step()
            self.iter += 1
            self._call_hooks("after_step")
        self.status = "completed" if self.iter >= self.max_iters else "cancelled"
        self._call_hooks("after_train")
        logger.info("training %s at iteration %d", self.status, self.iter)
        return self.status

    def _next_batch(self) -> Any:
        assert self._data_iter is not None
        try:
            return next(self._data_iter)
        except StopIteration:  # a plain finite loader: start its next epoch
            self._epochs_done += 1
            self._data_iter = iter(self.data_loader)
            return next(self._data_iter)

    def run_step(self) -> None:
        start = time.perf_counter()
        images, targets = move_to_device(*self._next_batch(), self.device)
        data_time = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]

        with torch.autocast(self.device.type, enabled=self.amp):
            loss_dict = self.model(images, targets)
        total = sum(loss_dict.values())
        if not torch.isfinite(total):  # our one host sync per step (the GradScaler adds its own)
            values = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in loss_dict.items())
            raise FloatingPointError(f"non-finite loss at iteration {self.iter}: {values}")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        tensors = {**loss_dict, "total_loss": total}
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
            tensors["grad_norm"] = nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        floats = {"data_time": data_time, "images_per_step": len(images)}
        stats = getattr(unwrap_model(self.model), "last_stats", None) or {}
        for k, v in stats.items():  # tensors stay on the device: no sync until reported
            (tensors if isinstance(v, torch.Tensor) else floats)[f"gi/{k}"] = v
        floats["step_time"] = time.perf_counter() - start
        self.storage.put_step(tensors, floats, lr=lr)

    # ----------------------------------------------------------------------- checkpoint state

    def _hook_keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for h in self.hooks:
            name = type(h).__name__
            keys.append(f"{name}#{seen.get(name, 0)}")
            seen[name] = seen.get(name, 0) + 1
        return keys

    def state_dict(self) -> dict[str, Any]:
        """The resumable state; a collective when distributed (gathers every rank's RNG)."""
        rng = capture_rng_state()
        world = get_world_size()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        state: dict[str, Any] = {
            "iteration": self.iter,
            "world_size": world,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
        }
        if hasattr(self.data_loader, "state_dict"):
            state["data"] = self.data_loader.state_dict()
        hooks = {k: h.state_dict() for k, h in zip(self._hook_keys(), self.hooks)}
        state["hooks"] = {k: v for k, v in hooks.items() if v}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Hooks first, in registration order: a hook registered first may refuse the checkpoint
        # before anything is overwritten.
        saved_hooks = state.get("hooks", {})
        for key, h in zip(self._hook_keys(), self.hooks):
            if key in saved_hooks:
                h.load_state_dict(saved_hooks[key])
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "data" in state and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(state["data"])
        rng_states, rank = state.get("rng", []), get_rank()
        if state.get("world_size") == get_world_size() and rank < len(rng_states):
            restore_rng_state(rng_states[rank])
        else:
            logger.warning(
                "checkpoint from %s ranks resumed on %d: RNG streams are not restored",
                state.get("world_size"), get_world_size(),
            )
        self.iter = self.start_iter = int(state["iteration"])


# --------------------------------------------------------------------------- optimisation recipe

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD over the trainable parameters; normalisation parameters and biases get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, _NORMS) or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_factor(
    it: int,
    *,
    max_iters: int,
    schedule: str,
    warmup_iters: int = 0,
    warmup_factor: float = 1.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at (0-based) iteration ``it``.

    step: ``gamma ** (number of milestones <= it)``; cosine: ``(1 + cos(pi * it / max_iters)) / 2``;
    constant: 1. During warm-up (``it < warmup_iters``) it is further multiplied by
    ``warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters`` (linear from warmup_factor to 1).
    """
    if schedule == "step":
        factor = gamma ** bisect.bisect_right(list(milestones), it)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(it, max_iters) / max_iters))
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    max_iters: int,
    schedule: str,
    warmup_iters: int,
    warmup_factor: float,
    steps: Sequence[float] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` of ``lr_factor``; step milestones are ``steps`` fractions of
    ``max_iters``."""
    milestones = [int(round(s * max_iters)) for s in steps]

    def factor(it: int) -> float:  # a plain function: LambdaLR.state_dict() then stores nothing of it
        return lr_factor(
            it, max_iters=max_iters, schedule=schedule, warmup_iters=warmup_iters,
            warmup_factor=warmup_factor, milestones=milestones, gamma=gamma,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
