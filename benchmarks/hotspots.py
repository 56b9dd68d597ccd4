"""Proposed fixes for the GID step's hot spots, checked for exactness and timed A/B.

``python -m benchmarks.hotspots`` compares, in one process on the same inputs, the speed benchmark's
measurement with the library as it is ("before") and with these drop-in replacements patched into
``gid_core.distill`` ("after"):

* ``pool_instances_per_level`` (for ``gid_core/roi.py::pool_instances``): ROIAlign each GI box on
  its own FPN level only, instead of pooling every box on every level and masking (L = 5 times the
  ROIAlign forward and backward; the backward scatter dominates on CPU). This one has landed in
  ``gid_core/roi.py`` (one ``nonzero`` per level there, one ``bincount().tolist()`` here), so it is
  off by default (``--roi`` compares the two implementations).
* ``select_general_instances_batched_prefix`` (for ``gid_core/gism.py``): greedy NMS keeps a box
  iff no higher-scored kept box overlaps it, so NMS over the m best candidates keeps exactly the
  full result's boxes among them. When every image keeps >= top_k boxes of its m best (or m covers
  all its candidates), the top_k are final; otherwise m doubles. Same output, NMS over ~128
  instead of ``pre_nms_top_n`` = 3000 candidates per image, and ``batched_nms`` stays on its
  single-call path instead of one NMS (and one host sync) per image.

Both are checked against the library functions on random inputs before timing; ``--check`` stops
after that check (a non-zero exit if any output differs).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, roi_align

from gid_core import gism as _gism

from .common import RESULTS_DIR, machine_info, write_json_atomic
from .speed import SpeedSetting, measure, summary_table


def pool_instances_per_level(
    features: list[Tensor], rois: Tensor, level_index: Tensor, strides: list[int], *, output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """``gid_core.roi.pool_instances`` with each roi pooled once, on its own level -> (K, C, s, s)."""
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], output_size, output_size))
    order = torch.argsort(level_index)
    sizes = torch.bincount(level_index, minlength=len(features)).tolist()  # the one host sync
    for feature, stride, idx in zip(features, strides, order.split(sizes)):
        if idx.numel():
            pooled = roi_align(feature, rois[idx], output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=sampling_ratio, aligned=True)
            out = out.index_copy(0, idx, pooled)
    return out


@torch.no_grad()
def select_general_instances_batched_prefix(
    t_prob: Tensor, t_box: Tensor, s_prob: Tensor, s_box: Tensor, *, top_k: int = 10, nms_iou: float = 0.3,
    pre_nms_top_n: int = 3000, min_size: float = 0.0, first_prefix: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``gid_core.gism.select_general_instances_batched`` with NMS on a growing prefix (exact)."""
    _gism._check_inputs(t_prob, t_box, s_prob, s_box, batched=True)
    _gism._check_params(top_k, nms_iou, pre_nms_top_n, min_size)
    num_images, num_preds = t_prob.shape[:2]
    device = t_prob.device
    scores, boxes, valid = _gism._gi_scores_and_boxes(t_prob, t_box, s_prob, s_box, min_size)
    ranked = scores.masked_fill(~valid, float("-inf"))
    k_all = min(pre_nms_top_n, num_preds)
    m = min(k_all, first_prefix or max(16 * top_k, 128))
    num_valid = valid.sum(dim=1)  # (N,)
    while True:
        _, order = ranked.topk(m, dim=1)  # (N, m)
        cand_scores = scores.gather(1, order).reshape(-1)
        cand_boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)).reshape(-1, 4)
        cand_valid = valid.gather(1, order).reshape(-1)
        image_of = torch.arange(num_images, device=device).repeat_interleave(m)
        group = torch.where(cand_valid, image_of, torch.full_like(image_of, num_images))
        shift = cand_boxes.min().clamp(max=0.0) if cand_boxes.numel() else cand_boxes.new_zeros(())
        keep = batched_nms(cand_boxes - shift, cand_scores, group, nms_iou)
        kept_group = group[keep]
        counts = torch.zeros(num_images + 1, dtype=torch.int64, device=device)
        counts.index_add_(0, kept_group, torch.ones_like(kept_group))
        short = (counts[:num_images] < top_k) & (num_valid > m)  # could gain GIs from a longer prefix
        host = torch.cat([counts, short.any().reshape(1).long()]).tolist()  # the one host sync
        if not host[-1] or m >= k_all:
            break
        m = min(2 * m, k_all)
    by_group = kept_group.sort(stable=True).indices
    keep = keep[by_group]
    per_image_boxes = cand_boxes[keep].split(host[:-1])
    per_image_scores = cand_scores[keep].split(host[:-1])
    return [(per_image_boxes[i][:top_k], per_image_scores[i][:top_k]) for i in range(num_images)]


