"""``gid weights list`` and ``gid weights import`` against the real API under uvicorn (real HTTP,
the ``gid`` command in its own process). Nothing is downloaded: the files are small stand-ins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torchvision.models as tvm

from gid.cli import main
from gid_core.processes import free_port
from service import crud, weights_store
from service.core.config import Settings
from service.main import create_app
from tests.gid.helpers import run_gid
from tests.service.live import serve

RESNET18 = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
RESNET18_FILE = tvm.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, str, Settings]]:
    """The API on SQLite with one owner; yields (url, token, settings)."""
    data = tmp_path_factory.mktemp("gid-weights")
    settings = Settings(env="local", data_dir=data, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings)
    with serve(app) as url:
        with app.state.session_factory() as s:
            owner = crud.get_or_create_owner(s, name="alice")
            token = crud.create_token(s, owner_id=owner.id, secret=settings.secret_key)
        yield url, token, settings


def gid(server, *args: str):
    """``gid ARGS`` in its own process."""
    url, token, _ = server
    return run_gid(*args, "--url", url, "--token", token)


def gid_here(server, capsys, *args: str) -> tuple[int, str, str]:
    """``gid ARGS`` in this process (faster): exit code, stdout, stderr."""
    url, token, _ = server
    code = main([*args, "--url", url, "--token", token])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_weights_list(server):
    cache = weights_store.cache_dir(server[2])
    cache.mkdir(parents=True, exist_ok=True)
    (cache / RESNET18_FILE).write_bytes(b"stand-in")
    out = gid(server, "weights", "list")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "ARCH", "BACKBONE", "CLASSES", "PRESENT", "FILE_NAME"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name[RESNET18] == [RESNET18, "backbone", "resnet18", "yes", RESNET18_FILE]
    retina = by_name["torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"]
    assert retina[1:6] == ["detector", "retinanet", "resnet50", "90", "no"]

def test_weights_list_json(server, capsys):
    code, out, _ = gid_here(server, capsys, "weights", "list", "--json")
    items = json.loads(out)
    by_name = {w["name"]: w for w in items}
    assert code == 0 and len(by_name) == len(items) and RESNET18 in by_name
    assert by_name[RESNET18]["categories"] is None and len(by_name[RESNET18]["hash_prefix"]) >= 6


def test_weights_import_refuses_a_file_with_another_hash_before_uploading(server, tmp_path: Path, capsys):
    cache = weights_store.cache_dir(server[2])
    cache.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in cache.iterdir())
    name = "torchvision:ResNet34_Weights.IMAGENET1K_V1"
    expected = tvm.ResNet34_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    stand_in = tmp_path / expected  # torchvision's file name, but not its contents
    stand_in.write_bytes(b"not torchvision's file")
    out = gid(server, "weights", "import", name, str(stand_in))
    assert out.returncode == 1 and out.stderr.startswith("error: "), out.stderr
    digest = hashlib.sha256(stand_in.read_bytes()).hexdigest()
    assert f"is not torchvision's {expected}" in out.stderr and digest[:16] in out.stderr
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing sent, nothing staged

    code, _, err = gid_here(server, capsys, "weights", "import", "torchvision:NoSuch_Weights.X", str(stand_in))
    assert code == 1 and "HTTP 404" in err and "NoSuch_Weights" in err
    code, _, err = gid_here(server, capsys, "weights", "import", name, str(tmp_path / "missing.pth"))
    assert code == 1 and "cannot read" in err and "missing.pth" in err
    with pytest.raises(SystemExit) as usage:  # FILE missing
        main(["weights", "import", name])
    assert usage.value.code == 2
