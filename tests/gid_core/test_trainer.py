"""The training loop on toy models: learning, non-finite losses, schedules, clipping, stopping, hooks."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from gid_core.hooks import LRSchedulerHook, MetricsHook, ProgressHook, flatten_metrics
from gid_core.trainer import HookBase, Trainer, TrainingCancelled, build_lr_scheduler, build_optimizer, lr_factor


class ToyRegressor(nn.Module):
    """``forward(images, targets)`` like a detector: a dict of named losses in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.norm = nn.LayerNorm(3)

    def forward(self, images, targets):
        x = torch.stack(images)  # (N, 3)
        y = torch.stack([t["y"] for t in targets])  # (N, 1)
        pred = self.linear(x)
        return {"loss_mse": ((pred - y) ** 2).mean(), "loss_zero": self.norm(x).sum() * 0.0}


def toy_batches(n_batches: int = 4, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.5], [-2.0], [0.5]])
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, generator=g)
        y = x @ w + 0.3
        batches.append((list(x), [{"y": yi} for yi in y]))
    return batches


def record_metrics(period: int = 1):
    seen: list[tuple[int, dict[str, float]]] = []
    return seen, MetricsHook(lambda step, m: seen.append((step, dict(m))), period=period)


def test_loss_decreases_on_learnable_task():
    torch.manual_seed(0)
    model = ToyRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, hook = record_metrics()
    trainer = Trainer(model, opt, toy_batches(), max_iters=60, device="cpu", hooks=[hook])
    assert trainer.train() == "completed"
    assert trainer.iter == 60 and [s for s, _ in seen] == list(range(1, 61))
    first, last = seen[0][1], seen[-1][1]
    assert last["loss_mse"] < 0.01 * first["loss_mse"]
    assert first["total_loss"] == pytest.approx(first["loss_mse"] + first["loss_zero"])
    assert last["images_per_second"] > 0 and last["step_time"] > 0 and last["data_time"] >= 0
    assert trainer.epoch == 14  # 60 steps over a 4-batch loader: 14 restarts


def test_metrics_are_averaged_over_the_period():
    def run(periods):
        torch.manual_seed(0)
        model = ToyRegressor()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        recorded = [record_metrics(p) for p in periods]
        Trainer(model, opt, toy_batches(), max_iters=7, device="cpu", hooks=[h for _, h in recorded]).train()
        return [seen for seen, _ in recorded]

    [every] = run([1])
    [grouped] = run([3])
    assert [s for s, _ in grouped] == [3, 6, 7]  # every 3 iterations and after the last one
    per_step = [m["loss_mse"] for _, m in every]
    assert grouped[0][1]["loss_mse"] == pytest.approx(sum(per_step[0:3]) / 3, rel=1e-6)
    assert grouped[1][1]["loss_mse"] == pytest.approx(sum(per_step[3:6]) / 3, rel=1e-6)
    assert grouped[2][1]["loss_mse"] == pytest.approx(per_step[6], rel=1e-6)
    # Two hooks reporting at one iteration share one reduction (and one collective).
    both_every, both_grouped = run([1, 3])
    assert [s for s, _ in both_grouped] == [3, 6, 7]
    assert [m for _, m in both_grouped] == [both_every[2][1], both_every[5][1], both_every[6][1]]


class NanModel(nn.Module):
    def __init__(self, at_iter: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.at_iter, self.calls = at_iter, 0

    def forward(self, images, targets):
        self.calls += 1
        bad = torch.tensor(float("nan")) if self.calls > self.at_iter else torch.tensor(0.0)
        return {"loss_good": self.w.sum() * 0.1, "loss_exploding": self.w.sum() + bad}


def test_non_finite_loss_raises_naming_the_losses():
    model = NanModel(at_iter=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    after_train = []

    class Spy(HookBase):
        def after_train(self):
            after_train.append(True)

    trainer = Trainer(model, opt, toy_batches(), max_iters=5, device="cpu", hooks=[Spy()])
    # Two good steps: w = 1 - 2 * lr 0.1 * d(0.1 w + w)/dw 1.1 = 0.78, so loss_good = 0.078.
    with pytest.raises(FloatingPointError, match=r"iteration 2.*loss_good=0\.078.*loss_exploding=nan"):
        trainer.train()
    assert trainer.iter == 2 and not after_train
    # the bad step never reached the optimizer
    assert model.w.item() == pytest.approx(0.78)


def test_step_schedule_with_warmup_matches_hand_computed_values():
    model = ToyRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_lr_scheduler(
        opt, max_iters=10, schedule="step", warmup_iters=4, warmup_factor=0.2, steps=[0.5, 0.8], gamma=0.1
    )
    seen, hook = record_metrics()
    trainer = Trainer(model, opt, toy_batches(), max_iters=10, device="cpu", hooks=[LRSchedulerHook(sched), hook])
    trainer.train()
    # warm-up factor 0.2*(1-a)+a with a = it/4: 0.2, 0.4, 0.6, 0.8; milestones at 5 and 8.
    expected = [0.02, 0.04, 0.06, 0.08, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001]
    assert [m["lr"] for _, m in seen] == pytest.approx(expected, rel=1e-9)
    # The scheduler's state is the hook's, so it is checkpointed with the trainer.
    assert trainer.state_dict()["hooks"]["LRSchedulerHook#0"]["scheduler"]["last_epoch"] == 10


def test_cosine_and_constant_schedules():
    kw = dict(max_iters=8, warmup_iters=2, warmup_factor=0.5)
    # it=1: warm-up 0.75; cosine 0.5*(1+cos(pi/8)) = 0.9619397662556434
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(1, schedule="cosine", **kw) == pytest.approx(0.75 * 0.9619397662556434)
    assert lr_factor(4, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))
    assert lr_factor(8, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1, schedule="constant", **kw) == pytest.approx(0.75)
    assert lr_factor(5, schedule="constant", **kw) == 1.0
    assert lr_factor(3, schedule="step", max_iters=10, milestones=[3, 3], gamma=0.5) == 0.25
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, schedule="poly", max_iters=3)


