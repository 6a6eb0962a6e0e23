"""What tracing costs a request: off (no OTEL_* variable set, the default) and on (spans made and handed
to the SDK's batch processor, whose exporter here drops them), per request of one image.

Off, a request runs exactly these hooks of service/tracing.py, in this order: the HTTP middleware's
check (``tracing.enabled()``), the decoder's ``tracing.span("decode", ...)`` around its work, the
batcher's ``tracing.waiting()`` at submit, the batch's scan of its images for traced ones, and the
middleware's two ``span is not None`` checks at the end. This script runs the real functions in that
sequence, many times, and reports the median of several rounds per request; on, it adds the spans a
traced request and its batch make (``start_request``/``end_request``, decode, ``record_batch``).

    python bench/tracing_overhead.py [--requests 200000] [--rounds 7]

Writes bench/results/tracing.md. The limit the service keeps to: at most 10 us per request off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import cpu_model  # noqa: E402

from service import tracing  # noqa: E402

LIMIT_US = 10.0


class _Item:
    """The batcher's per-image record, as it carries the request's trace (service/inference/batcher.py)."""

    __slots__ = ("payload", "trace")

    def __init__(self, payload: object, trace: object = None) -> None:
        self.payload, self.trace = payload, trace


def one_request() -> None:
    """The tracing hooks of one single-image request, in the order the service runs them."""
    span = tracing.start_request("POST", None, None, {"url.path": "/predict"}) if tracing.enabled() else None
    with tracing.span("decode", **{"camserve.images": 1}):
        pass
    trace = tracing.waiting()
    live = [_Item(None, trace)]
    traced = [item.trace for item in live if item.trace is not None]
    started_ns = time.time_ns() if traced else 0
    if traced:
        tracing.record_batch("predict", traced, len(live), started_ns, time.time_ns())
    if span is not None:
        tracing.end_request(span, "POST /predict", {"http.response.status_code": 200})
    if span is not None:
        tracing.trace_id(span)


def empty_request() -> None:
    """The same request's shape without any hook: the loop's own cost, subtracted."""
    live = [_Item(None)]
    del live


def per_request_us(function, requests: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            function()
        samples.append((time.perf_counter() - started) / requests * 1e6)
    return statistics.median(samples)


def measure(requests: int, rounds: int) -> dict[str, float]:
    baseline = per_request_us(empty_request, requests, rounds)
    assert not tracing.enabled()
    off = per_request_us(one_request, requests, rounds) - baseline
    # On: a real provider and batch processor; the exporter answers at once and keeps nothing.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=1 << 16))
    tracing._provider, tracing._tracer = provider, provider.get_tracer("camserve")
    try:
        on = per_request_us(one_request, max(1000, requests // 20), rounds) - baseline
    finally:
        tracing.stop()
    return {"baseline_us": baseline, "off_us": off, "on_us": on}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracing.md")
    parser.add_argument("--note", default="", help="a line about the machine's load, for the results")
    args = parser.parse_args()
    figures = measure(args.requests, args.rounds)
    verdict = "within" if figures["off_us"] <= LIMIT_US else "OVER"
    lines = [
        "# Tracing's cost per request",
        "",
        f"Command: `python bench/tracing_overhead.py --requests {args.requests} --rounds {args.rounds}`  ",
        f"Machine: {cpu_model()}, Python {sys.version.split()[0]}  ",
        *([f"Load: {args.note}  "] if args.note else []),
        "",
        "The tracing hooks one single-image request runs (service/tracing.py: the middleware's check, the",
        "decode span, the batcher's capture at submit, the batch's scan, the end checks), timed as the real",
        "functions in that sequence; median of the rounds, the loop's own cost subtracted.",
        "",
        "| tracing | per request |",
        "| --- | --- |",
        f"| off (no `OTEL_EXPORTER_OTLP_ENDPOINT`, the default) | {figures['off_us'] * 1000:.0f} ns |",
        f"| on (request span, decode, queue wait, model batch, batch span; exporter dropping) | "
        f"{figures['on_us']:.1f} us |",
        "",
        f"Off: {figures['off_us']:.3f} us per request, {verdict} the limit of {LIMIT_US:g} us. On, the cost is the",
        "SDK's span creation (five spans for a single-image request, on the event loop and the model thread);",
        "the export itself runs on the batch processor's thread.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
