"""Hostile and careless input: every request gets a 4xx naming the field, never a 5xx; datasets
cannot reach files outside the data roots (symbolic links included); a bug's 500 does not break
the client's keep-alive connection.
"""

from __future__ import annotations

import http.client
import io
import json
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from gid_core.config import Hyperparameters
from gid_core.data import CocoDetectionDataset
from service.main import create_app
from tests.service.helpers import TINY_MODEL, write_coco
from tests.service.live import serve

INT64_OVERFLOW = 2**63
DEEP = "[" * 100_000
JOB = {"kind": "train", "student": {"arch": "retinanet", "num_classes": 2}, "train_dataset": "x"}


def post_raw(api, url: str, body: bytes | str, content_type: str = "application/json"):
    return api.post(url, content=body, headers={"content-type": content_type})


def upload_dataset(api, folder: Path, who: str = "alice", annotations: bytes | None = None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for png in sorted((folder / "images").iterdir()):
            zf.write(png, png.name)
    ann = annotations if annotations is not None else (folder / "annotations.json").read_bytes()
    files = {"annotations": ("a.json", ann, "application/json"), "images": ("i.zip", buf.getvalue(), "application/zip")}
    return api.post("/v1/datasets", who, data={"name": "up"}, files=files)


def assert_refused(r, status: int, loc: list) -> str:
    """The response is ``status`` with an error on ``loc``; returns that error's message."""
    assert r.status_code == status, r.text
    errors = [e for e in r.json()["detail"] if e["loc"][: len(loc)] == loc]
    assert errors, r.text
    return errors[0]["msg"]


# --------------------------------------------------------------------------------------------
# Each of these was a 500


@pytest.mark.parametrize("url, field", [
    (f"/v1/jobs?offset={INT64_OVERFLOW}", "offset"),
    (f"/v1/datasets?offset={INT64_OVERFLOW}", "offset"),
    (f"/v1/models?offset={INT64_OVERFLOW}", "offset"),
    (f"/v1/jobs/x/metrics?since_step={INT64_OVERFLOW}", "since_step"),
    (f"/v1/jobs/x/metrics?since_step={-INT64_OVERFLOW - 1}", "since_step"),
])
def test_query_integers_beyond_64_bits(api, url, field):
    assert_refused(api.get(url), 422, ["query", field])


def test_non_utf8_dataset_body(api):
    assert_refused(post_raw(api, "/v1/datasets", b"\x0f\xff\xfe"), 422, ["body"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_everywhere(api, literal):
    lr = json.dumps({**JOB, "hyperparameters": {"lr": 0.1}}).replace("0.1", literal)
    assert_refused(post_raw(api, "/v1/jobs", lr), 422, ["body"])
    name = json.dumps({**JOB, "name": "n"}).replace('"n"', literal)
    assert_refused(post_raw(api, "/v1/jobs", name), 422, ["body"])
    dataset = json.dumps({"name": "n", "annotations": "/a", "images": "/b"}).replace('"n"', literal)
    assert_refused(post_raw(api, "/v1/datasets", dataset), 422, ["body"])
    config = json.dumps({**TINY_MODEL, "fpn_channels": 16}).replace("16", literal)
    r = api.post("/v1/models", data={"name": "m", "config": config}, files={"file": ("m.pt", b"x")})
    assert_refused(r, 422, ["body", "config"])


def test_non_finite_floats_are_refused_by_the_config_models():
    """Config files are not JSON (YAML has ``.inf``): the models refuse non-finite floats too."""
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValidationError, match="finite"):
            Hyperparameters(lr=value)


def test_deeply_nested_json(api, tmp_path):
    api.configure(max_json_body_bytes=1024 * 1024, max_annotation_bytes=1024 * 1024)
    assert_refused(post_raw(api, "/v1/jobs", '{"kind": ' + DEEP), 422, ["body"])
    assert_refused(post_raw(api, "/v1/datasets", '{"name": ' + DEEP), 422, ["body"])
    folder = api.roots / "deep"
    write_coco(folder)
    (folder / "deep.json").write_text(DEEP)
    r = api.post("/v1/datasets", json={"name": "d", "annotations": str(folder / "deep.json"), "images": str(folder / "images")})
    assert "nested too deeply" in assert_refused(r, 422, ["body", "annotations"])
    r = upload_dataset(api, folder, annotations=DEEP.encode())
    assert "nested too deeply" in assert_refused(r, 422, ["body", "annotations"])
    for field in ("config", "categories"):
        form = {"name": "m", "config": json.dumps(TINY_MODEL), field: DEEP}
        assert_refused(api.post("/v1/models", data=form, files={"file": ("m.pt", b"x")}), 422, ["body", field])


@pytest.mark.parametrize("tail", ["a\x00b.json", "a" * 10_000, "a" * 300 + ".json"])
def test_unusable_paths(api, tail):
    folder = api.roots / "p"
    write_coco(folder)
    r = api.post("/v1/datasets", json={"name": "d", "annotations": f"{folder}/{tail}", "images": str(folder / "images")})
    assert_refused(r, 422, ["body", "annotations"])


# --------------------------------------------------------------------------------------------
# Confinement


def test_refusal_does_not_list_the_roots(api):
    r = api.post("/v1/datasets", json={"name": "d", "annotations": "/etc/passwd", "images": "/etc"})
    assert "outside the allowed data roots" in assert_refused(r, 403, ["body", "annotations"])
    assert str(api.roots) not in r.text


def test_image_links_into_another_owners_upload_are_refused(api, tmp_path):
    """The finding: a folder inside a data root whose files link into bob's uploaded dataset."""
    bob = upload_dataset(api, write_coco(tmp_path / "bob").parent, who="bob")
    assert bob.status_code == 201, bob.text
    bobs_images = api.settings.data_dir / "datasets" / bob.json()["id"] / "images"
    folder = api.roots / "thief"
    write_coco(folder)
    for png in (folder / "images").iterdir():
        png.unlink()
        png.symlink_to(bobs_images / png.name)
    r = api.post("/v1/datasets", json={"name": "t", "annotations": str(folder / "annotations.json"), "images": str(folder / "images")})
    msg = assert_refused(r, 422, ["body", "images"])
    assert "symbolic link" in msg and "img_0.png" in msg and str(bobs_images) not in r.text
    assert api.get("/v1/datasets").json()["total"] == 0


def test_link_refusal_is_no_existence_oracle(api):
    """A link to an existing file, to a missing one, or a linked folder: the same answer."""
    folder = api.roots / "probe"
    ann = write_coco(folder, num_images=1)
    png = folder / "images" / "img_0.png"
    answers = []
    for target in ("/etc/passwd", "/nonexistent/secret.png", str(png.with_name("moved.png"))):
        png.unlink(missing_ok=True)
        png.symlink_to(target)
        r = api.post("/v1/datasets", json={"name": "p", "annotations": str(ann), "images": str(folder / "images")})
        answers.append((r.status_code, r.json()))
    assert answers[0][0] == 422 and answers[0] == answers[1] == answers[2]
    assert "/etc/passwd" not in json.dumps(answers[0][1])
    # A link higher up (a folder below the images folder) is refused the same way.
    sub = folder / "images" / "sub"
    sub.symlink_to("/etc")
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "sub/passwd"
    ann.write_text(json.dumps(data))
    r = api.post("/v1/datasets", json={"name": "p", "annotations": str(ann), "images": str(folder / "images")})
    assert "symbolic link" in assert_refused(r, 422, ["body", "images"])


def test_images_folder_containing_the_store_is_refused(api, tmp_path):
    """With a data root above the store, the store's files are reachable without any link."""
    api.configure(data_roots=[tmp_path])
    r = api.post("/v1/datasets", json={"name": "d", "annotations": "/x.json", "images": str(tmp_path)})
    assert "own data store" in assert_refused(r, 403, ["body", "images"])


def test_loader_never_follows_a_link_swapped_in_after_registration(api, tmp_path):
    folder = api.roots / "swap"
    ann = write_coco(folder)
    r = api.post("/v1/datasets", json={"name": "s", "annotations": str(ann), "images": str(folder / "images")})
    assert r.status_code == 201, r.text
    secret = tmp_path / "secret.png"
    (folder / "images" / "img_0.png").rename(secret)
    (folder / "images" / "img_0.png").symlink_to(secret)
    dataset = CocoDetectionDataset(ann, folder / "images", validate=False)  # the worker's view
    dataset[1]  # untouched files still load
    with pytest.raises(OSError, match="symbolic link"):
        dataset[0]


def test_errors_show_the_paths_the_client_sent(api):
    """The server resolves links in the given paths; its messages still speak of the client's."""
    real = api.roots / "real"
    write_coco(real)
    (real / "images" / "img_1.png").unlink()
    (api.roots / "alias").symlink_to(real)
    sent_images = str(api.roots / "alias" / "images")
    r = api.post("/v1/datasets", json={"name": "a", "annotations": str(api.roots / "alias" / "annotations.json"), "images": sent_images})
    msg = assert_refused(r, 422, ["body", "images"])
    assert sent_images in msg and str(real) not in r.text


# --------------------------------------------------------------------------------------------
# The safety net


def test_unexpected_error_keeps_the_connection_alive(settings):
    """A bug answers a JSON 500, and the same keep-alive connection serves the next request."""
    app = create_app(settings)

    def broken() -> None:  # a real bug, injected as a route
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with serve(app) as base_url:
        conn = http.client.HTTPConnection(urlsplit(base_url).netloc, timeout=10)
        try:
            for _ in range(2):
                conn.request("GET", "/broken")
                r = conn.getresponse()
                assert (r.status, json.loads(r.read())) == (500, {"detail": "internal server error"})
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
