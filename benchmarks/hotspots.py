"""Before/after figures for the hot spots the speed benchmark found (``python -m benchmarks.hotspots``).

Both fixes have landed in ``gid_core``; this module keeps the previous implementations so the gain
stays measurable and checks that old and new give the same outputs:

* ROIAlign (``gid_core/roi.py::pool_instances``) pools each GI box on its own FPN level only. The
  previous form pooled every box on every level and masked (``pool_instances_all_levels`` below):
  L (= 5) times the ROIAlign forward and backward, and the backward scatter dominates on CPU.
* GISM (``gid_core/gism.py::select_general_instances_batched``) runs NMS on each image's best few
  hundred candidates and grows the prefix only when an image is short of ``top_k`` survivors. The
  previous form ran NMS on all ``pre_nms_top_n`` = 3000 candidates per image, which is the same
  function with a prefix as long as the candidate list (``select_all_candidates`` below).

Each row measures one full speed-benchmark step (``benchmarks.speed.measure``) with either the
previous implementations swapped in ("before") or the library as it is ("after"), interleaved.
``--check`` only runs the exactness check (non-zero exit on any mismatch).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import roi_align

from gid_core.gism import select_general_instances_batched
from gid_core.roi import assign_levels, pool_instances

from .common import RESULTS_DIR, machine_info, write_json_atomic
from .speed import add_setting_arguments, measure, setting_from_args, summary_table

# The previous GISM: one NMS round over every candidate (pre_nms_top_n caps the prefix).
select_all_candidates = functools.partial(select_general_instances_batched, first_prefix=sys.maxsize)


def pool_instances_all_levels(
    features: list[Tensor], rois: Tensor, level_index: Tensor, strides: list[int], *, output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """The previous ``gid_core.roi.pool_instances``: pool every roi on every level, keep its own."""
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], output_size, output_size))
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        pooled = roi_align(feature, rois, output_size, spatial_scale=1.0 / stride,
                           sampling_ratio=sampling_ratio, aligned=True)  # (K, C, s, s)
        out = torch.where((level_index == lvl).view(-1, 1, 1, 1), pooled, out)
    return out


@contextlib.contextmanager
def previous_implementations(roi: bool = True, gism: bool = True) -> Iterator[None]:
    """Swap the previous implementations into the modules that call them; restores on exit."""
    import gid_core.distill as distill

    from . import speed

    saved = (distill.pool_instances, distill.select_general_instances_batched, speed.select_general_instances_batched)
    try:
        if roi:
            distill.pool_instances = pool_instances_all_levels
        if gism:
            distill.select_general_instances_batched = select_all_candidates
            speed.select_general_instances_batched = select_all_candidates
        yield
    finally:
        distill.pool_instances, distill.select_general_instances_batched, speed.select_general_instances_batched = saved


def check_exact(trials: int = 20, seed: int = 0) -> dict[str, int]:
    """Mismatches between the previous and the landed implementations on random inputs (expect 0)."""
    g = torch.Generator().manual_seed(seed)
    gism_bad = 0
    for trial in range(trials):
        n, r, c = 3, 3069, 4
        t_prob = torch.rand(n, r, c, generator=g) ** (1 + trial % 5)
        s_prob = torch.rand(n, r, c, generator=g) ** 2
        xy = torch.rand(n, r, 2, generator=g) * 120
        t_box = torch.cat([xy, xy + torch.rand(n, r, 2, generator=g) * (5 + 60 * (trial % 3))], -1)
        s_box = t_box + torch.randn(t_box.shape, generator=g) * 3
        for k, iou, min_size in ((10, 0.3, 0.0), (40, 0.3, 0.0), (10, 0.7, 3.0), (5, 0.1, 0.0)):
            kw = dict(top_k=k, nms_iou=iou, min_size=min_size)
            a = select_all_candidates(t_prob, t_box, s_prob, s_box, **kw)
            b = select_general_instances_batched(t_prob, t_box, s_prob, s_box, **kw)
            gism_bad += sum(not (torch.equal(ba, bb) and torch.equal(sa, sb)) for (ba, sa), (bb, sb) in zip(a, b))
    roi_bad = 0
    for _ in range(trials):
        feats = [torch.randn(4, 16, 128 // 2**lvl, 128 // 2**lvl, generator=g) for lvl in range(3, 8)]
        boxes = torch.rand(40, 4, generator=g) * 80
        boxes[:, 2:] = boxes[:, :2] + torch.rand(40, 2, generator=g) * 120 + 2
        levels = assign_levels(boxes, [3, 4, 5, 6, 7], canonical_scale=48.0, canonical_level=4)
        rois = torch.cat([torch.arange(4).repeat_interleave(10)[:, None].float(), boxes], 1)
        kw = dict(output_size=7, sampling_ratio=2)
        a = pool_instances_all_levels(feats, rois, levels, [8, 16, 32, 64, 128], **kw)
        b = pool_instances(feats, rois, levels, [8, 16, 32, 64, 128], **kw)
        roi_bad += int(not torch.allclose(a, b, atol=1e-6))
    return {"gism_mismatches": gism_bad, "roi_mismatches": roi_bad}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotspots", description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="before/after pairs, interleaved")
    parser.add_argument("--only", choices=("roi", "gism"), help="swap in only this previous implementation")
    parser.add_argument("--check", action="store_true", help="only check that old and new give the same outputs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        parser.error("--iters and --repeats must be >= 1")
    setting = setting_from_args(parser, args)
    exact = check_exact()
    print(f"mismatches on random inputs: {exact}", flush=True)
    if args.check:
        return 1 if any(exact.values()) else 0
    swap = {"roi": args.only in (None, "roi"), "gism": args.only in (None, "gism")}
    rows: list[tuple[str, dict[str, Any]]] = []
    for rep in range(args.repeats):
        with previous_implementations(**swap):
            rows.append((f"before #{rep}", measure(setting, iters=args.iters, warmup=1, teacher_inference=False)))
        rows.append((f"after #{rep}", measure(setting, iters=args.iters, warmup=1, teacher_inference=False)))
        print(summary_table(rows[-2:]), flush=True)
    table = summary_table(rows)
    print("\n" + table)
    write_json_atomic(args.out / "speed_hotspots.json", {
        "machine": machine_info(), "setting": vars(args) | {"out": str(args.out)}, "swapped": swap,
        "exactness": exact,
        "rows": [{"label": label, **{k: v for k, v in r.items() if k != "samples_ms"}} for label, r in rows],
        "table": table,
    })
    print(f"wrote {args.out / 'speed_hotspots.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
