"""Job webhooks: ``POST <webhook_url>`` when a job reaches a terminal state.

A job submitted with ``webhook_url`` gets a ``webhook_deliveries`` row in the very transaction that
makes it succeeded, failed or cancelled (``enqueue``, called by ``crud.set_job_status``), whoever
ends it: the worker, the API (a queued job cancelled) or the reaper. Nothing is sent there: the
worker's sweeper (``worker.webhook_sender``) calls ``deliver_due`` every ``webhook_poll_seconds``,
so a slow or dead receiver never holds up a job or a request.

Each call is one JSON body (``payload``) with the headers ``X-GID-Event: job.finished``,
``X-GID-Delivery: <delivery id>`` and, when the job has a ``webhook_secret`` or else
``GID_WEBHOOK_SECRET`` is set, ``X-GID-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``
(compare it in constant time). Any 2xx answer delivers it; anything else (an error status, a
redirect: never followed, a timeout, no connection) is tried again after
``webhook_backoff_seconds``, doubled each time, up to ``webhook_max_attempts`` calls.

Targets. The URL is the submitter's but the call comes from inside the cluster, so unless
``GID_WEBHOOK_ALLOW_PRIVATE`` only public addresses are called (``address_refusal``): an IP
literal that is not is a 422 at submission (``submission_refusal``); at delivery the host name is
resolved, every address it has is checked, and the call goes to the checked address itself (the
name kept in ``Host`` and TLS's SNI, so the certificate is still verified against it): a second
resolution cannot swap in another address. A refused target fails the delivery at once, with why.
A sender claims a delivery with a conditional UPDATE before calling, so concurrent sweepers of
several worker nodes send it once; a sender that dies after claiming leaves it to be retried.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from service.models import Job, WebhookDelivery, utcnow

logger = logging.getLogger(__name__)

EVENT = "job.finished"
SIGNATURE_HEADER = "X-GID-Signature-256"
MAX_ERROR_CHARS = 500


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Checked in this order, so an address reads as the most specific of its kinds.
_REFUSED_KINDS = (("is_unspecified", "unspecified"), ("is_loopback", "loopback"), ("is_link_local", "link-local"),
                  ("is_multicast", "multicast"), ("is_private", "private"))
ALLOW_HINT = "webhooks call public addresses only (GID_WEBHOOK_ALLOW_PRIVATE=true lets them call others)"


def address_refusal(address: IPAddress) -> str | None:
    """Why a webhook may not call ``address`` (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for flag, kind in _REFUSED_KINDS:
        if getattr(address, flag):
            return f"{address} is a {kind} address"
    if not address.is_global:  # reserved, shared (100.64.0.0/10), documentation ranges
        return f"{address} is not a public address"
    return None


def submission_refusal(url: str, *, allow_private: bool) -> str | None:
    """At submission, without resolving names: why ``url``'s host may not be called, when it is an
    IP literal (or ``localhost``). A host name is checked after resolution, at delivery."""
    if allow_private:
        return None
    host = httpx.URL(url).host
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return f"{host} is a loopback address: {ALLOW_HINT}"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    refusal = address_refusal(address)
    return f"{refusal}: {ALLOW_HINT}" if refusal else None


class Unresolved(Exception):
    """The host name did not resolve (a transient failure: the call is tried again later)."""


def pinned_target(url: str, *, allow_private: bool) -> tuple[httpx.URL, str | None]:
    """``(url to call, refusal)``: the URL with its host replaced by the address it resolves to,
    once every address the name has was found public; a refusal (why not) otherwise."""
    target = httpx.URL(url)
    if allow_private:
        return target, None
    host = target.raw_host.decode("ascii")  # IDNA-encoded, brackets of an IPv6 literal removed
    try:
        infos = socket.getaddrinfo(host, target.port or (443 if target.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise Unresolved(f"{host}: {e}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        refusal = address_refusal(address)
        if refusal:
            return target, f"{host} resolves to {refusal}: {ALLOW_HINT}"
    return target.copy_with(host=str(addresses[0])), None


def enqueue(session: Session, *, job_id: str, status: str) -> None:
    """Queue the call of the job's webhook, if it has one (no commit: part of the status change)."""
    url = session.scalar(select(Job.webhook_url).where(Job.id == job_id))
    if url:
        now = utcnow()
        session.execute(insert(WebhookDelivery).values(
            job_id=job_id, url=url, status=status, attempts=0, next_attempt_at=now, created_at=now))


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(job: Job, delivery_id: int) -> dict[str, Any]:
    return {
        "event": EVENT,
        "delivery_id": delivery_id,
        "sent_at": utcnow().isoformat(),
        "job": {
            "id": job.id, "name": job.name, "kind": job.kind, "status": job.status, "error": job.error,
            "attempts": job.attempts, "final_metrics": job.final_metrics, "output_model_id": job.output_model_id,
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        },
    }


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    job_id: str
    attempt: int
    delivered: bool
    error: str | None


def deliver_due(session: Session, *, settings, now: datetime | None = None, limit: int = 20,
                http: httpx.Client | None = None) -> list[Attempt]:
    """Send the deliveries that are due (oldest first); returns what each call did."""
    now = now or utcnow()
    due = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None),
               WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    session.commit()
    own = http is None
    http = http or httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
    try:
        return [a for delivery_id, attempts in due
                if (a := _deliver_one(session, http, settings, delivery_id, attempts, now)) is not None]
    finally:
        if own:
            http.close()


def _deliver_one(session: Session, http: httpx.Client, settings, delivery_id: int, attempts: int,
                 now: datetime) -> Attempt | None:
    # Claim: count the attempt and push the next one past this call's timeout, unless another
    # sender did so first. If this process dies mid-call, the delivery is retried then.
    claimed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts,
               WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None))
        .values(attempts=attempts + 1,
                next_attempt_at=now + timedelta(seconds=2 * settings.webhook_timeout_seconds + 1))
        .execution_options(synchronize_session=False)
    )
    delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    job = session.get(Job, delivery.job_id, populate_existing=True) if delivery is not None else None
    session.commit()
    if claimed.rowcount != 1 or delivery is None or job is None:
        return None
    error, refused = _call(http, settings, delivery.url, job, delivery_id)
    attempt = attempts + 1
    done = utcnow()
    if error is None:
        values: dict[str, Any] = {"delivered_at": done, "last_error": None}
    elif refused or attempt >= settings.webhook_max_attempts:
        values = {"failed_at": done, "last_error": error}
        logger.warning("job %s: webhook given up at attempt %d: %s", job.id, attempt, error)
    else:
        delay = settings.webhook_backoff_seconds * 2 ** (attempt - 1)
        values = {"next_attempt_at": done + timedelta(seconds=delay), "last_error": error}
        logger.info("job %s: webhook call %d failed (%s); again in %.1f s", job.id, attempt, error, delay)
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))
    session.commit()
    return Attempt(delivery_id, job.id, attempt, error is None, error)


