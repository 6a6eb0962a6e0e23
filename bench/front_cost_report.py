"""What ``bench/front_cost.py`` measured, checked against issue 26's targets and written as Markdown.

Pure functions of the run's record, so that a verdict is always computed from the figures beside it
(never typed in) and can be tested without running a server. The targets (issue 26, "A lean front",
this machine kind, one run):

* null engine, one 32x32 PNG, raw body: camserve's server CPU per request at most the FastAPI route's
  (reading the raw body, answering a top-3 JSON) + 200 us; multipart: at most the FastAPI route reading
  the form's one file + 250 us;
* null engine, a 1 MB 1600x1200 JPEG as the raw body at c=4: the server's CPU per request at most 1.3x
  the photo's own reduced-scale decode (``Image.draft`` then ``load``, CPU per image in process);
* real engine, single-image ``/predict`` at c=32: at least 0.45 of the model's own batch-32 ceiling
  (the mean of the ceilings measured just before and after), p99 at most 100 ms;
* ahead of LitServe (same network, precision and decode) at c=1, 32 and 128.
"""

from __future__ import annotations

RAW_EXTRA_US = 200
MULTIPART_EXTRA_US = 250
PHOTO_DECODE_RATIO = 1.3
C32_CEILING_RATIO = 0.45
C32_P99_MS = 100.0
LOADED_SHARE = 0.1  # others' share of the cores above which a row is called loaded
LABELS = {
    "asgi": "bare ASGI",
    "starlette": "Starlette route",
    "fastapi": "FastAPI route",
    "fastapi_multipart": "FastAPI route + multipart read",
    "fastapi_multipart_decode": "FastAPI route + multipart read + Pillow decode",
}


def point(record: dict, server: str, concurrency: int) -> dict | None:
    served = record.get("served") or {}
    found = [p for p in served.get("points", []) if p["server"] == server and p["concurrency"] == concurrency]
    return found[0] if found else None


def derive(record: dict) -> dict:
    """The differences and ratios the targets are stated in."""
    rows, decode = record["front"], record["decode"]

    def cpu(key: str) -> int:
        return rows[key]["server_cpu_us_per_request"]

    derived: dict = {
        "raw_minus_floor_us": cpu("camserve/raw") - cpu("fastapi/raw"),
        "multipart_minus_floor_us": cpu("camserve/multipart") - cpu("fastapi_multipart/multipart"),
        "photo_minus_floor_us": cpu("camserve/photo") - cpu("fastapi/photo"),
        "photo_over_draft_decode": round(cpu("camserve/photo") / decode["draft_load_cpu_us"], 3),
        "photo_over_decode_image": round(cpu("camserve/photo") / decode["decode_image_cpu_us"], 3),
    }
    c32 = point(record, "camserve", 32)
    if c32 is not None:
        derived["c32_ceiling_ratio"] = round(c32["req_per_s"] / c32["ceiling_mean"], 3)
    for concurrency in sorted({p["concurrency"] for p in (record.get("served") or {}).get("points", [])}):
        ours, peer = point(record, "camserve", concurrency), point(record, "litserve", concurrency)
        if ours and peer:
            derived.setdefault("camserve_over_litserve", {})[str(concurrency)] = round(
                ours["req_per_s"] / peer["req_per_s"], 3
            )
    return derived


def check(what: str, value: float | None, op: str, limit: float) -> dict:
    """One target: ``value op limit`` (``<=``, ``>=`` or ``>``), met None when the value was not measured."""
    compare = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}[op]
    return {
        "target": what,
        "measured": value,
        "limit": f"{op} {limit:g}",
        "met": None if value is None else compare(value, limit),
    }


