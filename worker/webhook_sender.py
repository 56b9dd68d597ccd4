"""The webhook sender: a daemon thread of every worker node's main process that calls the
webhooks of finished jobs (``service.webhooks.deliver_due``) every ``GID_WEBHOOK_POLL_SECONDS``.

Started by Celery's ``worker_ready`` signal and stopped by ``worker_shutdown``, like the reaper.
Several nodes may sweep at once: each delivery is claimed by a conditional UPDATE first, so it is
sent by one of them. Training never waits for it (it runs beside the job's pool process).
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from service.core.config import settings

logger = logging.getLogger(__name__)


class WebhookThread(threading.Thread):
    def __init__(self, *, period: float) -> None:
        super().__init__(name="gid-webhooks", daemon=True)
        self.period = period
        self.stopped = threading.Event()

    def run(self) -> None:
        from service import webhooks
        from service.core.db import make_engine, make_session_factory, session_scope

        engine = make_engine(settings.database_url)
        factory = make_session_factory(engine)
        try:
            while not self.stopped.is_set():
                try:
                    with session_scope(factory) as session:
                        webhooks.deliver_due(session, settings=settings)
                except Exception:
                    logger.exception("webhook sweep failed (retrying next period)")
                self.stopped.wait(self.period)
        finally:
            engine.dispose()

    def stop(self) -> None:
        self.stopped.set()


_thread: WebhookThread | None = None


@worker_ready.connect
def _start(**_kwargs) -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = WebhookThread(period=settings.webhook_poll_seconds)
        _thread.start()


@worker_shutdown.connect
def _stop(**_kwargs) -> None:
    if _thread is not None:
        _thread.stop()
