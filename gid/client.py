"""The Python client of the GID REST API.

::

    from gid.client import Client

    with Client.from_environment() as client:           # GID_URL / GID_TOKEN, or what `gid up` wrote
        job = client.submit_job(json.load(open("job.json")))
        job = client.wait_for_job(job["id"], on_update=lambda j: print(j["progress"]))  # follows events
        for text in client.logs(job["id"], tail=20, follow=True):  # the training's output, live
            print(text, end="")
        for event in client.events(job["id"], after=0):  # Server-Sent Events: status, progress, metric, final
            print(event.id, event.event, event.data)
        client.download(f"/v1/models/{job['output_model_id']}/download", Path("student.safetensors"))

Responses are the API's JSON (``dict``); the schemas are in the OpenAPI document at ``/docs``.
Every failure raises a ``ClientError``: ``ApiError`` when the API answered with an HTTP error (its
``status_code`` and structured ``detail``), ``ApiUnreachable`` when nothing answers at the URL,
``NoTokenError`` when no token was found.

Only ``httpx`` and the job status names: the client runs without the server's libraries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from service.status import TERMINAL_STATUSES

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = "data"
URL_FILE = "url"  # in the data directory: the API's address while `gid up` runs
TOKEN_FILE = "token"  # in the data directory: the API token `gid up` created

Job = dict[str, Any]


class ClientError(Exception):
    """The API could not be used: unreachable, too slow, a corrupt download, an HTTP error."""


class ApiUnreachable(ClientError):
    """Nothing answers at ``url`` (the server is not running, or the address is wrong)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"cannot reach the GID API at {url} (is `gid up` or `gid serve` running?)")
        self.url = url


class NoTokenError(ClientError):
    """No API token was given, set in ``GID_TOKEN`` or found at ``token_path``."""

    def __init__(self, token_path: Path) -> None:
        super().__init__(f"no API token: set GID_TOKEN or run `gid up` (it writes {token_path})")
        self.token_path = token_path


class ApiError(ClientError):
    """The API answered ``status_code`` >= 400.

    ``detail`` is the API's ``detail`` as it sent it: a string, or for a request it refused (422) a
    list of problems ``{"loc": [...], "msg": ..., "type": ...}`` locating each bad field.
    """

    def __init__(self, status_code: int, detail: Any, *, method: str, path: str) -> None:
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.path = path

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):  # not JSON, or JSON without a detail
            detail = response.text.strip()[:500]
        return cls(response.status_code, detail, method=response.request.method, path=response.request.url.path)


class WeightsHashMismatch(ClientError):
    """A local file is not torchvision's file of the weights it is imported as."""

    def __init__(self, path: Path, spec: dict[str, Any], sha256: str) -> None:
        super().__init__(
            f"{path} is not torchvision's {spec['file_name']} for {spec['name']}: its sha256 {sha256[:16]}... "
            f"does not start with {spec['hash_prefix']!r} (the hash in the file name); download it again "
            f"from {spec['url']}"
        )
        self.path, self.sha256 = path, sha256


