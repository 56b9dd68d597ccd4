"""``make demo``: the whole service from nothing, on the CPU, in at most 12 minutes on 2 idle cores
(measured from a fresh clone: 6.3 min, 7.5 with the venv build; docs/benchmarks.md, "Demo").

1. starts the embedded stack (Redis, API, one worker) in a fresh ``.demo/`` directory (``--dir``);
2. generates the synthetic digits detection dataset and registers it over the REST API;
3. one ``POST /v1/experiments``: the teacher (RetinaNet, ResNet-18, 64-channel FPN) trains, then
   the GID student (RetinaNet, ResNet-18, 32-channel FPN) and the same student without
   distillation (the baseline) run with one budget; prints the dashboard URL to watch them;
4. downloads the distilled student, loads it into a plain torchvision RetinaNet and predicts;
5. prints the experiment's comparison (teacher / baseline / GID: AP, AP50, AP75, APs/m/l,
   parameters, time); stops everything (also on errors or Ctrl-C).

``python scripts/demo.py --quick`` runs the same steps with tiny sizes (a smoke test of the plumbing,
about 3 minutes; its AP numbers mean nothing). The sizes below are the knobs to tune.

The recipe (``DemoSizes``; ``python -m benchmarks.demo_recipe`` runs it through the engine alone,
with seeds and CPU times) is chosen so that the gain can show in minutes on 2 CPU cores:

* data: the easiest task the synthetic generator makes: 2 classes (digit_0, digit_1), 1-2 objects
  per image, 19-38 px objects (``object_scale`` 0.3-0.6 of the side, instead of the 5-56 px COCO
  size buckets), a flat dark background without clutter; 1000 train / 150 val images at 64 px;
* teacher: ResNet-18 with a 64-channel FPN for 2000 iterations (~7x the students' budget): on
  this scene it is at 19.6 AP after a 1200-iteration schedule and 30.0 after 2000 (it localises
  poorly until late: AP75 9 -> 24). A ResNet-34 / FPN-128 teacher costs 1.8x the CPU per step and
  was at 8 AP after 400 iterations; iterations buy more AP than depth at this budget;
* students: ResNet-18 with a 32-channel FPN (the narrowest GroupNorm allows), 300 iterations;
* schedule: SGD lr 0.02, 50 warm-up iterations, cosine, as ``make bench-quality``; GID with the
  paper's weights under the default loss normalisation (feature x256/64, response x80/2).

Measured through the engine (docs/benchmarks.md, "Demo"): teacher 30.0 AP, GID about twice the
same-budget baseline (2 seeds: 15.4 vs 7.7); through the service, one ``make demo`` from a fresh
clone printed teacher 31.6, baseline 7.1, GID 18.1 AP in 6.3 min. The training costs ~640 CPU
seconds, the service ~80; the training child's two threads use both cores. For a shorter
demo, ``teacher_iters=1200`` costs ~160 CPU s less and keeps the gain (GID 15.1 vs 7.7) with a
19.6 AP teacher. The full GID-vs-baseline ablation is ``make bench-quality``.
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


# ----------------------------------------------------------------------------- the recipe
# One home for the demo's data, models and schedule (benchmarks/demo_recipe.py runs the same
# recipe through the engine alone, with seeds and CPU times); the rationale is in the docstring.


@dataclass(frozen=True)
class DemoSizes:
    image_size: int = 64  # px, square synthetic images
    num_classes: int = 2  # digit categories: 0 and 1
    num_train: int = 1000
    num_val: int = 150
    min_objects: int = 1
    max_objects: int = 2
    # The easier scene (SyntheticDatasetConfig fields): larger objects, no clutter, flat background.
    object_scale: tuple[float, float] | None = (0.3, 0.6)  # sqrt(box area) / image side
    clutter: bool = False
    photo_background: bool = False
    batch_size: int = 8
    lr: float = 0.02
    warmup_iters: int = 50
    teacher_iters: int = 2000
    student_iters: int = 300  # the same budget for the GID student and the baseline
    devices: int = 1  # DDP processes per job; 2 cores gain nothing from 2 CPU ranks
    teacher_backbone: str = "resnet18"
    teacher_fpn: int = 64
    student_backbone: str = "resnet18"
    student_fpn: int = 32  # the narrowest FPN GroupNorm allows (32 groups)
    distill: tuple[tuple[str, float], ...] = ()  # DistillConfig overrides (loss weights)

    def scene(self) -> dict[str, Any]:
        """The scene's ``SyntheticDatasetConfig`` fields."""
        return {"object_scale": self.object_scale, "clutter": self.clutter, "photo_background": self.photo_background}

    def describe_data(self) -> str:
        if self.object_scale is None:
            sizes = "small to large"
        else:
            sizes = "-".join(str(round(f * self.image_size)) for f in self.object_scale) + " px"
        background = "muted photo backgrounds" if self.photo_background else "a flat dark grey background"
        return (f"synthetic digits: {self.image_size} px images, {self.min_objects}-{self.max_objects} handwritten "
                f"digit sprites ({sizes}; classes digit_0..digit_{self.num_classes - 1}) in bright colours on "
                f"{background}{' with unlabeled clutter' if self.clutter else ', no clutter'}; "
                f"{self.num_train} train / {self.num_val} val images")


