"""Dataset registration: path confinement, uploads (size limits, zip-slip), validation reports."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.service.helpers import write_coco


def register_path(api, annotations, images, who="alice", name="ds"):
    return api.post("/v1/datasets", who, json={"name": name, "annotations": str(annotations), "images": str(images)})


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return buf.getvalue()


def upload(api, annotations: bytes, images: bytes, name="up"):
    files = {"annotations": ("a.json", annotations, "application/json"), "images": ("i.zip", images, "application/zip")}
    return api.post("/v1/datasets", data={"name": name}, files=files)


def assert_nothing_stored(api):
    assert api.get("/v1/datasets").json()["total"] == 0
    data = api.settings.data_dir
    assert list((data / "datasets").iterdir()) == [] and list((data / "tmp").iterdir()) == []


def test_register_by_path(api):
    folder = api.roots / "coco"
    ann = write_coco(folder, names=["cat", "dog"], num_images=3)
    # Categories are reported in label order, i.e. sorted by COCO id, whatever the file order.
    data = json.loads(ann.read_text())
    data["categories"] = [{"id": 7, "name": "zebra"}, {"id": 2, "name": "ant"}]
    for a in data["annotations"]:
        a["category_id"] = 7
    ann.write_text(json.dumps(data))
    r = register_path(api, ann, folder / "images")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["num_images"], body["num_annotations"], body["num_categories"]) == (3, 3, 2)
    assert body["categories"] == ["ant", "zebra"] and body["source"] == "path"
    assert api.get(f"/v1/datasets/{body['id']}").json() == body


def test_path_outside_roots_is_refused(api, tmp_path):
    outside = tmp_path / "outside"
    ann = write_coco(outside)
    inside = write_coco(api.roots / "ok")
    (api.roots / "escape").symlink_to(outside / "images")

    r = register_path(api, ann, outside / "images")
    assert r.status_code == 403
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "annotations"), ("body", "images")}
    # '..' and a symlink inside the root that points out are resolved before the check.
    r = register_path(api, api.roots / ".." / "outside" / "annotations.json", api.roots / "ok" / "images")
    assert r.status_code == 403 and [e["loc"] for e in r.json()["detail"]] == [["body", "annotations"]]
    r = register_path(api, inside, api.roots / "escape")
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "images"]
    assert "outside the allowed data roots" in r.json()["detail"][0]["msg"]
    assert_nothing_stored(api)


def test_path_errors_name_the_field(api):
    ann = write_coco(api.roots / "ok")
    cases = [
        ("relative/annotations.json", api.roots / "ok" / "images", ("body", "annotations"), "absolute"),
        (api.roots / "missing.json", api.roots / "ok" / "images", ("body", "annotations"), "not an existing file"),
        (ann, ann, ("body", "images"), "not an existing directory"),
    ]
    for annotations, images, loc, msg in cases:
        r = register_path(api, annotations, images)
        assert r.status_code == 422 and tuple(r.json()["detail"][0]["loc"]) == loc and msg in r.text, r.text
    r = api.post("/v1/datasets", json={"annotations": str(ann), "images": "/x", "extra": 1})
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "name"), ("body", "extra")}
    images = api.roots / "ok" / "images"
    api.configure(data_roots=[])
    r = register_path(api, ann, images)
    assert r.status_code == 403 and "disabled" in r.text


def test_invalid_dataset_lists_every_problem(api):
    folder = api.roots / "bad"
    ann = write_coco(folder, num_images=3)
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [1, 1, -5, 3]
    data["annotations"][1]["category_id"] = 99
    data["images"][2]["file_name"] = "missing.png"
    ann.write_text(json.dumps(data))
    r = register_path(api, ann, folder / "images")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) >= 3 and all(e["type"] == "invalid_dataset" for e in detail)
    messages = " | ".join(e["msg"] for e in detail)
    assert "width" in messages and "99" in messages and "missing.png" in messages
    assert ["body", "images"] in [e["loc"] for e in detail if "missing.png" in e["msg"]]
    assert_nothing_stored(api)


@pytest.mark.parametrize("prefix", ["", "images/"], ids=["flat", "wrapped-in-folder"])
def test_upload(api, tmp_path, prefix):
    ann = write_coco(tmp_path / "src", num_classes=3, num_images=4)
    r = upload(api, ann.read_bytes(), zip_folder(tmp_path / "src" / "images", prefix))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["num_images"], body["num_categories"], body["source"]) == (4, 3, "upload")
    stored = api.settings.data_dir / "datasets" / body["id"]
    assert (stored / "annotations.json").read_bytes() == ann.read_bytes()
    assert len(list(stored.rglob("*.png"))) == 4 and not list(stored.rglob("*.zip"))
    assert list((api.settings.data_dir / "tmp").iterdir()) == []


def test_upload_zip_slip_is_refused(api, tmp_path):
    ann = write_coco(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in (tmp_path / "src" / "images").iterdir():
            zf.write(p, p.name)
        zf.writestr("../../../../evil.sh", b"echo pwned")
    r = upload(api, ann.read_bytes(), buf.getvalue())
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "images"] and r.json()["detail"][0]["type"] == "unsafe_archive"
    assert not list(api.settings.data_dir.parent.rglob("evil.sh"))
    assert_nothing_stored(api)


def test_upload_size_limits(api, tmp_path):
    ann = write_coco(tmp_path / "src")
    images = zip_folder(tmp_path / "src" / "images")
    # One file over its own limit (but the request under the total): refused while storing it.
    big_zip = io.BytesIO()
    with zipfile.ZipFile(big_zip, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("noise.bin", bytes(range(256)) * 1100)  # 281,600 bytes > 256 KiB
    r = upload(api, ann.read_bytes(), big_zip.getvalue())
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "images"]
    r = upload(api, b" " * (65 * 1024), images)
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "annotations"]
    # The whole request over the upload limit: refused from Content-Length before reading.
    r = upload(api, ann.read_bytes(), b"\0" * (1400 * 1024))
    assert r.status_code == 413 and "limit" in r.text
    # A chunked JSON body (no Content-Length) is counted as it streams.
    chunks = (b" " * 8192 for _ in range(10))
    r = api.post("/v1/datasets", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = api.post("/v1/jobs", content=(b" " * 8192 for _ in range(10)), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_nothing_stored(api)


def test_upload_invalid_dataset_leaves_nothing(api, tmp_path):
    ann = write_coco(tmp_path / "src")
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = 999  # the PNG is 32 px wide
    r = upload(api, json.dumps(data).encode(), zip_folder(tmp_path / "src" / "images"))
    assert r.status_code == 422
    problem = r.json()["detail"][0]
    assert problem["loc"] == ["body", "images"] and "999" in problem["msg"]
    assert str(api.settings.data_dir) not in r.text  # staging paths are not shown
    r = upload(api, b"{not json", zip_folder(tmp_path / "src" / "images"))
    assert r.status_code == 422 and "invalid JSON" in r.text
    r = upload(api, ann.read_bytes(), b"not a zip")
    assert r.status_code == 422 and "not a zip" in r.text
    r = api.post("/v1/datasets", data={"name": "x"}, files={"annotations": ("a.json", ann.read_bytes())})
    assert r.status_code == 422 and r.json()["detail"] == [
        {"loc": ["body", "images"], "msg": "required file", "type": "missing"}
    ]
    assert_nothing_stored(api)


def test_service_store_is_never_registrable_by_path(api, tmp_path):
    """Even when a data root covers the data dir (``gid up`` does that), another owner's upload
    and the service's own files cannot be registered by path."""
    ann = write_coco(tmp_path / "src")
    uploaded = upload(api, ann.read_bytes(), zip_folder(tmp_path / "src" / "images")).json()["id"]
    data = api.settings.data_dir
    api.configure(data_roots=[data.resolve(), *api.settings.data_roots])
    stored = data / "datasets" / uploaded
    r = register_path(api, stored / "annotations.json", stored / "images", who="bob")
    assert r.status_code == 403 and "own data store" in r.text
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "annotations"), ("body", "images")}
    (data / "token").write_text("secret")
    r = register_path(api, data / "token", stored / "images", who="bob")
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "annotations"]
    # Other folders under the data dir (e.g. a generated synthetic dataset) stay allowed.
    ok = write_coco(data / "synthetic")
    assert register_path(api, ok, data / "synthetic" / "images", who="bob").status_code == 201
