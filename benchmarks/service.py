"""How fast is the service around the training? (``make bench-service``)

Against the embedded stack (``gid.embedded.EmbeddedStack``, what ``gid up`` runs: Redis, the
API under uvicorn, one Celery worker, SQLite), on loopback only:

1. ``submit``: ``POST /v1/jobs`` latency, on an idle stack and while a job trains (a burst of
   submissions that queue behind it and are cancelled afterwards);
2. ``to_running``: time from submission to ``running``, as a client polling every 20 ms sees it
   and as the server records it (``started_at - created_at``);
3. ``poll``: ``GET /v1/jobs/{id}`` latency p50/p90/p99 with 50 concurrent pollers (async httpx,
   one connection each) while a job trains. ``--poll-interval`` is each poller's period (a UI
   refreshing once a second is 1.0); closed-loop phases (no pause, ``--saturation-pollers``) show
   saturation and what happens past it;
4. ``download``: artifact download throughput (streamed ``GET /v1/jobs/{id}/artifacts/{name}``,
   sha256 checked) against a plain read of the same file from disk, both from the page cache.

Every phase is bounded in count and time. The stack lives in a temporary data directory that is
removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from gid_core.fileio import write_json_atomic
from service.status import TERMINAL_STATUSES

from .common import RESULTS_DIR, format_table, machine_info, save_figure_atomic


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """count, mean, p50/p90/p99 (nearest rank on the sorted samples) and max, in milliseconds."""
    if not values:
        return {"count": 0}
    ms = sorted(1e3 * v for v in values)

    def rank(p: float) -> float:  # nearest rank: the smallest sample >= p % of all samples
        return ms[min(len(ms) - 1, max(0, math.ceil(p / 100.0 * len(ms)) - 1))]

    return {"count": len(ms), "mean": statistics.fmean(ms), "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ms[-1]}


# ------------------------------------------------------------------------------------ stack


class Client:
    """A synchronous httpx client on the stack's API with its token."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def call(self, method: str, path: str, expect: Sequence[int] = (200,), **kw) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code not in expect:
            raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, predicate, *, timeout: float, what: str, period: float = 0.02) -> tuple[dict, float]:
        """Polls until ``predicate(job)``; returns (job, seconds waited)."""
        start = time.perf_counter()
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job, time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f} s (status {job['status']})")
            time.sleep(period)


def job_body(dataset_ids: dict[str, str], *, max_iters: int, name: str, image_size: int, num_classes: int) -> dict:
    """A small RetinaNet train job (the same model family the benchmarks use)."""
    return {
        "kind": "train",
        "name": name,
        "student": {"arch": "retinanet", "backbone": "resnet18", "num_classes": num_classes, "fpn_channels": 32,
                    "norm": "gn", "min_size": image_size, "max_size": image_size, "anchor_sizes": [8, 16, 32, 64, 128]},
        "train_dataset": dataset_ids["train"],
        "val_dataset": dataset_ids["val"],
        "hyperparameters": {"max_iters": max_iters, "batch_size": 4, "lr": 0.01, "warmup_iters": 0, "num_workers": 0,
                            "log_period": 10, "checkpoint_period": max(10, max_iters), "amp": False},
    }


def _server_seconds(job: dict[str, Any], start_key: str, end_key: str) -> float | None:
    from datetime import datetime

    if not job.get(start_key) or not job.get(end_key):
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(job[end_key]) - parse(job[start_key])).total_seconds()


# ------------------------------------------------------------------------------------ phases