class WaitTimeout(ClientError):
    """A job was not finished when ``wait_for_job`` gave up; ``job`` is its last state."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job['id']} still {job['status']} after {timeout:.0f} s")
        self.job = job
        self.timeout = timeout


def format_detail(detail: Any) -> str:
    """``body.teacher.model_id: model 'x' not found; ...`` for a list of problems, else the text."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for problem in detail:
        if isinstance(problem, dict):
            loc = ".".join(str(p) for p in problem.get("loc", []))
            parts.append(f"{loc}: {problem.get('msg')}" if loc else str(problem.get("msg")))
        else:
            parts.append(str(problem))
    return "; ".join(parts)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir``, else ``GID_DATA_DIR``, else ``./data``: where `gid up` keeps its files."""
    return Path(data_dir or os.environ.get("GID_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


class Client:
    """A connection to the GID API at ``url`` authenticated with ``token``; close it (or use it as a
    context manager) when done. ``transport`` replaces the network (``httpx.MockTransport`` in tests)."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_environment(
        cls, *, url: str | None = None, token: str | None = None, data_dir: str | os.PathLike[str] | None = None
    ) -> "Client":
        """Each of ``url`` and ``token`` from the argument, else ``GID_URL`` / ``GID_TOKEN``, else the
        ``url`` / ``token`` file of the data directory (``resolve_data_dir``); the URL defaults to
        ``DEFAULT_URL``. Raises ``NoTokenError`` when no token is found."""
        directory = resolve_data_dir(data_dir)
        url = url or os.environ.get("GID_URL") or _read_stripped(directory / URL_FILE) or DEFAULT_URL
        token = token or os.environ.get("GID_TOKEN") or _read_stripped(directory / TOKEN_FILE)
        if not token:
            raise NoTokenError(directory / TOKEN_FILE)
        return cls(url, token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``method path`` (keyword arguments as for ``httpx.Client.request``); raises ``ApiError`` on
        an HTTP error status and ``ClientError`` when the API cannot be reached."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise self._transport_error(e, method, path) from e
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs).json()

    def download(self, path: str, dest: Path, *, resume_attempts: int = 5) -> tuple[int, str]:
        """Stream ``path`` to ``dest`` (all or nothing), checking its sha256 against the ETag.
        Returns (size in bytes, sha256 hex digest).

        A connection lost mid-way is resumed where it stopped (``Range`` with ``If-Range``, so a
        file that changed meanwhile is sent whole again), up to ``resume_attempts`` times."""
        dest = Path(dest).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        progress = _Download()
        try:
            with open(tmp, "wb") as f:
                for attempt in range(resume_attempts + 1):
                    try:
                        self._download_from(path, f, progress)
                        break
                    except httpx.TransportError:
                        if attempt == resume_attempts or not progress.etag:
                            raise  # nothing to resume against without an ETag
                f.flush()
                os.fsync(f.fileno())
            if progress.etag and progress.etag != progress.digest.hexdigest():
                raise ClientError(f"download of {path} is corrupt: sha256 {progress.digest.hexdigest()} != "
                                  f"{progress.etag}")
            os.replace(tmp, dest)
        except httpx.HTTPError as e:
            raise self._transport_error(e, "GET", path) from e
        finally:
            tmp.unlink(missing_ok=True)
        return progress.size, progress.digest.hexdigest()

    def _download_from(self, path: str, f: BinaryIO, progress: "_Download") -> None:
        """One GET of ``path`` appending to ``f`` from ``progress.size`` on."""
        headers = {"Range": f"bytes={progress.size}-", "If-Range": f'"{progress.etag}"'} if progress.size else {}
        with self.http.stream("GET", path, headers=headers) as response:
            if response.is_error:
                response.read()
                raise ApiError.from_response(response)
            if progress.size and response.status_code != 206:  # the whole file again: start over
                f.seek(0)
                f.truncate()
                progress.restart()
            progress.etag = response.headers.get("etag", "").strip('"') or None
            for chunk in response.iter_bytes():  # as received: what arrived before a cut counts
                f.write(chunk)
                progress.add(chunk)

    def _transport_error(self, error: httpx.HTTPError, method: str, path: str) -> ClientError:
        if isinstance(error, httpx.ConnectError):
            return ApiUnreachable(self.url)
        if isinstance(error, httpx.TimeoutException):
            return ClientError(f"the GID API at {self.url} did not answer in time ({method} {path})")
        return ClientError(f"{method} {self.url}{path}: {error}")

    # ------------------------------------------------------------------ resources

    def submit_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """``POST /v1/jobs``; a retry with the same ``idempotency_key`` returns the same job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.post("/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> Job:
        return self.get(f"/v1/jobs/{job_id}")

    def update_job(self, job_id: str, **changes: Any) -> Job:
        """``PATCH /v1/jobs/{id}``: ``name=`` and/or ``tags=`` (the whole list) replace the job's;
        None clears."""
        return self.patch(f"/v1/jobs/{job_id}", json=changes)

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask the worker running it to stop."""
        return self.post(f"/v1/jobs/{job_id}/cancel")

    def list_page(self, resource: str, **params: Any) -> dict[str, Any]:
        """One page of ``/v1/<resource>`` (``datasets``, ``models``, ``jobs``), newest first:
        ``{"items", "total", "limit", "offset"}``; ``params`` such as ``limit``, ``status``."""
        return self.get(f"/v1/{resource}", params={k: v for k, v in params.items() if v is not None})

    def register_dataset(
        self, *, name: str, annotations: str | None, images: str, unlabeled: bool = False
    ) -> dict[str, Any]:
        """Register a COCO dataset by its paths on the server (inside its allowed data roots);
        ``unlabeled``: images only (``annotations`` optional: a COCO file listing them)."""
        body: dict[str, Any] = {"name": name, "annotations": annotations, "images": images}
        if unlabeled:
            body["unlabeled"] = True
        return self.post("/v1/datasets", json=body)

    def list_weights(self) -> list[dict[str, Any]]:
        """torchvision's weights the server knows by name (``GET /v1/weights``), each with its
        ``file_name``, ``hash_prefix`` and whether the server has the file (``present``)."""
        return self.get("/v1/weights")

    def import_weights(self, name: str, path: Path) -> dict[str, Any]:
        """Upload torchvision's file of weights ``name`` into the server's cache. The file's sha256
        is checked against the prefix in torchvision's file name here first (``WeightsHashMismatch``,
        nothing sent); the server checks it again."""
        spec = self.get(f"/v1/weights/{name}")
        path = Path(path).expanduser()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if not digest.hexdigest().startswith(spec["hash_prefix"]):
            raise WeightsHashMismatch(path, spec, digest.hexdigest())
        with open(path, "rb") as f:
            return self.request("PUT", f"/v1/weights/{spec['name']}", content=f,
                                headers={"Content-Type": "application/octet-stream"}).json()

    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's files so far: ``[{"name", "size", "sha256", "created_at"}]``."""
        return self.get(f"/v1/jobs/{job_id}/artifacts")

    def get_spec(self, kind: str, **params: Any) -> dict[str, Any]:
        """``GET /v1/specs/{kind}``: ``body`` (a complete request with placeholders), ``placeholders``,
        ``fields`` (descriptions), ``schema``; ``params`` pick defaults (arch, weights, teacher, ...)."""
        return self.get(f"/v1/specs/{kind}", params={k: v for k, v in params.items() if v is not None})

    def get_metrics(self, job_id: str, *, names: Iterable[str] | None = None, since_step: int | None = None,
                    max_points: int | None = None) -> dict[str, dict[str, list]]:
        """The job's metric series as ``{name: {"steps": [...], "values": [...]}}`` (losses, lr,
        ``eval/AP``...); ``since_step`` fetches only newer points (pass the last step you have)."""
        params = {"names": ",".join(names) if names else None, "since_step": since_step, "max_points": max_points}
        out = self.get(f"/v1/jobs/{job_id}/metrics", params={k: v for k, v in params.items() if v is not None})
        return {name: {"steps": s["steps"], "values": s["values"]} for name, s in out["series"].items()}

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/experiments``: teacher (``model_id``, ``weights`` or ``train``), student,
        datasets and budget -> a baseline and a GID job (and the teacher's training job)."""
        return self.post("/v1/experiments", json=body)

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        """The comparison ``table`` (teacher / baseline / gid: AP..., params, seconds), ``jobs``, ``status``."""
        return self.get(f"/v1/experiments/{experiment_id}")

    def wait_for_experiment(self, experiment_id: str, *, interval: float = 2.0, timeout: float | None = None,
                            on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll the experiment until it ``succeeded`` or ``failed`` (reading it also releases its
        GID job once the teacher is trained); ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (exp := self.get_experiment(experiment_id))["status"] not in ("succeeded", "failed"):
            if on_update is not None:
                on_update(exp)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} still {exp['status']} after {timeout} s")
            time.sleep(interval)
        return exp

    def upload_dataset(
        self, *, name: str, annotations: Path | None, images_zip: Path, unlabeled: bool = False
    ) -> dict[str, Any]:
        """Upload a COCO dataset: its annotation JSON and a zip of its images (multipart).
        ``unlabeled``: images only (``annotations`` optional: a COCO file listing them)."""
        with contextlib.ExitStack() as stack:
            files = {"images": (Path(images_zip).name, stack.enter_context(open(images_zip, "rb")), "application/zip")}
            if annotations is not None:
                ann = stack.enter_context(open(annotations, "rb"))
                files["annotations"] = (Path(annotations).name, ann, "application/json")
            data = {"name": name, **({"unlabeled": "true"} if unlabeled else {})}
            return self.post("/v1/datasets", data=data, files=files)

    def upload_model(self, path: Path, *, name: str, config: dict[str, Any],
                     categories: list[str] | None = None) -> dict[str, Any]:
        """Upload a detector checkpoint (.safetensors, or a weights-only .pt/.pth) with the
        ``ModelConfig`` that rebuilds it and, optionally, its category names in label order."""
        form = {"name": name, "config": json.dumps(config)}
        if categories is not None:
            form["categories"] = json.dumps(categories)
        with open(path, "rb") as f:
            return self.post("/v1/models", data=form, files={"file": (Path(path).name, f, "application/octet-stream")})

    def wait_for_job(self, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
                     on_update: Callable[[Job], None] | None = None) -> Job:
        """Follow the job until it is succeeded, failed or cancelled and return it; ``on_update``
        sees its state after every change. Raises ``WaitTimeout`` after ``timeout`` seconds.

        Changes come from the job's event stream (``events``); if the stream cannot be used (an
        older server, a connection that keeps dropping) it polls every ``interval`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get_job(job_id)
        if on_update is not None:
            on_update(job)
        if job["status"] not in TERMINAL_STATUSES:
            try:
                job = self._wait_with_events(job, deadline, timeout, on_update)
            except WaitTimeout:
                raise
            except ClientError:
                pass  # fall back to polling
        while job["status"] not in TERMINAL_STATUSES:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(job, timeout)
            time.sleep(interval)
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
        return job

    def _wait_with_events(self, job: Job, deadline: float | None, timeout: float | None,
                          on_update: Callable[[Job], None] | None) -> Job:
        for event in self._event_stream(job["id"], deadline=deadline):
            if event is not None:
                apply_event(job, event)
                if on_update is not None:
                    on_update(job)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(job, timeout)
        job = self.get_job(job["id"])  # the stream ended with the job: its final state
        if on_update is not None:
            on_update(job)
        return job

    def events(self, job_id: str, *, after: int | None = None, reconnects: int = 5) -> Iterator["Event"]:
        """The job's events (``GET /v1/jobs/{id}/events``: ``status``, ``progress``, ``metric``,
        ``final``) from after event id ``after`` (default: the beginning) until the job ends. A
        dropped connection is resumed after the last event seen (``Last-Event-ID``), up to
        ``reconnects`` times in a row."""
        for event in self._event_stream(job_id, after=after, reconnects=reconnects):
            if event is not None:
                yield event

    def _event_stream(self, job_id: str, *, after: int | None = None, reconnects: int = 5,
                      deadline: float | None = None) -> Iterator["Event | None"]:
        """``events``, with ``None`` for every keep-alive (so a caller can check a deadline)."""
        last, failures, path = after, 0, f"/v1/jobs/{job_id}/events"
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            read = None if deadline is None else max(deadline - time.monotonic(), 0.1) + 1.0
            timeout = httpx.Timeout(self.http.timeout.connect, read=read or self.http.timeout.read)
            try:
                with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.is_error:
                        response.read()
                        raise ApiError.from_response(response)
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        raise ClientError(f"GET {path}: not an event stream")
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event is not None:
                            last = event.id
                        yield event
                return  # the server ended the stream: the job is finished
            except httpx.TransportError as e:
                if deadline is not None and time.monotonic() > deadline:
                    yield None  # let the caller raise its timeout
                    continue
                failures += 1
                if failures > reconnects:
                    raise self._transport_error(e, "GET", path) from e
                time.sleep(min(0.5 * 2 ** failures, 5.0))

    def logs(self, job_id: str, *, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        """The job's log text as it arrives (``GET /v1/jobs/{id}/logs``): all of it, or its last
        ``tail`` lines; with ``follow``, then what is written until the job ends."""
        params: dict[str, Any] = {"follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = tail
        path = f"/v1/jobs/{job_id}/logs"
        timeout = httpx.Timeout(self.http.timeout.connect, read=None) if follow else self.http.timeout
        try:
            with self.http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                yield from response.iter_text()
        except httpx.HTTPError as e:
            raise self._transport_error(e, "GET", path) from e


@dataclass(frozen=True)
class Event:
    """One event of a job: ``id`` (growing), ``event`` (``status`` | ``progress`` | ``metric`` |
    ``final``) and its JSON ``data`` (see ``GET /v1/jobs/{id}/events`` in the OpenAPI document)."""

    id: int
    event: str
    data: Any


def parse_sse(lines: Iterable[str]) -> Iterator[Event | None]:
    """Server-Sent Events from text lines: an ``Event`` per message, ``None`` per comment
    (keep-alive); messages without an integer id or JSON data are skipped."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        line = line.rstrip("\r\n")
        if line.startswith(":"):
            yield None
            continue
        if line:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
            continue
        if "data" in fields and "id" in fields:
            try:
                yield Event(int(fields["id"][-1]), fields.get("event", ["message"])[-1],
                            json.loads("\n".join(fields["data"])))
            except ValueError:
                pass
        fields = {}


def apply_event(job: Job, event: Event) -> None:
    """Bring a job dict up to date with one of its events (what ``wait_for_job`` shows)."""
    if event.event == "status":
        job["status"] = event.data.get("status", job["status"])
        for key in ("error", "cancel_requested"):
            if key in event.data:
                job[key] = event.data[key]
        if "attempt" in event.data:
            job["attempts"] = event.data["attempt"]
    elif event.event == "progress":
        job["progress"] = event.data
    elif event.event == "metric":
        job["latest_metrics"] = {**event.data.get("values", {}), "iteration": event.data.get("step")}
    elif event.event == "final":
        job["final_metrics"] = event.data.get("metrics")


class _Download:
    """What a download has received so far: bytes, their running sha256, the file's ETag."""

    def __init__(self) -> None:
        self.restart()
        self.etag: str | None = None

    def restart(self) -> None:
        self.size, self.digest = 0, hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.digest.update(chunk)


def _read_stripped(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
