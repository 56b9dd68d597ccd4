"""COCO scale: registering a COCO-2017-shaped dataset, and what a training job then holds.

``python -m benchmarks.coco_scale`` (``make bench-coco-scale``) writes a COCO-2017-train-shaped
dataset with :func:`gid_core.synthetic.make_coco_scale_dataset` (118,287 images as small JPEG
files, 860,001 boxes with polygons, crowd regions, 80 gapped category ids, images without boxes;
cached under ``benchmarks/cache/coco_scale/``), then measures, each in a fresh process:

* ``register``: ``service.datasets.validate_dataset``, what both registration routes run (JSON,
  every annotation, every image file's header through ``open_image_file``): wall and CPU seconds,
  peak RSS. The limits: under 60 s and 2 GB.
* ``dataset``: building the training ``CocoDetectionDataset`` (validation + compact arrays): time,
  peak RSS, the bytes it keeps and pickles, and the memory a forked loader worker dirties reading
  every image's targets (refcount copy-on-write would show here as hundreds of MB).

Results go to ``benchmarks/results/coco_scale.json``. Wall times depend on the machine's load;
CPU seconds less so (both are recorded, with the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE_DIR, RESULTS_DIR, format_table, machine_info
from gid_core.fileio import write_json_atomic

LIMIT_SECONDS, LIMIT_RSS_MB = 60.0, 2048.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _private_dirty_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _forked_reader_dirty_mb(ds) -> float:
    """MB a forked child dirties reading every image's training targets (no decoding)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker does per item, minus the pixels
        os.close(read_fd)
        before = _private_dirty_mb()
        records = ds._records
        for i in range(len(ds)):
            records.boxes_of(i), records.labels_of(i), records.file_name(i), ds.image_hw(i)
        os.write(write_fd, str(_private_dirty_mb() - before).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        value = float(f.read() or "nan")
    os.waitpid(pid, 0)
    return value


def measure(kind: str, annotations: str, images: str) -> dict[str, Any]:
    """One measurement in this process (run it in a fresh one: peak RSS is per process)."""
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    result: dict[str, Any] = {}
    if kind == "register":
        from service.datasets import validate_dataset

        summary = validate_dataset(Path(annotations), Path(images))
        result.update(num_images=summary.num_images, num_annotations=summary.num_annotations,
                      num_categories=len(summary.categories))
    else:
        from gid_core.data import CocoDetectionDataset

        ds = CocoDetectionDataset(annotations, images, train=True)
        records = ds._records
        result.update(
            num_images=len(ds),
            num_train_boxes=int(records.box_offsets[-1]),
            records_mb=sum(getattr(records, f).nbytes for f in records.__dataclass_fields__) / 1e6,
            pickled_mb=len(pickle.dumps(ds)) / 1e6,
        )
    result.update(wall_s=time.perf_counter() - start_wall, cpu_s=_cpu_seconds() - start_cpu,
                  peak_rss_mb=_peak_rss_mb())
    if kind == "dataset":
        result["forked_reader_dirty_mb"] = _forked_reader_dirty_mb(ds)
    return result


def _measure_in_child(kind: str, info: dict) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.coco_scale", "--measure", kind, info["annotations"], info["images"]]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dataset(data_dir: Path, num_images: int, num_annotations: int) -> tuple[dict, float]:
    """The generated dataset, reused when ``data_dir`` already holds one of these counts."""
    from gid_core.synthetic import COCO2017_TRAIN, make_coco_scale_dataset

    meta = data_dir / "meta.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if (info["num_images"], info["num_annotations"]) == (num_images, num_annotations):
            return info, 0.0
    start = time.perf_counter()
    scale = num_images / COCO2017_TRAIN["num_images"]
    info = make_coco_scale_dataset(
        data_dir, num_images=num_images, num_annotations=num_annotations,
        num_empty=round(COCO2017_TRAIN["num_empty"] * scale), num_crowd=round(COCO2017_TRAIN["num_crowd"] * scale),
    )
    write_json_atomic(meta, info)
    return info, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from gid_core.synthetic import COCO2017_TRAIN

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=COCO2017_TRAIN["num_images"])
    parser.add_argument("--num-annotations", type=int, default=COCO2017_TRAIN["num_annotations"])
    parser.add_argument("--data-dir", type=Path, default=CACHE_DIR / "coco_scale")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "ANNOTATIONS", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        kind, annotations, images = args.measure
        print(json.dumps(measure(kind, annotations, images)))
        return 0
    info, generate_s = _dataset(args.data_dir, args.num_images, args.num_annotations)
    report = {
        "dataset": {k: info[k] for k in ("num_images", "num_annotations", "num_empty", "num_crowd")},
        "generate_s": generate_s,
        "load_average": os.getloadavg(),
        "register": _measure_in_child("register", info),
        "dataset_build": _measure_in_child("dataset", info),
        "limits": {"seconds": LIMIT_SECONDS, "rss_mb": LIMIT_RSS_MB},
        "machine": machine_info(),
    }
    reg = report["register"]
    report["within_limits"] = reg["wall_s"] < LIMIT_SECONDS and reg["peak_rss_mb"] < LIMIT_RSS_MB
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "coco_scale.json", report)
    rows = [[name, r["wall_s"], r["cpu_s"], r["peak_rss_mb"]] for name, r in
            (("register (validate_dataset)", reg), ("training dataset build", report["dataset_build"]))]
    print(format_table(["step", "wall s", "cpu s", "peak RSS MB"], rows))
    build = report["dataset_build"]
    print(f"kept {build['records_mb']:.1f} MB of arrays, pickles to {build['pickled_mb']:.1f} MB; a forked reader "
          f"of every target dirtied {build['forked_reader_dirty_mb']:.1f} MB; within limits: {report['within_limits']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