def submit(client: Client, body: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    job = client.call("POST", "/v1/jobs", expect=(201,), json=body)
    return job, time.perf_counter() - start


async def _poll(url: str, token: str, job_id: str, *, pollers: int, seconds: float, interval: float,
                max_requests: int) -> dict[str, Any]:
    """``pollers`` concurrent loops of GET /v1/jobs/{id} for ``seconds`` (or ``max_requests`` in total)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    error_kinds: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=30) as http:

        async def poller(k: int) -> None:
            nonlocal errors
            rng = random.Random(k)
            if interval > 0:
                await asyncio.sleep(rng.uniform(0, interval))  # spread the pollers over one period
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                t0 = time.perf_counter()
                try:
                    r = await http.get(f"/v1/jobs/{job_id}")
                    ok = r.status_code == 200
                    kind = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, kind = False, type(e).__name__
                if not ok:
                    error_kinds[kind] = error_kinds.get(kind, 0) + 1
                dt = time.perf_counter() - t0
                if not ok:
                    errors += 1
                else:
                    latencies.append(dt)
                    status = r.json()["status"]
                    statuses[status] = statuses.get(status, 0) + 1
                if interval > 0:
                    await asyncio.sleep(max(0.0, interval - dt))

        start = time.perf_counter()
        await asyncio.gather(*(poller(k) for k in range(pollers)))
        wall = time.perf_counter() - start
    return {**percentiles(latencies), "pollers": pollers, "interval_s": interval, "seconds": wall,
            "requests_per_second": len(latencies) / wall, "errors": errors, "error_kinds": error_kinds,
            "statuses_seen": statuses,
            "samples_ms": [round(1e3 * v, 3) for v in latencies]}


def poll_phase(client: Client, job_id: str, **kw: Any) -> dict[str, Any]:
    return asyncio.run(_poll(client.url, client.token, job_id, **kw))


def _read_plain(path: Path, *, hash_bytes: bool, chunk: int = 1 << 20) -> tuple[float, str]:
    digest = hashlib.sha256()
    start = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if hash_bytes:
                digest.update(block)
    return time.perf_counter() - start, digest.hexdigest()


def _download_httpx(client: Client, job_id: str, name: str) -> tuple[float, str, int]:
    """What ``gid download`` does per byte: stream in 1 MiB pieces and hash them."""
    digest = hashlib.sha256()
    size = 0
    start = time.perf_counter()
    with client.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
        if r.status_code != 200:
            raise RuntimeError(f"download {name}: HTTP {r.status_code}")
        for block in r.iter_bytes(1 << 20):
            digest.update(block)
            size += len(block)
    return time.perf_counter() - start, digest.hexdigest(), size


def _download_curl(client: Client, job_id: str, name: str) -> tuple[float, int]:
    """curl to /dev/null: a C client, so the time is the server's (and the loopback's), not Python's."""
    start = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", "-H", f"Authorization: Bearer {client.token}",
         f"{client.url}/v1/jobs/{job_id}/artifacts/{name}"], capture_output=True, text=True, check=True, timeout=600)
    return time.perf_counter() - start, int(float(out.stdout.strip() or 0))


def download_phase(client: Client, job_id: str, job_dir: Path, *, repeats: int) -> dict[str, Any]:
    """The largest artifact: downloaded (curl; httpx + sha256 like ``gid download``) and read
    plainly from disk (without / with sha256), ``repeats`` times each, interleaved; medians."""
    artifacts = client.call("GET", f"/v1/jobs/{job_id}/artifacts")
    art = max(artifacts, key=lambda a: a["size"])
    # The artifact's file in the job's folder: same size and sha256 (the API does not expose paths).
    path = next(p for p in job_dir.rglob("*") if p.is_file() and p.stat().st_size == art["size"]
                and _read_plain(p, hash_bytes=True)[1] == art["sha256"])
    has_curl = shutil.which("curl") is not None
    _download_httpx(client, job_id, art["name"])  # warm the page cache and the connection
    times: dict[str, list[float]] = {"curl": [], "httpx_sha256": [], "plain": [], "plain_sha256": []}
    for _ in range(repeats):
        t, digest, size = _download_httpx(client, job_id, art["name"])
        if digest != art["sha256"] or size != art["size"]:
            raise RuntimeError(f"downloaded {art['name']} does not match its sha256/size")
        times["httpx_sha256"].append(t)
        if has_curl:
            t, size = _download_curl(client, job_id, art["name"])
            if size != art["size"]:
                raise RuntimeError(f"curl got {size} bytes of {art['name']}, expected {art['size']}")
            times["curl"].append(t)
        times["plain"].append(_read_plain(path, hash_bytes=False)[0])
        times["plain_sha256"].append(_read_plain(path, hash_bytes=True)[0])
    mib = art["size"] / 2**20
    rate = {k: mib / statistics.median(v) for k, v in times.items() if v}
    out = {"artifact": art["name"], "size_bytes": art["size"], "repeats": repeats,
           "MiB_per_s": rate, "seconds": times,
           "ratio_httpx_sha256_vs_plain_sha256": rate["httpx_sha256"] / rate["plain_sha256"]}
    if has_curl:
        out["ratio"] = rate["curl"] / rate["plain"]  # the headline: server delivery vs reading the file
    else:
        out["ratio"] = out["ratio_httpx_sha256_vs_plain_sha256"]
    return out


