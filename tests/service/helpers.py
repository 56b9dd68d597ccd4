"""Helpers of the service tests (imported by ``conftest.py`` and the tests)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from service import crud
from service.core.config import Settings
from tests.redis_server import RedisServer

KiB = 1024


@dataclass
class Api:
    """The app under test with two owners (``alice``, ``bob``) and their tokens."""

    client: TestClient
    settings: Settings
    redis: RedisServer
    tokens: dict[str, str] = field(default_factory=dict)
    owner_ids: dict[str, str] = field(default_factory=dict)

    @property
    def roots(self) -> Path:
        return self.settings.data_roots[0]

    def auth(self, who: str = "alice", **headers: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", **headers}

    def get(self, url: str, who: str = "alice", **kw):
        return self.client.get(url, headers=self.auth(who, **kw.pop("headers", {})), **kw)

    def post(self, url: str, who: str = "alice", **kw):
        return self.client.post(url, headers=self.auth(who, **kw.pop("headers", {})), **kw)

    def session(self) -> Session:
        return self.client.app.state.session_factory()

    def configure(self, **updates) -> None:
        """Change the running app's settings (the handlers and size limits read them per request)."""
        self.settings = self.settings.model_copy(update=updates)
        self.client.app.state.settings = self.settings

    def register_dataset(self, num_classes: int = 2, who: str = "alice", names: list[str] | None = None) -> str:
        folder = self.roots / f"ds-{uuid.uuid4().hex[:8]}"
        ann = write_coco(folder, num_classes=num_classes, names=names)
        r = self.post("/v1/datasets", who, json={"name": folder.name, "annotations": str(ann), "images": str(folder / "images")})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def add_model(self, config: dict, who: str = "alice", categories: list[str] | None = None) -> str:
        """Register a model row the way the worker does (crud.create_model)."""
        with self.session() as s:
            model = crud.create_model(
                s, owner_id=self.owner_ids[who], name="m", config=config, categories=categories,
                path=str(self.settings.data_dir / "models" / "fake.safetensors"), sha256="0" * 64, size=1,
            )
            return model.id


def write_coco(
    folder: Path, *, num_classes: int = 2, num_images: int = 3, size: int = 32, names: list[str] | None = None
) -> Path:
    """A tiny valid COCO dataset: ``folder/annotations.json`` and ``folder/images/*.png``."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    names = names or [f"class_{i}" for i in range(num_classes)]
    images, annotations = [], []
    for i in range(num_images):
        Image.new("RGB", (size, size), (10 * i, 50, 90)).save(images_dir / f"img_{i}.png")
        images.append({"id": i + 1, "file_name": f"img_{i}.png", "width": size, "height": size})
        annotations.append({
            "id": i + 1, "image_id": i + 1, "category_id": 1 + i % len(names),
            "bbox": [2.0, 3.0, 10.0, 12.0], "area": 120.0, "iscrowd": 0,
        })
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


TINY_MODEL = {
    "arch": "retinanet", "backbone": "resnet18", "num_classes": 2, "fpn_channels": 16,
    "norm": "frozen_bn", "min_size": 64, "max_size": 64,
}


def finish_like_the_worker(api: Api, job_id: str, *, checkpoint_bytes: int = 3000, weights_bytes: int = 1000) -> str:
    """Run job ``job_id`` through the real lease protocol in-process, writing a small job folder
    (a checkpoint, an export, a log) the way the worker lays it out; returns the output model id."""
    from gid_core.fileio import sha256_file
    from gid_core.jobdir import JobDir
    from service import leases

    job_dir = JobDir(api.settings.data_dir / "jobs" / job_id)
    with api.session() as s:
        assert leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60) is not None
        job_dir.checkpoints.mkdir(parents=True)
        (job_dir.checkpoints / "ckpt_0000002.pt").write_bytes(b"c" * checkpoint_bytes)
        job_dir.export.mkdir()
        job_dir.export_weights.write_bytes(b"w" * weights_bytes)
        log = job_dir.attempt_log(1)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("training log\n")
        for name, path in (("model.safetensors", job_dir.export_weights), (log.name, log)):
            leases.add_artifact(s, job_id=job_id, name=name, path=str(path), size=path.stat().st_size,
                                sha256=sha256_file(path))
        model = crud.create_model(
            s, owner_id=leases.get_job(s, job_id=job_id).owner_id, name="out", config=dict(TINY_MODEL),
            categories=None, path=str(job_dir.export_weights), sha256=sha256_file(job_dir.export_weights),
            size=weights_bytes, source_job_id=job_id,
        )
        assert leases.finish_job(s, job_id=job_id, worker_id="w", status="succeeded", output_model_id=model.id)
        s.commit()
        return model.id