@contextlib.contextmanager
def patched(roi: bool = False, gism: bool = True) -> Iterator[None]:
    """Swap the fixes into the modules that call them; restores the originals on exit."""
    import gid_core.distill as distill

    from . import speed

    saved = (distill.pool_instances, distill.select_general_instances_batched, speed.select_general_instances_batched)
    try:
        if roi:
            distill.pool_instances = pool_instances_per_level
        if gism:
            distill.select_general_instances_batched = select_general_instances_batched_prefix
            speed.select_general_instances_batched = select_general_instances_batched_prefix
        yield
    finally:
        distill.pool_instances, distill.select_general_instances_batched, speed.select_general_instances_batched = saved


def check_exact(trials: int = 20, seed: int = 0) -> dict[str, int]:
    """Mismatches between the fixes and the library functions on random inputs (expect 0)."""
    from gid_core.gism import select_general_instances_batched
    from gid_core.roi import assign_levels, pool_instances

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
            a = select_general_instances_batched(t_prob, t_box, s_prob, s_box, **kw)
            b = select_general_instances_batched_prefix(t_prob, t_box, s_prob, s_box, **kw)
            gism_bad += sum(not (torch.equal(ba, bb) and torch.equal(sa, sb)) for (ba, sa), (bb, sb) in zip(a, b))
    roi_bad = 0
    for _ in range(trials):
        feats = [torch.randn(4, 16, 128 // 2**lvl, 128 // 2**lvl, generator=g) for lvl in range(3, 8)]
        boxes = torch.rand(40, 4, generator=g) * 80
        boxes[:, 2:] = boxes[:, :2] + torch.rand(40, 2, generator=g) * 120 + 2
        levels = assign_levels(boxes, [3, 4, 5, 6, 7], canonical_scale=48.0, canonical_level=4)
        rois = torch.cat([torch.arange(4).repeat_interleave(10)[:, None].float(), boxes], 1)
        kw = dict(output_size=7, sampling_ratio=2)
        a = pool_instances(feats, rois, levels, [8, 16, 32, 64, 128], **kw)
        b = pool_instances_per_level(feats, rois, levels, [8, 16, 32, 64, 128], **kw)
        roi_bad += int(not torch.allclose(a, b, atol=1e-6))
    return {"gism_mismatches": gism_bad, "roi_mismatches": roi_bad}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotspots", description=__doc__.split("\n")[0])
    defaults = SpeedSetting()
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="before/after pairs, interleaved")
    parser.add_argument("--roi", action="store_true", help="also patch in pool_instances_per_level")
    parser.add_argument("--check", action="store_true", help="only check that the fixes are exact")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        parser.error("--iters and --repeats must be >= 1")
    exact = check_exact()
    print(f"exactness on random inputs: {exact}", flush=True)
    if args.check:
        return 0 if not any(exact.values()) else 1
    setting = SpeedSetting(args.batch_size, args.image_size, args.top_k, args.num_classes)
    rows: list[tuple[str, dict[str, Any]]] = []
    for rep in range(args.repeats):
        rows.append((f"before #{rep}", measure(setting, iters=args.iters, warmup=1, teacher_inference=False)))
        with patched(roi=args.roi):
            rows.append((f"after #{rep}", measure(setting, iters=args.iters, warmup=1, teacher_inference=False)))
        print(summary_table(rows[-2:]), flush=True)
    table = summary_table(rows)
    print("\n" + table)
    write_json_atomic(args.out / "speed_hotspots.json", {
        "machine": machine_info(), "setting": vars(args) | {"out": str(args.out)}, "exactness": exact,
        "rows": [{"label": label, **{k: v for k, v in r.items() if k != "samples_ms"}} for label, r in rows],
        "table": table,
    })
    print(f"wrote {args.out / 'speed_hotspots.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
