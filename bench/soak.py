"""Soak run (issue 7): a real server at a steady rate for N minutes; memory and p99 must stay flat.

Not part of CI: it takes minutes and wants a quiet machine. It starts ``python -m service`` on a
free loopback port (with ``bench/harness.py``, the kit tests and benchmarks share), drives
``POST /predict`` with ``hey`` in one-minute windows at a fixed rate, and samples the server's
resident memory (``VmRSS``) throughout. Per window it records requests, answered rate, 503s,
errors, latency percentiles, and RSS before, after and at peak; then writes
``<out>/soak.json`` and ``<out>/soak.md``. A leak shows as RSS climbing window after window, a
queue that never drains as p99 climbing; a steady service shows neither. To tell a server that
slows down from a machine that does, each window also records what the server's own metrics say
(mean images per batch, model time per batch, queue wait per image) and the CPU time the server
used against the CPU time everything else on the machine used (the load generator included).

    .venv/bin/python bench/soak.py                        # 10 minutes at 40 requests/s
    .venv/bin/python bench/soak.py --minutes 0.2 --out /tmp/soak   # smoke: a 12 s window

``hey`` is Debian's package of the Go load generator: ``apt-get install hey``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = REPO / "models" / "cifar10-resnet"
sys.path.insert(0, str(REPO))  # the packages, from a plain checkout
sys.path.insert(0, str(REPO / "bench"))  # harness and fixtures, also under `python -m`

from fixtures import encode, make_bundle, random_image  # noqa: E402
from harness import (  # noqa: E402
    Body,
    camserve,
    cpu_model,
    machine_cpu_seconds,
    metric,
    multipart_body,
    process_cpu_seconds,
    require_hey,
    rss_bytes,
    run_hey,
    scrape,
)


@dataclass
class Window:
    """One window of steady load, as ``hey`` and the RSS sampler saw it."""

    index: int
    seconds: float
    requests: int
    rate: float  # answered requests per second
    statuses: dict[str, int]
    rejected: int  # 503: shed by the bounded queue
    errors: int  # transport errors and any status other than 200 and 503
    latency_ms: dict[str, float | None]  # p50, p90, p99, slowest, average over answered requests (None: none)
    rss_mb_before: float
    rss_mb_after: float
    rss_mb_peak: float
    server: dict[str, float | None]  # batch_size, model_ms (per batch), queue_wait_ms (per image), from /metrics
    cpu_s: dict[str, float]  # server, other (everything else on the machine), steal


def server_counters(base: str) -> dict[str, float]:
    """Sums and counts of the /predict batch histograms."""
    histograms = ("camserve_batch_size", "camserve_inference_seconds", "camserve_queue_wait_seconds")
    samples = scrape(base)
    return {
        f"{name}{suffix}": metric(samples, f"{name}{suffix}", endpoint="/predict")
        for name in histograms
        for suffix in ("_sum", "_count")
    }


def per_batch(before: dict[str, float], after: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    return round(scale * total / count, 2) if count else None


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(this process's CPU s, the whole machine's busy CPU s, steal s) since boot, from /proc."""
    return (process_cpu_seconds(pid), *machine_cpu_seconds())


# -- the server's memory ----------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    """Resident set size from /proc: what the kernel charges the server for."""
    return rss_bytes(pid) / 2**20


class RssSampler:
    """Samples RSS every ``interval_s`` on a thread, so peaks between window edges are seen too."""

    def __init__(self, pid: int, interval_s: float = 2.0) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float, until: float) -> float:
        return max((mb for t, mb in self.samples if since <= t <= until), default=0.0)


# -- load -------------------------------------------------------------------------------------------
def request_body(images: int, path: Path) -> Body:
    """A /predict body with ``images`` distinct 32x32 PNGs (hey sends the same body each time)."""
    return multipart_body([(f"{i}.png", encode(random_image(9000 + i))) for i in range(images)], path)