def _call(http: httpx.Client, settings, url: str, job: Job, delivery_id: int) -> tuple[str | None, bool]:
    """``(error, refused)``: what went wrong (None: delivered), and whether the target itself is
    refused (no retry can help: the delivery fails at once)."""
    try:
        target, refusal = pinned_target(url, allow_private=settings.webhook_allow_private)
    except Unresolved as e:
        return f"Unresolved: {e}"[:MAX_ERROR_CHARS], False
    if refusal is not None:
        return refusal[:MAX_ERROR_CHARS], True
    secret = job.webhook_secret or settings.webhook_secret  # the job's own key, else the server's
    return _post(http, url, target, payload(job, delivery_id), secret, delivery_id), False


def _post(http: httpx.Client, url: str, target: httpx.URL, body: dict[str, Any], secret: str | None,
          delivery_id: int) -> str | None:
    """One call of ``url`` at ``target`` (its checked address); None when the receiver answered
    2xx, else what went wrong (one line)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    named = httpx.URL(url)
    headers = {"Content-Type": "application/json", "User-Agent": "gid-webhooks/1",
               "X-GID-Event": EVENT, "X-GID-Delivery": str(delivery_id),
               "Host": named.netloc.decode("ascii")}
    if secret:
        headers[SIGNATURE_HEADER] = sign(raw, secret)
    # TLS is verified against the name, not the address the connection goes to
    extensions = {"sni_hostname": named.raw_host.decode("ascii")} if named.scheme == "https" else {}
    try:
        response = http.post(target, content=raw, headers=headers, extensions=extensions, follow_redirects=False)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    if response.is_success:
        return None
    return f"HTTP {response.status_code}"