SIZES = DemoSizes()
QUICK = replace(SIZES, num_train=32, num_val=16, warmup_iters=5, teacher_iters=20, student_iters=20)
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
        "schedule": "cosine", "grad_clip": 10.0, "num_workers": 1, "log_period": 10,
        "checkpoint_period": max(iters // 4, 1),
        # The paper maps a 224 px box to FPN level 4 on ~800 px images; keep that box/image ratio.
        "distill": {"roi_canonical_scale": 224.0 * sizes.image_size / 800.0, **dict(sizes.distill)},
    }


def follow(client, job_id: str) -> None:
    """Print the job's progress until it ends; an error unless it succeeded."""
    from gid.cli.jobs import follow_job

    if follow_job(client, job_id) != 0:
        job = client.get_job(job_id)
        raise RuntimeError(f"job {job['name']} {job['status']}: {job['error']}")


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(sizes: DemoSizes, demo_dir: Path = DEMO_DIR) -> None:
    import torch

    from gid_core.config import ModelConfig, SyntheticDatasetConfig
    from gid_core.export import load_export
    from gid_core.models import build_detector
    from gid_core.synthetic import make_synthetic_dataset
    from gid.cli.format import format_experiment
    from gid.client import Client
    from gid.embedded import EmbeddedStack
    from gid_core.processes import free_port

    started = time.monotonic()
    shutil.rmtree(demo_dir, ignore_errors=True)
    stack = EmbeddedStack(demo_dir, port=free_port())
    try:
        banner(f"starting Redis, API and worker in {demo_dir}")
        stack.start()
        print(f"API at {stack.url} (docs: {stack.url}/docs), token in {stack.token_path}, logs in {stack.logs_dir}")
        client = Client(stack.url, stack.token)

        banner("making the synthetic dataset and registering it over REST")
        print(f"data: {sizes.describe_data()}")
        data = make_synthetic_dataset(SyntheticDatasetConfig(
            output_dir=demo_dir / "synthetic", num_train=sizes.num_train, num_val=sizes.num_val,
            image_size=sizes.image_size, num_classes=sizes.num_classes, min_objects=sizes.min_objects,
            max_objects=sizes.max_objects, seed=0, **sizes.scene(),
        ))
        ids = {}
        for split in ("train", "val"):
            ds = client.register_dataset(name=f"digits-{split}", annotations=data[f"{split}_annotations"],
                                         images=data[f"{split}_images"])
            ids[split] = ds["id"]
            print(f"dataset {ds['id']}: {ds['name']}, {ds['num_images']} images, {ds['num_annotations']} boxes")

        banner("one experiment: the teacher trains, then GID and the baseline with the same budget")
        teacher_model = model(sizes.teacher_backbone, sizes.teacher_fpn, sizes)
        student_model = model(sizes.student_backbone, sizes.student_fpn, sizes)
        exp = client.create_experiment({
            "name": "demo",
            "teacher": {"train": {"model": teacher_model,
                                  "hyperparameters": hyperparameters(sizes.teacher_iters, sizes)}},
            "student": student_model, "train_dataset": ids["train"], "val_dataset": ids["val"],
            "hyperparameters": hyperparameters(sizes.student_iters, sizes), "resources": {"devices": sizes.devices},
        })
        print(f"experiment {exp['id']}: POST /v1/experiments created jobs "
              + ", ".join(f"{role} {job_id[:8]}" for role, job_id in exp["jobs"].items() if job_id), flush=True)
        print(f"watch it in the dashboard: {stack.url}/", flush=True)
        follow(client, exp["jobs"]["teacher"])
        while (exp := client.get_experiment(exp["id"]))["status"] == "waiting_teacher":
            time.sleep(0.5)  # reading the experiment creates its GID job once the teacher is trained
        for role in ("gid", "baseline"):
            follow(client, exp["jobs"][role])
        exp = client.get_experiment(exp["id"])
        if exp["status"] != "succeeded":
            raise RuntimeError(f"experiment {exp['status']}: {exp['error'] or exp['jobs']}")
        gid_job = client.get_job(exp["jobs"]["gid"])

        banner("downloading the GID student and predicting with plain torchvision")
        export = demo_dir / "gid_student"
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

        banner(f"the comparison: GET /v1/experiments/{exp['id']} (COCO AP on the val split, percent)")
        print(format_experiment(exp))
        print(f"data: {sizes.describe_data()}")
        print(f"\ndashboard: {stack.url}/  (sign in with the token in {stack.token_path})")
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
    parser.add_argument("--dir", type=Path, default=DEMO_DIR,
                        help=f"working directory, emptied first (default {DEMO_DIR.relative_to(ROOT)}/)")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end in the `finally` that stops the stack (a shell may start us with
    # SIGINT ignored, e.g. in the background).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(QUICK if args.quick else SIZES, args.dir.resolve())
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