def latency_ms(parsed: dict) -> dict[str, float]:
    """p50/p90/p99, slowest and average of one hey run, in ms (NaN where hey printed none)."""
    percentiles, ms = parsed["percentiles_s"], {}
    for p in (50, 90, 99):
        ms[f"p{p}"] = percentiles[p] * 1000 if p in percentiles else math.nan
    for name in ("slowest", "average"):
        seconds = parsed[f"{name}_s"]
        ms[name] = seconds * 1000 if seconds is not None else math.nan
    return ms


# -- the run ------------------------------------------------------------------------------------------
def soak_window(
    index: int, hey: str, url: str, body: Body, pid: int, sampler: RssSampler, args: argparse.Namespace
) -> Window:
    seconds = max(1.0, min(args.window_s, args.minutes * 60 - index * args.window_s))
    base = url.rsplit("/", 1)[0]
    counters_before, cpu_before = server_counters(base), cpu_seconds(pid)
    before, started = rss_mb(pid), time.monotonic()
    parsed = run_hey(hey, url, body, concurrency=args.workers, seconds=seconds, rate=args.rate)
    ended, after = time.monotonic(), rss_mb(pid)
    counters_after, cpu_after = server_counters(base), cpu_seconds(pid)
    server_cpu, busy_cpu, steal = (b - a for a, b in zip(cpu_before, cpu_after, strict=True))
    statuses = parsed["status_codes"]
    transport_errors = sum(n for n, _ in parsed["errors"])
    answered = sum(statuses.values())
    other = sum(n for code, n in statuses.items() if code not in ("200", "503"))
    return Window(
        index=index,
        seconds=round(ended - started, 2),
        requests=answered + transport_errors,
        rate=round(answered / (ended - started), 2),
        statuses=statuses,
        rejected=statuses.get("503", 0),
        errors=other + transport_errors,
        latency_ms={k: None if math.isnan(v) else round(v, 2) for k, v in latency_ms(parsed).items()},
        rss_mb_before=round(before, 1),
        rss_mb_after=round(after, 1),
        rss_mb_peak=round(max(sampler.peak(started, ended), after), 1),
        server={
            "batch_size": per_batch(counters_before, counters_after, "camserve_batch_size"),
            "model_ms": per_batch(counters_before, counters_after, "camserve_inference_seconds", 1000),
            "queue_wait_ms": per_batch(counters_before, counters_after, "camserve_queue_wait_seconds", 1000),
        },
        cpu_s={"server": round(server_cpu, 1), "other": round(busy_cpu - server_cpu, 1), "steal": round(steal, 1)},
    )


def rejections_by_reason(base: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in scrape(base).items()
        if name == "camserve_rejections_total"
    }


def summarise(windows: list[Window], rss_start: float, rss_end: float) -> dict:
    p99 = [w.latency_ms["p99"] for w in windows if w.latency_ms["p99"] is not None]
    return {
        "requests": sum(w.requests for w in windows),
        "answered_rate": round(
            sum(w.rate * w.seconds for w in windows) / max(sum(w.seconds for w in windows), 1e-9), 2
        ),
        "rejected_503": sum(w.rejected for w in windows),
        "errors": sum(w.errors for w in windows),
        "rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1), "growth": round(rss_end - rss_start, 1)},
        "p99_ms": {"first": p99[0], "last": p99[-1], "max": max(p99)} if p99 else {},
    }


