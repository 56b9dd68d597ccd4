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
