"""The app under a real uvicorn server on loopback, in a thread of the test process.

``TestClient`` calls the ASGI app directly; what only a real server shows (a connection closed after
an error, the bytes on the wire) needs this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from gid_core.processes import free_port


@contextmanager
def serve(app: FastAPI, *, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` (its lifespan included) until the block ends; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on port {port} within {startup_timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