def test_build_optimizer_skips_weight_decay_on_norm_and_bias():
    model = ToyRegressor()
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [p is model.linear.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)
    }
    assert opt.param_groups[0]["momentum"] == 0.9


class Steep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, images, targets):
        return {"loss": (self.w * torch.tensor([100.0, -200.0, 300.0, 50.0])).sum()}


@pytest.mark.parametrize("clip", [None, 1.0])
def test_grad_clipping_bounds_the_update(clip):
    model = Steep()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen, hook = record_metrics()
    Trainer(model, opt, toy_batches(1), max_iters=1, device="cpu", grad_clip=clip, hooks=[hook]).train()
    true_norm = math.sqrt(100**2 + 200**2 + 300**2 + 50**2)
    step_norm = model.w.detach().norm().item() / 0.5  # = norm of the applied gradient
    if clip is None:
        assert step_norm == pytest.approx(true_norm, rel=1e-5)
        assert "grad_norm" not in seen[0][1]
    else:
        assert step_norm == pytest.approx(clip, rel=1e-5)
        assert seen[0][1]["grad_norm"] == pytest.approx(true_norm, rel=1e-5)


def test_request_stop_and_training_cancelled():
    model = ToyRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    class StopAt(HookBase):
        def after_step(self):
            if self.trainer.iter == 3:
                self.trainer.request_stop()

    trainer = Trainer(model, opt, toy_batches(), max_iters=10, device="cpu", hooks=[StopAt()])
    assert trainer.train() == "cancelled" and trainer.iter == 3

    progress = []

    def callback(info):
        progress.append(info)
        if info["iteration"] == 4:
            raise TrainingCancelled("user asked")

    trainer = Trainer(model, opt, toy_batches(), max_iters=10, device="cpu", hooks=[ProgressHook(callback, 2)])
    assert trainer.train() == "cancelled" and trainer.iter == 4
    assert [p["iteration"] for p in progress] == [2, 4]
    assert progress[0]["max_iters"] == 10 and progress[0]["epoch"] == 0
    assert progress[1]["eta_seconds"] is not None and progress[1]["eta_seconds"] >= 0


def test_autocast_is_off_on_cpu():
    model = ToyRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, opt, toy_batches(), max_iters=1, device="cpu", amp=True)
    assert not trainer.amp and not trainer.scaler.is_enabled()
    trainer.train()


def test_flatten_metrics():
    results = {
        "AP": 12.5,
        "AP50": 30,
        "per_category": [{"id": 1, "name": "circle", "AP": 10.0}, {"id": 2, "name": "square", "AP": 15.0}],
        "extra": {"x": 1.0, "label": "text"},
        "flag": True,
    }
    assert flatten_metrics(results, "eval") == {
        "eval/AP": 12.5,
        "eval/AP50": 30.0,
        "eval/per_category/circle/AP": 10.0,
        "eval/per_category/square/AP": 15.0,
        "eval/extra/x": 1.0,
    }


def test_hooks_hold_the_trainer_by_weak_reference():
    model = ToyRegressor()
    hook = HookBase()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), toy_batches(), max_iters=2,
                      device="cpu", hooks=[hook])
    assert hook.trainer.max_iters == 2
    del trainer
    gc.collect()
    with pytest.raises(ReferenceError):
        hook.trainer.iter  # the hook did not keep its trainer alive