def targets(record: dict, derived: dict) -> list[dict]:
    """Each of issue 26's targets with its measured value, its limit and whether it is met."""
    photo_c = record["front"]["camserve/photo"]["concurrency"]
    c32 = point(record, "camserve", 32)
    found = [
        check(
            "null engine, raw: camserve - FastAPI route (us CPU/request)",
            derived["raw_minus_floor_us"],
            "<=",
            RAW_EXTRA_US,
        ),
        check(
            "null engine, multipart: camserve - FastAPI route + multipart read (us CPU/request)",
            derived["multipart_minus_floor_us"],
            "<=",
            MULTIPART_EXTRA_US,
        ),
        check(
            f"null engine, photo c={photo_c}: camserve CPU/request over the photo's draft decode",
            derived["photo_over_draft_decode"],
            "<=",
            PHOTO_DECODE_RATIO,
        ),
        check(
            "real engine, c=32: images/s over the bracketed batch-32 ceiling",
            derived.get("c32_ceiling_ratio"),
            ">=",
            C32_CEILING_RATIO,
        ),
        check("real engine, c=32: p99 (ms)", c32["p99_ms"] if c32 else None, "<=", C32_P99_MS),
    ]
    over = derived.get("camserve_over_litserve", {})
    for concurrency in (1, 32, 128):
        found.append(
            check(
                f"real engine, c={concurrency}: camserve images/s over LitServe's", over.get(str(concurrency)), ">", 1.0
            )
        )
    return found


def with_verdicts(record: dict) -> dict:
    derived = derive(record)
    return {**record, "derived": derived, "targets": targets(record, derived)}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


def markdown(record: dict) -> str:
    machine, rows, derived = record["machine"], record["front"], record["derived"]
    others = [row["others_cpu_share"] for row in rows.values()]
    others += [p["others_cpu_share"] for p in (record.get("served") or {}).get("points", [])]
    settings = record["settings"]
    lines = [
        "# The front's cost (issue 26): floors, camserve's own work, the served /predict",
        "",
        f"{record['when']} · {machine['cpu']} · {machine['cores']} cores ({machine['cores_usable']} usable) · "
        f"Python {machine['python']} · torch {machine['torch']} · the whole run took {record['run_seconds']} s",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Other load: load average {machine['load_average_at_start'][0]:.2f} at the start, "
        f"{machine['load_average_at_end'][0]:.2f} at the end; processes outside this run took "
        f"{max(others):.1%} of the cores at most during a row (mean {sum(others) / len(others):.1%}; "
        "the `others` column: machine busy time minus this run's processes and hey, over the row's wall time).",
        *(
            [
                "",
                f"**The machine was shared during this run** (others over {LOADED_SHARE:.0%} of the cores in "
                f"{sum(share > LOADED_SHARE for share in others)} of {len(others)} rows): throughput and latency "
                "suffer first, CPU per request less so; re-run on a quiet machine before reading a verdict as final.",
            ]
            if max(others) > LOADED_SHARE
            else []
        ),
        "",
        f"## 1. The front alone (null engine, one process), {settings['seconds']:g} s per row after 1 s of warm-up",
        "",
        f"Inputs: a 32x32 PNG ({record['inputs']['png']['bytes']} bytes) as the raw body (`image/png`) or one "
        f"multipart file at c={settings['concurrency']}; a {record['inputs']['photo']['size'][0]}x"
        f"{record['inputs']['photo']['size'][1]} JPEG ({record['inputs']['photo']['bytes'] / 1e6:.2f} MB) as the raw "
        f"body at c={settings['photo_concurrency']}. Floors: `bench/floor_apps.py` under uvicorn (httptools).",
        "",
        "| server | body | c | req/s | server CPU us/request | hey CPU us/request | p50 ms | p99 ms | others |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        lines.append(
            f"| {LABELS.get(row['server'], row['server'])} | {row['body']} | {row['concurrency']} | "
            f"{row['req_per_s']:,.0f} | {row['server_cpu_us_per_request']} | {row['hey_cpu_us_per_request']} | "
            f"{_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {row['others_cpu_share']:.0%} |"
        )
    decode = record["decode"]
    lines += [
        "",
        f"camserve's own work (camserve minus its floor, server CPU per request): raw "
        f"**{derived['raw_minus_floor_us']:+} us** (against the FastAPI route reading the raw body), multipart "
        f"**{derived['multipart_minus_floor_us']:+} us** (against the FastAPI route reading the form's file), "
        f"photo {derived['photo_minus_floor_us']:+} us (against the FastAPI route reading the photo).",
        "",
        f"The photo's own decode, in process, one thread: `Image.draft('RGB', (64, 64))` then `load()` (decodes at "
        f"{decode['draft_size'][0]}x{decode['draft_size'][1]}) **{decode['draft_load_cpu_us']} us**; camserve's "
        f"whole `decode_image` (probe, draft, load, reduce, convert, resize) {decode['decode_image_cpu_us']} us. "
        f"camserve's photo request costs **{derived['photo_over_draft_decode']:.2f}x** the draft decode "
        f"({derived['photo_over_decode_image']:.2f}x the whole decode).",
    ]
    lines += _served(record)
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | limit | verdict |",
        "|---|---:|---:|---|",
    ]
    for target in record["targets"]:
        value = target["measured"]
        shown = "n/a" if value is None else f"{value:g}"
        lines.append(f"| {target['target']} | {shown} | {target['limit']} | {_verdict(target['met'])} |")
    return "\n".join(lines) + "\n"


