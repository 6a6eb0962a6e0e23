"""bench/runtimes.py's Markdown report, and its bounded load client for machines without ``hey``."""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from urllib.parse import urlsplit

TARGETS = {  # (server, point, c) -> target ratio, from issue 25
    ("openvino", "bulk 32", 4): 2.0,
    ("openvino", "single", 1): 1.5,
    ("openvino", "single", 32): 0.45,
}


def ceiling_of(server: str, point: str, concurrency: int) -> str:
    """What a served figure is read against: plain torch bf16 at the batch the requests make (32 for bulk,
    1 for a lone image); for lone images at c=32 (batched by the service), the server's own model at batch 32."""
    if point == "single" and concurrency == 1:
        return "torch bf16 x1 @1"
    if point == "single" and server.startswith("openvino"):
        return "openvino int8 x2 @32"
    return "torch bf16 x1 @32"


NOTES = """Reading the served table:

* images/s counts answered images only. Bulk requests at c=32 offer 32 x 32 = 1,024 images at once
  against `CAMSERVE_QUEUE_SIZE=512`, so many are refused with 503 by design (the non-200 column);
  their p50 is mostly that of the quick refusals.
* Lanes against OpenVINO's own streams: "openvino" is the service's default, two model lanes and a
  compiled model with two streams of one thread each (one infer request per lane); "openvino, 1 lane"
  is one lane and one stream over both threads. One stream wins for a lone client (c=1: its batch
  gets both cores), two lanes win under concurrency (c=4, c=32) and on the model alone at batch 32
  (x2 against x1), where a batch never waits on a core the event loop or another process took; the
  default stays two lanes.
* The targets (issue 25): bulk c=4 >= 2.0x plain torch bf16 at batch 32; a lone image at c=1 >=
  1.5x plain torch at batch 1; lone images at c=32 >= 0.45x the INT8 model's own batch-32 ceiling
  (that one together with the HTTP front's issue).
"""


def load_client(url: str, body, concurrency: int, seconds: float) -> dict:
    """``concurrency`` threads POSTing ``body`` for ``seconds`` (each request capped at 30 s), summarised as
    :func:`harness.parse_hey` does. A Python client shares the cores with the server: a floor, not hey's figure."""
    parts = urlsplit(url)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                connection.request("POST", parts.path, body.data, {"Content-Type": body.content_type})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                status = 0
            with lock:
                latencies.append(time.perf_counter() - started)
                codes[status] = codes.get(status, 0) + 1
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies) or [float("nan")]
    return {
        "total_s": time.perf_counter() - started,
        "status_codes": codes,
        "percentiles_s": {p: ordered[min(len(ordered) - 1, len(ordered) * p // 100)] for p in (50, 90, 99)},
    }


def _model_table(record: dict) -> list[str]:
    alone = record["model_alone"]
    names = list(dict.fromkeys(name.rsplit(" @", 1)[0] for name in alone))
    batches = sorted({int(name.rsplit("@", 1)[1]) for name in alone})
    lines = [
        "| runtime precision, lanes | " + " | ".join(f"bs {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name in names:
        cells = []
        for b in batches:
            value = alone[f"{name} @{b}"]["median"]
            base = alone[f"torch bf16 x1 @{b}"]["median"]
            cells.append(f"{value:,.0f} ({value / base:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _served_table(record: dict) -> list[str]:
    rows = record["served"]
    keys = list(dict.fromkeys((r["server"], r["point"], r["c"]) for r in rows))
    lines = [
        "| server | request | c | images/s (median of rounds) | p50 ms | non-200 | against (round's ceiling) | ratio "
        "(median) | target |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for key in keys:
        mine = [r for r in rows if (r["server"], r["point"], r["c"]) == key]
        ceiling, target = ceiling_of(*key), TARGETS.get(key)
        ratios = [r["images_per_s"] / r["ceilings"][ceiling] for r in mine]
        median_ips = statistics.median(r["images_per_s"] for r in mine)
        ratio = statistics.median(ratios)
        met = "" if target is None else f"{target:.2f}x " + ("met" if ratio >= target else "**not met**")
        p50 = statistics.median(r["p50_ms"] for r in mine)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {median_ips:,.0f} | {p50:.1f} | {sum(r['non_200'] for r in mine)} "
            f"| {ceiling} | {ratio:.2f}x | {met} |"
        )
    return lines


def report(record: dict) -> str:
    health = "\n".join(
        f"* **{name}**: {h['runtime']} ({h['runtime_reason']}), {h['lanes']} lane(s), precision **{h['precision']}** "
        f"({h['precision_reason']})"
        for name, h in record["served_health"].items()
    )
    load = record["load_average_before_after"]
    return "\n".join(
        [
            "# Runtimes: the model alone and the served /predict, side by side",
            "",
            f"{record['when']}, `{record['command']}`, {record['cpu']} ({record['cores']} cores), "
            f"torch {record['versions']['torch']}, OpenVINO {record['versions']['openvino']}, "
            f"{'hey' if record['hey'] else 'a Python load client'}. **Shared machine**: "
            f"{record['shared_machine']} (load average {load[0]} before, {load[1]} after), so absolute figures move "
            "from run to run; the ratios, measured side by side, are what to read.",
            "",
            "## The model alone (images/s; ratio to torch bf16 with one caller at the same batch size)",
            "",
            "The one recipe, `CAMSERVE_TTA=none`, pre-made uint8 batches; x1: one caller over every core; x2: two "
            "callers at once (torch: one thread each; OpenVINO: two streams), as the service's two lanes run.",
            "",
            *_model_table(record),
            "",
            "## The served /predict (`CAMSERVE_TTA=none`, hey)",
            "",
            health,
            "",
            *_served_table(record),
            "",
            NOTES,
        ]
    )
