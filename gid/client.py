"""The Python client of the GID REST API.

::

    from gid.client import Client

    with Client.from_environment() as client:           # GID_URL / GID_TOKEN, or what `gid up` wrote
        job = client.submit_job(json.load(open("job.json")))
        job = client.wait_for_job(job["id"], on_update=lambda j: print(j["progress"]))
        client.download(f"/v1/models/{job['output_model_id']}/download", Path("student.safetensors"))

Responses are the API's JSON (``dict``); the schemas are in the OpenAPI document at ``/docs``.
Every failure raises a ``ClientError``: ``ApiError`` when the API answered with an HTTP error (its
``status_code`` and structured ``detail``), ``ApiUnreachable`` when nothing answers at the URL,
``NoTokenError`` when no token was found.

Only ``httpx`` and the job status names: the client runs without the server's libraries.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
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

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask the worker running it to stop."""
        return self.post(f"/v1/jobs/{job_id}/cancel")

    def list_page(self, resource: str, **params: Any) -> dict[str, Any]:
        """One page of ``/v1/<resource>`` (``datasets``, ``models``, ``jobs``), newest first:
        ``{"items", "total", "limit", "offset"}``; ``params`` such as ``limit``, ``status``."""
        return self.get(f"/v1/{resource}", params={k: v for k, v in params.items() if v is not None})

    def register_dataset(self, *, name: str, annotations: str, images: str) -> dict[str, Any]:
        """Register a COCO dataset by its paths on the server (inside its allowed data roots)."""
        return self.post("/v1/datasets", json={"name": name, "annotations": annotations, "images": images})

    def wait_for_job(self, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
                     on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll the job every ``interval`` seconds until it is succeeded, failed or cancelled and
        return it; ``on_update`` sees every state polled. Raises ``WaitTimeout`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(job, timeout)
            time.sleep(interval)


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