def training_pids(job_dir: Path) -> list[int]:
    """Live processes whose working directory is the job's folder (its training child and ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == job_dir:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# ------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gid_core.config import SyntheticDatasetConfig
    from gid_core.synthetic import make_synthetic_dataset
    from gid.embedded import EmbeddedStack
    from gid_core.processes import free_port

    data_dir = Path(tempfile.mkdtemp(prefix="gid-bench-service-"))
    stack = EmbeddedStack(data_dir, port=free_port(), startup_timeout=180)
    report: dict[str, Any] = {"data_dir": str(data_dir)}
    t0 = time.perf_counter()
    stack.start()
    report["stack_start_seconds"] = time.perf_counter() - t0
    print(f"stack up in {report['stack_start_seconds']:.1f} s at {stack.url}", flush=True)
    try:
        client = Client(stack.url, stack.token or "")
        data = make_synthetic_dataset(SyntheticDatasetConfig(
            output_dir=data_dir / "synthetic", num_train=32, num_val=8, image_size=args.image_size,
            num_classes=3, max_objects=4, seed=0))
        ids = {split: client.call("POST", "/v1/datasets", expect=(201,), json={
            "name": f"bench-{split}", "annotations": data[f"{split}_annotations"], "images": data[f"{split}_images"]})["id"]
            for split in ("train", "val")}
        body = lambda iters, name: job_body(ids, max_iters=iters, name=name, image_size=args.image_size, num_classes=3)  # noqa: E731

        # 1-2. idle stack: submit a short job, time to running, let it finish (its artifacts are used in 4).
        submit_idle, to_running, to_running_server, short_jobs = [], [], [], []
        for i in range(args.rounds):
            job, t = submit(client, body(args.short_iters, f"short-{i}"))
            submit_idle.append(t)
            _, waited = client.wait(job["id"], lambda j: j["status"] != "queued", timeout=120, what="running")
            to_running.append(t + waited)
            done, _ = client.wait(job["id"], lambda j: j["status"] in TERMINAL_STATUSES, timeout=600, what="the end",
                                  period=0.2)
            if done["status"] != "succeeded":
                raise RuntimeError(f"short job {job['id']} ended {done['status']}: {done.get('error')}")
            to_running_server.append(_server_seconds(done, "created_at", "started_at"))
            short_jobs.append(done)
            print(f"  round {i}: submit {1e3 * t:.1f} ms, running after {to_running[-1]:.2f} s "
                  f"(server {to_running_server[-1]:.2f} s)", flush=True)

        # 3. the API alone (nothing trains), then while a long job trains.
        poll_kw = dict(pollers=args.pollers, interval=args.poll_interval, max_requests=args.max_requests)
        idle = poll_phase(client, short_jobs[-1]["id"], seconds=args.poll_seconds, **poll_kw)
        _print_poll("idle stack", idle)
        long_job, t = submit(client, body(args.long_iters, "long"))
        submit_idle.append(t)
        _, waited = client.wait(long_job["id"], lambda j: j["status"] != "queued", timeout=120, what="running")
        to_running.append(t + waited)
        client.wait(long_job["id"],
                    lambda j: (j["progress"] or {}).get("iteration", 0) >= 1 or j["status"] in TERMINAL_STATUSES,
                    timeout=300, what="the first iteration", period=0.2)
        poll = poll_phase(client, long_job["id"], seconds=args.poll_seconds, **poll_kw)
        _print_poll("while training", poll)
        saturation = []
        for pollers in args.saturation_pollers:
            sat = poll_phase(client, long_job["id"], seconds=args.saturation_seconds,
                             **{**poll_kw, "pollers": pollers, "interval": 0.0})
            _print_poll("while training, closed-loop", sat)
            saturation.append(sat)
        reniced = None
        if args.nice_training is not None:
            # Experiment: the training processes at a lower CPU priority (what a worker could do).
            job_dir = data_dir / "jobs" / long_job["id"]
            pids = training_pids(job_dir)
            for pid in pids:
                os.setpriority(os.PRIO_PROCESS, pid, args.nice_training)
            reniced = poll_phase(client, long_job["id"], seconds=args.poll_seconds, **poll_kw)
            reniced["reniced_pids"] = len(pids)
            reniced["nice"] = args.nice_training
            _print_poll(f"while training at nice {args.nice_training}", reniced)
        submit_busy, queued = [], []
        for i in range(args.burst):
            job, t = submit(client, body(args.short_iters, f"burst-{i}"))
            submit_busy.append(t)
            queued.append(job["id"])
        still_training = client.job(long_job["id"])["status"] == "running"
        for job_id in queued:
            client.call("POST", f"/v1/jobs/{job_id}/cancel", expect=(200, 409))
        client.call("POST", f"/v1/jobs/{long_job['id']}/cancel", expect=(200, 409))
        long_done, _ = client.wait(long_job["id"], lambda j: j["status"] in TERMINAL_STATUSES, timeout=300,
                                   what="the end", period=0.2)
        to_running_server.append(_server_seconds(long_done, "created_at", "started_at"))

        # 4. artifact download vs a plain read (nothing trains now).
        last = short_jobs[-1]
        download = download_phase(client, last["id"], data_dir / "jobs" / last["id"], repeats=args.download_repeats)
        rates = download["MiB_per_s"]
        print(f"  download {download['artifact']} ({download['size_bytes'] / 2**20:.1f} MiB): "
              + ", ".join(f"{k} {v:.0f} MiB/s" for k, v in rates.items()), flush=True)
        report.update(
            submit_idle=percentiles(submit_idle), submit_while_training=percentiles(submit_busy),
            burst_submitted_while_training=still_training,
            to_running_client=percentiles(to_running),
            to_running_server=percentiles([s for s in to_running_server if s is not None]),
            poll_idle=idle, poll=poll, poll_saturation=saturation, poll_reniced=reniced, download=download,
            long_job_status=long_done["status"], long_job_error=long_done.get("error"),
        )
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    return report


def _print_poll(label: str, p: dict[str, Any]) -> None:
    if not p["count"]:
        print(f"  GET /v1/jobs/{{id}}, {p['pollers']} pollers, {label}: no successful request "
              f"({p['errors']} errors: {p['error_kinds']})", flush=True)
        return
    print(f"  GET /v1/jobs/{{id}}, {p['pollers']} pollers, {label}: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, "
          f"{p['requests_per_second']:.0f} req/s, {p['errors']} errors", flush=True)


def summary_table(r: dict[str, Any]) -> str:
    rows = []
    for label, key in (("POST /v1/jobs (idle stack)", "submit_idle"), ("POST /v1/jobs (while training)", "submit_while_training"),
                       ("submission -> running (client, 20 ms polls)", "to_running_client"),
                       ("submission -> running (server timestamps)", "to_running_server")):
        p = r[key]
        rows.append([label, p["count"], p["p50"], p["p90"], p["p99"], p["max"], ""])
    polls = [("idle stack", r["poll_idle"]), ("while training", r["poll"])]
    polls += [("while training, closed-loop", p) for p in r["poll_saturation"]]
    if r.get("poll_reniced"):
        polls.append(("while training at lower priority", r["poll_reniced"]))
    for label, p in polls:
        every = f", every {p['interval_s']:g} s" if p["interval_s"] else ""
        name = f"GET /v1/jobs/{{id}}, {p['pollers']} pollers{every}, {label}"
        if not p["count"]:
            rows.append([name, 0, "-", "-", "-", "-", f"{p['errors']} errors {p['error_kinds']}"])
            continue
        errors = f", {p['errors']} errors" if p["errors"] else ""
        rows.append([name, p["count"], p["p50"], p["p90"], p["p99"], p["max"], f"{p['requests_per_second']:.0f} req/s{errors}"])
    table = format_table(["measurement", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "throughput"], rows)
    d = r["download"]
    rates = d["MiB_per_s"]
    table += f"\n\nartifact download: {d['artifact']}, {d['size_bytes'] / 2**20:.1f} MiB, median of {d['repeats']}\n"
    table += format_table(["path", "MiB/s", "vs plain read"], [
        *([["HTTP, curl -> /dev/null", rates["curl"], rates["curl"] / rates["plain"]]] if "curl" in rates else []),
        ["plain read (1 MiB chunks)", rates["plain"], 1.0],
        ["HTTP, httpx stream + sha256 (gid download)", rates["httpx_sha256"], rates["httpx_sha256"] / rates["plain_sha256"]],
        ["plain read + sha256", rates["plain_sha256"], 1.0],
    ])
    return table


def plot_latencies(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    every = f"every {r['poll']['interval_s']:g} s"
    series = [(r["poll_idle"], f"{every}, idle stack"), (r["poll"], f"{every}, training")]
    series += [(p, "closed-loop, training") for p in r["poll_saturation"]]
    if r.get("poll_reniced"):
        series.append((r["poll_reniced"], f"{every}, training at lower priority"))
    for p, label in series:
        ms = sorted(p["samples_ms"])
        if ms:
            ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=f"{p['pollers']} pollers, {label}")
    ax.axvline(20, color="grey", ls=":", label="p99 target 20 ms")
    ax.set_xscale("log")
    ax.set_xlabel("GET /v1/jobs/{id} latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Job status latency while a job trains (CDF)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="idle-stack submit -> running rounds")
    parser.add_argument("--short-iters", type=int, default=4, help="iterations of the short jobs")
    parser.add_argument("--long-iters", type=int, default=100_000, help="the job trained during polling (cancelled)")
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between one poller's requests")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--saturation-pollers", type=int, nargs="+", default=[20, 50],
                        help="closed-loop phases (no pause between a poller's requests), one per count")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap per polling phase")
    parser.add_argument("--burst", type=int, default=20, help="submissions while the long job trains")
    parser.add_argument("--download-repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--nice-training", type=int, default=None, metavar="N",
                        help="experiment: renice the training processes to N and poll once more")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data directory")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("rounds", "short_iters", "long_iters", "pollers", "max_requests", "download_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.saturation_pollers):
        parser.error("--saturation-pollers must be >= 1 each")
    if args.poll_interval < 0 or args.poll_seconds <= 0 or args.saturation_seconds <= 0:
        parser.error("--poll-interval must be >= 0 and the phase durations > 0")

    report = run(args)
    report["machine"] = machine_info()
    report["command"] = "python -m benchmarks.service " + " ".join(sys.argv[1:] if argv is None else argv)
    report["targets"] = {
        "poll_p99_ms": report["poll"].get("p99"), "poll_p99_le_20ms": (report["poll"].get("p99") or 1e9) <= 20.0,
        "closed_loop_errors": {p["pollers"]: p["errors"] for p in report["poll_saturation"]},
        "download_ratio": report["download"]["ratio"], "download_ge_80pct": report["download"]["ratio"] >= 0.8,
    }
    print("\n" + summary_table(report), flush=True)
    write_json_atomic(args.out / "service.json", report)
    plot_latencies(report, args.out / "service_latency.png")
    print(f"wrote {args.out / 'service.json'} and {args.out / 'service_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
