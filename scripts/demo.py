"""``make demo``: the whole service from nothing, on the CPU, in about 7 minutes on 2 cores.

1. starts the embedded stack (Redis, API, one worker) in a fresh ``.demo/`` directory;
2. generates the synthetic digits detection dataset and registers it over the REST API;
3. trains a teacher (RetinaNet, ResNet-34, 64-channel FPN) with a ``train`` job;
4. submits a ``distill`` job (student: RetinaNet, ResNet-18, 32-channel FPN, GID from the teacher)
   and a ``train`` job of the same student without distillation (the baseline);
5. downloads the distilled student, loads it into a plain torchvision RetinaNet and predicts;
6. prints teacher / baseline student / GID student COCO AP, AP50, AP75; stops everything (also on
   errors or Ctrl-C).

``python scripts/demo.py --quick`` runs the same steps with tiny sizes (a smoke test of the plumbing,
about 3 minutes; its AP numbers mean nothing). The sizes below are the knobs to tune.

The demo shows the path, not the method's gain: at these budgets every model is at a few AP and
GID vs baseline is within noise (measured: GID 1.9 vs baseline 1.6 AP in 6.8 min; a teacher of 800
and students of 400 iterations on 1500 train images gave 2.2 vs 2.3 in 14.4 min). The
GID-vs-baseline comparison is ``make bench-quality`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_DIR = ROOT / ".demo"


@dataclass(frozen=True)
class DemoSizes:
    image_size: int = 64  # px, square synthetic images
    num_classes: int = 4  # digit categories
    num_train: int = 600
    num_val: int = 100
    max_objects: int = 4
    batch_size: int = 8
    lr: float = 0.02
    warmup_iters: int = 50
    teacher_iters: int = 300
    student_iters: int = 200  # the same budget for the GID student and the baseline
    devices: int = 1  # DDP processes per job; 2 cores gain nothing from 2 CPU ranks
    teacher_backbone: str = "resnet34"
    teacher_fpn: int = 64
    student_backbone: str = "resnet18"
    student_fpn: int = 32


SIZES = DemoSizes()
QUICK = replace(SIZES, num_train=32, num_val=16, max_objects=3, warmup_iters=5, teacher_iters=20,
                student_iters=20)
# Anchor base sizes P3..P7 for small images (torchvision's 32..512 suit 800 px COCO images).
ANCHORS = [8, 16, 32, 64, 128]


def model(backbone: str, fpn: int, sizes: DemoSizes) -> dict[str, Any]:
    return {
        "arch": "retinanet", "backbone": backbone, "num_classes": sizes.num_classes, "fpn_channels": fpn,
        "norm": "gn", "min_size": sizes.image_size, "max_size": sizes.image_size, "anchor_sizes": ANCHORS,
    }


def hyperparameters(iters: int, sizes: DemoSizes) -> dict[str, Any]:
    return {
        "max_iters": iters, "batch_size": sizes.batch_size, "lr": sizes.lr, "warmup_iters": sizes.warmup_iters,
        "grad_clip": 10.0, "num_workers": 1, "log_period": 10, "checkpoint_period": max(iters // 4, 1),
        # The paper maps a 224 px box to FPN level 4 on ~800 px images; keep that box/image ratio.
        "distill": {"roi_canonical_scale": 224.0 * sizes.image_size / 800.0},
    }


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(sizes: DemoSizes) -> None:
    import torch

    from gid_core.config import ModelConfig, SyntheticDatasetConfig
    from gid_core.export import load_export
    from gid_core.models import build_detector
    from gid_core.synthetic import make_synthetic_dataset
    from gid.cli import follow_job
    from gid.client import Client
    from gid.embedded import EmbeddedStack
    from gid_core.processes import free_port

    started = time.monotonic()
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    stack = EmbeddedStack(DEMO_DIR, port=free_port())
    try:
        banner(f"starting Redis, API and worker in {DEMO_DIR}")
        stack.start()
        print(f"API at {stack.url} (docs: {stack.url}/docs), token in {stack.token_path}, logs in {stack.logs_dir}")
        client = Client(stack.url, stack.token)

        banner("making the synthetic dataset and registering it over REST")
        data = make_synthetic_dataset(SyntheticDatasetConfig(
            output_dir=DEMO_DIR / "synthetic", num_train=sizes.num_train, num_val=sizes.num_val,
            image_size=sizes.image_size, num_classes=sizes.num_classes, max_objects=sizes.max_objects, seed=0,
        ))
        ids = {}
        for split in ("train", "val"):
            ds = client.register_dataset(name=f"digits-{split}", annotations=data[f"{split}_annotations"],
                                         images=data[f"{split}_images"])
            ids[split] = ds["id"]
            print(f"dataset {ds['id']}: {ds['name']}, {ds['num_images']} images, {ds['num_annotations']} boxes")

        def submit(kind: str, name: str, student: dict, iters: int, teacher: str | None = None) -> dict:
            body = {"kind": kind, "name": name, "student": student, "train_dataset": ids["train"],
                    "val_dataset": ids["val"], "hyperparameters": hyperparameters(iters, sizes),
                    "resources": {"devices": sizes.devices}}
            if teacher:
                body["teacher"] = {"model_id": teacher}
            job = client.submit_job(body)
            print(f"submitted {kind} job {job['id']} ({name})", flush=True)
            return job

        def follow(job: dict) -> dict:
            ok = follow_job(client, job["id"]) == 0
            job = client.get_job(job["id"])
            if not ok:
                raise RuntimeError(f"job {job['name']} {job['status']}: {job['error']}")
            return job

        banner(f"training the teacher ({sizes.teacher_backbone}, FPN {sizes.teacher_fpn})")
        teacher_model = model(sizes.teacher_backbone, sizes.teacher_fpn, sizes)
        teacher = follow(submit("train", "teacher", teacher_model, sizes.teacher_iters))

        banner(f"student ({sizes.student_backbone}, FPN {sizes.student_fpn}): GID distillation and the baseline")
        student_model = model(sizes.student_backbone, sizes.student_fpn, sizes)
        gid_job = submit("distill", "gid-student", student_model, sizes.student_iters, teacher=teacher["output_model_id"])
        base_job = submit("train", "baseline-student", student_model, sizes.student_iters)
        gid_job, base_job = follow(gid_job), follow(base_job)

        banner("downloading the GID student and predicting with plain torchvision")
        export = DEMO_DIR / "gid_student"
        for name in ("model.safetensors", "metadata.json"):
            client.download(f"/v1/jobs/{gid_job['id']}/artifacts/{name}", export / name)
        detector, metadata = load_export(export)
        print(f"loaded {type(detector).__module__}.{type(detector).__name__} from {export}")
        rebuilt = build_detector(ModelConfig(**metadata["model"]), load_weights=False)
        assert type(rebuilt) is type(detector)  # a stock torchvision class
        image, truth = _val_image(data)
        with torch.no_grad():
            (pred,) = detector([image])
        names = [c["name"] for c in metadata["categories"]]
        print(f"image {truth['file']}: ground truth {', '.join(truth['labels'])}")
        top = [(names[int(lbl) - 1], float(s), [round(float(v)) for v in box])
               for box, s, lbl in zip(pred["boxes"][:5], pred["scores"][:5], pred["labels"][:5])]
        print("top predictions: " + ("; ".join(f"{n} {s:.2f} at {b}" for n, s, b in top) or "none"))

        banner("COCO evaluation on the val split (COCOeval, percent)")
        rows = [("teacher", teacher_model, teacher), ("baseline student", student_model, base_job),
                ("GID student", student_model, gid_job)]
        print(f"{'model':<18}{'backbone':<10}{'FPN':>5}{'params':>10}{'AP':>8}{'AP50':>8}{'AP75':>8}")
        for label, cfg, job in rows:
            params = sum(p.numel() for p in build_detector(ModelConfig(**cfg), load_weights=False).parameters())
            m = job["final_metrics"]
            print(f"{label:<18}{cfg['backbone']:<10}{cfg['fpn_channels']:>5}{params / 1e6:>9.1f}M"
                  f"{m['AP']:>8.1f}{m['AP50']:>8.1f}{m['AP75']:>8.1f}")
        print(f"\ndone in {(time.monotonic() - started) / 60:.1f} min")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        banner("stopping the stack")
        stack.stop()


def _val_image(data: dict) -> tuple[Any, dict]:
    import json

    import numpy as np
    import torch
    from PIL import Image

    coco = json.loads(Path(data["val_annotations"]).read_text())
    first = coco["images"][0]
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    labels = [categories[a["category_id"]] for a in coco["annotations"] if a["image_id"] == first["id"]]
    pixels = np.asarray(Image.open(Path(data["val_images"]) / first["file_name"]).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels / 255.0).permute(2, 0, 1), {"file": first["file_name"], "labels": labels}


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the plumbing in a few minutes")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end in the `finally` that stops the stack (a shell may start us with
    # SIGINT ignored, e.g. in the background).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(QUICK if args.quick else SIZES)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line for the user, the stack is already stopped
        from gid.client import ClientError

        print(f"demo failed: {e}" if isinstance(e, ClientError) else f"demo failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
