"""Model uploads (weights-only, checked against the arch) and downloads (Range, ETag, 304)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from gid_core.config import ModelConfig
from gid_core.models import build_detector, save_state_dict_file

MOBILE = {
    "arch": "retinanet", "backbone": "mobilenet_v3_large", "num_classes": 2, "fpn_channels": 16,
    "norm": "frozen_bn", "min_size": 64, "max_size": 64,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    state = build_detector(ModelConfig(**MOBILE), load_weights=False).state_dict()
    save_state_dict_file(state, folder / "model.safetensors")
    torch.save(state, folder / "model.pt")
    return {"safetensors": folder / "model.safetensors", "pt": folder / "model.pt"}


@pytest.fixture
def big_api(api):
    api.configure(max_upload_bytes=16 * 1024 * 1024)
    return api


def upload(api, path: Path | None = None, *, config=MOBILE, categories=None, filename=None, content=None, name="m"):
    data = {"name": name, "config": config if isinstance(config, str) else json.dumps(config)}
    if categories is not None:
        data["categories"] = json.dumps(categories)
    content = content if content is not None else path.read_bytes()
    return api.post("/v1/models", data=data, files={"file": (filename or path.name, content)})


def assert_no_model_files(api):
    assert list((api.settings.data_dir / "models").iterdir()) == []
    assert list((api.settings.data_dir / "tmp").iterdir()) == []
    assert api.get("/v1/models").json()["total"] == 0


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_upload_and_download(big_api, checkpoints, kind):
    api, path = big_api, checkpoints[kind]
    r = upload(api, path, categories=["cat", "dog"])
    assert r.status_code == 201, r.text
    model = r.json()
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    assert (model["sha256"], model["size"], model["arch"]) == (sha, len(raw), "retinanet")
    assert model["config"]["backbone"] == "mobilenet_v3_large" and "weights" not in model["config"]
    assert model["categories"] == ["cat", "dog"]
    assert api.get(f"/v1/models/{model['id']}").json() == model

    url = f"/v1/models/{model['id']}/download"
    full = api.get(url)
    assert full.status_code == 200 and full.content == raw
    assert full.headers["etag"] == f'"{sha}"' and int(full.headers["content-length"]) == len(raw)
    part = api.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == raw[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(raw)}"
    assert api.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert api.get(url, headers={"Range": f"bytes={len(raw)}-"}).status_code == 416


def test_mismatched_checkpoint_lists_keys(big_api, checkpoints):
    api = big_api
    r = upload(api, checkpoints["safetensors"], config={**MOBILE, "num_classes": 5})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "file"] and error["type"] == "state_dict_mismatch"
    assert any("cls_logits" in k for k in error["ctx"]["shape_mismatch"])
    assert error["ctx"]["missing"] == [] and error["ctx"]["unexpected"] == []
    r = upload(api, checkpoints["safetensors"], config={**MOBILE, "arch": "fasterrcnn"})
    (error,) = r.json()["detail"]
    assert r.status_code == 422 and error["ctx"]["missing"] and error["ctx"]["unexpected"]
    assert len(error["ctx"]["missing"]) <= 10
    assert_no_model_files(api)


class _Exploit:
    """Unpickling it touches ``target``: the file exists iff some loader ran pickled code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickled_code_is_never_run(big_api, tmp_path):
    # Under the test's own folder: parallel test runs never see each other's file.
    target = tmp_path / "gid-service-test-pwned"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": _Exploit(target)}, buf)
    r = upload(big_api, content=buf.getvalue(), filename="evil.pt")
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "invalid_checkpoint"
    assert not target.exists()
    r = upload(big_api, content=pickle.dumps({"a": 1}), filename="plain.pkl.pt")
    assert r.status_code == 422
    r = upload(big_api, content=b"garbage", filename="x.safetensors")
    assert r.status_code == 422 and "not a loadable state_dict" in r.text
    assert_no_model_files(big_api)


def test_form_errors_name_the_field(big_api, checkpoints):
    api, path = big_api, checkpoints["safetensors"]
    cases = [
        ({"config": "{not json"}, ["body", "config"]),
        ({"config": {**MOBILE, "arch": "yolo"}}, ["body", "config", "arch"]),
        ({"config": {**MOBILE, "weights": "/etc/passwd"}}, ["body", "config", "weights"]),
        ({"config": {**MOBILE, "dropout": 0.1}}, ["body", "config", "dropout"]),
        ({"categories": ["a"]}, ["body", "categories"]),
        ({"categories": ["a", "a"]}, ["body", "categories"]),
        ({"filename": "model.bin"}, ["body", "file"]),
    ]
    for kwargs, loc in cases:
        r = upload(api, path, **kwargs)
        assert r.status_code == 422 and loc in [e["loc"] for e in r.json()["detail"]], (kwargs, r.text)
    r = api.post("/v1/models", data={"name": "m"}, files={"file": ("m.pt", b"x")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config"]
    assert_no_model_files(api)


def test_upload_limit(api, checkpoints):
    r = upload(api, checkpoints["safetensors"])  # ~5 MB over the 256 KiB test limit
    assert r.status_code == 413
    assert_no_model_files(api)


HUGE = {**MOBILE, "backbone": "resnet101", "num_classes": 10_000, "fpn_channels": 1024}  # ~1e9 parameters


def test_huge_config_is_checked_without_building_it(big_api, checkpoints):
    """The upload's keys and shapes are compared to a detector built on the meta device."""
    r = upload(big_api, checkpoints["safetensors"], config=HUGE)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["type"] == "state_dict_mismatch" and error["ctx"]["missing"]
    assert_no_model_files(big_api)


_MEASURE = """
import json, resource, sys
from pathlib import Path
from gid_core.config import ModelConfig
from service.checkpoints import check_checkpoint
from service.errors import FieldErrors
for config, path in json.loads(sys.argv[1]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        check_checkpoint(Path(path), ModelConfig(**config))
    except FieldErrors:
        pass
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB of new peak
"""


def test_checking_an_upload_allocates_no_parameters(checkpoints):
    """A real build of HUGE would take ~4 GB and, freed, stay in the API process; on the meta
    device the check's peak memory barely moves. Measured in a fresh process: its peak RSS."""
    import subprocess
    import sys

    cases = [(HUGE, str(checkpoints["safetensors"])), ({**MOBILE, "num_classes": 2000, "fpn_channels": 512}, str(checkpoints["pt"]))]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(cases)],
        capture_output=True, text=True, timeout=120, check=True, cwd=Path(__file__).parents[2],
    )
    growth_mib = [int(line) for line in out.stdout.split()]
    assert len(growth_mib) == 2 and max(growth_mib) < 100, growth_mib