def _served(record: dict) -> list[str]:
    served = record.get("served")
    if not served:
        return ["", "## 2. The served /predict: not run (`--skip-served`)"]
    health, settings = served["camserve"], record["settings"]
    runtime, precision, lanes = served["ceiling_model"]
    lines = [
        "",
        f"## 2. The served /predict, real engine, {settings['seconds']:g} s per point after "
        f"{settings['warmup']:g} s of warm-up",
        "",
        f"camserve at its defaults but `CAMSERVE_TTA=none` and no request log: {health['runtime']} "
        f"{health['precision']} ({health['precision_reason']}), {health['batching']['model_lanes']} model lane(s). "
        f"LitServe (`bench/litserve_server.py`): the same {runtime} {precision} network, recipe and "
        "`decode_image`, max batch 32, 5 ms batch timeout, one inference worker. One server up at a time; one "
        "32x32 PNG per multipart request. Ceiling: the model alone at batch 32 in its own process "
        f"(`bench/runtimes.py`'s child: {runtime} {precision}, {lanes} stream(s)/caller(s), all cores), "
        f"{settings['ceiling_seconds']:g} s before the first point and after every point. The last column: the "
        "share of the cores every other process (the idle server included) took while each ceiling ran.",
        "",
        "| server | c | images/s | p50 ms | p99 ms | server CPU us/image | hey CPU us/request | "
        "ceiling before -> after, images/s | over the ceiling | ceiling CPU us/image | others | "
        "others during the ceilings |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in served["points"]:
        before, after = p["ceiling_before"], p["ceiling_after"]
        lines.append(
            f"| {p['server']} | {p['concurrency']} | {p['req_per_s']:,.0f} | {_ms(p['p50_ms'])} | {_ms(p['p99_ms'])} | "
            f"{p['server_cpu_us_per_request']} | {p['hey_cpu_us_per_request']} | "
            f"{before['images_per_s']:,.0f} -> {after['images_per_s']:,.0f} | "
            f"{p['req_per_s'] / p['ceiling_mean']:.2f} | "
            f"{round((before['cpu_us_per_image'] + after['cpu_us_per_image']) / 2)} | {p['others_cpu_share']:.0%} | "
            f"{before.get('besides_cpu_share', 0):.0%}, {after.get('besides_cpu_share', 0):.0%} |"
        )
    derived = record["derived"]
    if "c32_ceiling_ratio" in derived:
        c32 = point(record, "camserve", 32)
        before, after = c32["ceiling_before"]["images_per_s"], c32["ceiling_after"]["images_per_s"]
        lines += [
            "",
            f"At c=32 camserve answers {c32['req_per_s']:,.0f} images/s against a ceiling of "
            f"{c32['ceiling_mean']:,.0f} (mean of {before:,.0f} before and {after:,.0f} after): "
            f"**{derived['c32_ceiling_ratio']:.2f}** of it.",
        ]
    if "camserve_over_litserve" in derived:
        ratios = ", ".join(f"{r:.2f}x at c={c}" for c, r in derived["camserve_over_litserve"].items())
        lines += ["", f"camserve over LitServe, images/s: {ratios}."]
    return lines