def markdown(report: dict) -> str:
    config, totals = report["config"], report["totals"]
    lines = [
        "# Soak run",
        "",
        f"{config['minutes']} min at {config['rate']} requests/s ({config['workers']} hey workers, "
        f"{config['images_per_request']} image(s) per request) against {config['bundle']}, "
        f"on {config['machine']}; started {report['started']}.",
        "",
        f"**{totals['requests']} requests**, answered at {totals['answered_rate']}/s; "
        f"{totals['rejected_503']} shed with 503, {totals['errors']} errors. "
        f"RSS {totals['rss_mb']['start']} -> {totals['rss_mb']['end']} MiB ({totals['rss_mb']['growth']:+} MiB). "
        f"p99 first/last/max window: {totals['p99_ms'].get('first')} / {totals['p99_ms'].get('last')} / "
        f"{totals['p99_ms'].get('max')} ms.",
        "",
        "| window | s | requests | answered/s | 503 | errors | p50 ms | p90 ms | p99 ms | slowest ms | "
        "RSS before MiB | RSS after MiB | RSS peak MiB | images/batch | model ms/batch | queue wait ms | "
        "server CPU s | other CPU s | steal s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in report["windows"]:
        latency = w["latency_ms"]
        lines.append(
            f"| {w['index']} | {w['seconds']} | {w['requests']} | {w['rate']} | {w['rejected']} | {w['errors']} | "
            f"{latency['p50']} | {latency['p90']} | {latency['p99']} | {latency['slowest']} | "
            f"{w['rss_mb_before']} | {w['rss_mb_after']} | {w['rss_mb_peak']} | "
            f"{w['server']['batch_size']} | {w['server']['model_ms']} | {w['server']['queue_wait_ms']} | "
            f"{w['cpu_s']['server']} | {w['cpu_s']['other']} | {w['cpu_s']['steal']} |"
        )
    lines += [
        "",
        "images/batch, model ms/batch and queue wait ms are the server's own /predict histograms over the"
        " window; server CPU s is the server process's CPU time, other CPU s everything else on the machine"
        " (hey included), steal s the time the hypervisor gave to other guests.",
        "",
        f"Rejections by reason (server metrics): {report['rejections_by_reason'] or 'none'}",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(report))


def machine() -> str:
    return f"{os.cpu_count()} x {cpu_model()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total duration (default 10)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, all workers together")
    parser.add_argument("--workers", type=int, default=8, help="hey workers (concurrent connections)")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds per reported window (default 60)")
    parser.add_argument("--model-dir", type=Path, default=None, help="bundle; default: the shipped one, if present")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where soak.json/.md go")
    parser.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE", help="server setting, e.g. precision=fp32"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hey = require_hey()
    settings = dict(item.split("=", 1) for item in args.setting)
    with tempfile.TemporaryDirectory(prefix="camserve-soak-") as scratch:
        scratch_dir = Path(scratch)
        model_dir = args.model_dir or (SHIPPED_BUNDLE if (SHIPPED_BUNDLE / "model.json").is_file() else None)
        bundle = str(model_dir) if model_dir else "an untrained test bundle (no shipped bundle found)"
        if model_dir is None:
            model_dir = make_bundle(scratch_dir / "bundle")
        body = request_body(args.images, scratch_dir / "body.bin")
        windows: list[Window] = []
        report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "minutes": args.minutes,
                "rate": args.rate,
                "workers": args.workers,
                "images_per_request": args.images,
                "window_s": args.window_s,
                "bundle": bundle,
                "settings": settings,
                "machine": machine(),
                "load_generator": "hey",
            },
        }
        with camserve(model_dir, scratch_dir / "server.log", **settings) as server:
            base, process = server.base_url, server.process
            rss_start = rss_mb(process.pid)
            count = max(1, math.ceil(args.minutes * 60 / args.window_s - 1e-9))
            with RssSampler(process.pid) as sampler:
                for index in range(count):
                    windows.append(soak_window(index, hey, f"{base}/predict", body, process.pid, sampler, args))
                    w = windows[-1]
                    print(
                        f"window {index}: {w.requests} requests, {w.rate}/s, 503 {w.rejected}, errors {w.errors}, "
                        f"p99 {w.latency_ms['p99']} ms, RSS {w.rss_mb_before} -> {w.rss_mb_after} MiB",
                        flush=True,
                    )
                    report |= {"windows": [asdict(w) for w in windows]}
                    report |= {"totals": summarise(windows, rss_start, rss_mb(process.pid))}
                    report |= {"rejections_by_reason": rejections_by_reason(base)}
                    write_report(args.out, report)  # after every window: an interrupted soak still reports
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")


if __name__ == "__main__":
    main()
