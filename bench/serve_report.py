"""Reports for ``serve_bench.py``: the JSON as measured, a markdown table with the ratios the serving
issue sets goals on, and a two-panel plot (throughput and p99 against concurrency).

Kept apart from the measuring code so a report can be rebuilt from a saved JSON without rerunning:

    python bench/serve_report.py bench/results/serve_bench.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

LABELS = {
    "camserve": "camserve",
    "unbatched": "camserve, MAX_BATCH_SIZE=1",
    "unbatched_1lane": "camserve, MAX_BATCH_SIZE=1, MODEL_LANES=1",
    "camserve_tta": "camserve, TTA flip (2 views per image)",
    "litserve": "LitServe (batch 32, 5 ms)",
    "ceiling": "in-process ceiling",
}
# Issue 4's goals, measured on 2 CPU cores; the absolute ones say nothing on other hardware.
GOAL_C32_IMAGES = 800.0
GOAL_C32_SHARE = 0.73  # the 800 img/s goal as a share of the ceiling: what counts on another CPU
GOAL_C32_P99_MS = 100.0
# The issue's in-process ceiling at batch 32 on its machine: the scale for translating its latency goal.
ISSUE_CEILING_IMAGES = 1100.0
GOAL_VS_UNBATCHED_C32 = 4.0
GOAL_GRADCAM_SHARE = 0.40
GOAL_BULK_SHARE = 0.85

Points = list[dict]


# -- lookups ---------------------------------------------------------------------------------
def find(points: Points, target: str, endpoint: str, concurrency: int | None = None, images: int = 1) -> dict | None:
    for point in points:
        if (point["target"], point["endpoint"], point["images_per_request"]) != (target, endpoint, images):
            continue
        if concurrency is None or point["concurrency"] == concurrency:
            return point
    return None


def rate(points: Points, target: str, endpoint: str, concurrency: int | None = None, images: int = 1) -> float | None:
    point = find(points, target, endpoint, concurrency, images)
    return point["images_per_s"] if point else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None where either is missing; infinite where only the reference served nothing."""
    if a is None or b is None:
        return None
    if b == 0:
        return float("inf") if a > 0 else None
    return a / b


def single_concurrencies(points: Points) -> list[int]:
    return sorted({p["concurrency"] for p in points if p["concurrency"] is not None and p["images_per_request"] == 1})


# -- derived numbers ---------------------------------------------------------------------------
def ratios_by_concurrency(result: dict) -> list[dict]:
    """Per concurrency: camserve /predict against every reference, and /gradcam against /predict."""
    points = result["points"]
    batch = result["settings"]["bulk_images"]
    ceiling = rate(points, "ceiling", "in-process", images=batch)
    rows = []
    for c in single_concurrencies(points):
        predict = rate(points, "camserve", "/predict", c)
        rows.append(
            {
                "concurrency": c,
                "predict_images_per_s": predict,
                "vs_ceiling": ratio(predict, ceiling),
                "vs_unbatched": ratio(predict, rate(points, "unbatched", "/predict", c)),
                "vs_unbatched_1lane": ratio(predict, rate(points, "unbatched_1lane", "/predict", c)),
                "vs_litserve": ratio(predict, rate(points, "litserve", "/predict", c)),
                "gradcam_vs_predict": ratio(rate(points, "camserve", "/gradcam", c), predict),
            }
        )
    return rows


def goal_rows(result: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each of the issue's goals; ``met`` is None where a point is missing."""
    points = result["points"]
    batch = result["settings"]["bulk_images"]
    by_c = {row["concurrency"]: row for row in ratios_by_concurrency(result)}
    c1, c32 = by_c.get(1, {}), by_c.get(32, {})
    predict32 = find(points, "camserve", "/predict", 32)
    bulk = rate(points, "camserve", "/predict", result["settings"]["bulk_concurrency"], batch)
    vs_litserve = [row["vs_litserve"] for row in by_c.values() if row["vs_litserve"] is not None]
    ceiling32 = rate(points, "ceiling", "in-process", images=batch)
    p99_32 = predict32["p99_ms"] if predict32 else None
    scaled_p99 = p99_32 * ceiling32 / ISSUE_CEILING_IMAGES if p99_32 is not None and ceiling32 else None
    goals: list[tuple[str, float | None, Callable[[float], bool], Callable[[float | None], str]]] = [
        (
            f"/predict c=32 ≥ {GOAL_C32_IMAGES:.0f} img/s (on 2 CPU cores)",
            c32.get("predict_images_per_s"),
            lambda v: v >= GOAL_C32_IMAGES,
            _num,
        ),
        (
            f"/predict c=32 ≥ {GOAL_C32_SHARE:.0%} of the in-process ceiling at batch {batch}",
            c32.get("vs_ceiling"),
            lambda v: v >= GOAL_C32_SHARE,
            _pct,
        ),
        (
            f"/predict c=32 p99 ≤ {GOAL_C32_P99_MS:.0f} ms",
            predict32["p99_ms"] if predict32 else None,
            lambda v: v <= GOAL_C32_P99_MS,
            _ms,
        ),
        (
            # A latency in units of the machine's own speed: the p99 this run would have had on the
            # issue's machine, whose bare model is ISSUE_CEILING_IMAGES / ceiling times faster.
            f"/predict c=32 p99 ≤ {GOAL_C32_P99_MS:.0f} ms, scaled by the ceiling"
            f" (p99 × this run's ceiling ÷ the issue's {ISSUE_CEILING_IMAGES:,.0f} img/s)",
            scaled_p99,
            lambda v: v <= GOAL_C32_P99_MS,
            _ms,
        ),
        ("c=1 no slower than unbatched", c1.get("vs_unbatched"), lambda v: v >= 1.0, _x),
        (
            f"c=32 ≥ {GOAL_VS_UNBATCHED_C32:g}x unbatched",
            c32.get("vs_unbatched"),
            lambda v: v >= GOAL_VS_UNBATCHED_C32,
            _x,
        ),
        (
            f"c=32 ≥ {GOAL_VS_UNBATCHED_C32:g}x unbatched with one model lane (one request at a time)",
            c32.get("vs_unbatched_1lane"),
            lambda v: v >= GOAL_VS_UNBATCHED_C32,
            _x,
        ),
        (
            "ahead of LitServe at every concurrency (worst ratio)",
            min(vs_litserve) if vs_litserve else None,
            lambda v: v > 1.0,
            _x,
        ),
        (
            f"/gradcam ≥ {GOAL_GRADCAM_SHARE:.0%} of /predict at c=32",
            c32.get("gradcam_vs_predict"),
            lambda v: v >= GOAL_GRADCAM_SHARE,
            _pct,
        ),
        (
            f"bulk ({batch}/request) ≥ {GOAL_BULK_SHARE:.0%} of the ceiling at batch {batch}",
            ratio(bulk, ceiling32),
            lambda v: v >= GOAL_BULK_SHARE,
            _pct,
        ),
    ]
    rows = [(goal, shown(value), None if value is None else test(value)) for goal, value, test, shown in goals]
    if str(result.get("device", "")).startswith("cuda"):
        # The ceiling shares translate the 2-core CPU goal; a GPU's bare model outruns any HTTP front
        # by orders of magnitude, so there they measure the front, not the batcher: reported, not judged.
        rows = [
            (f"{goal} (a CPU goal; not judged on a GPU)", shown, None) if "ceiling" in goal else (goal, shown, met)
            for goal, shown, met in rows
        ]
    return rows


# -- formatting -----------------------------------------------------------------------------------
def _num(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "n/a"


def _x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "∞ (reference served none)" if value == float("inf") else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "∞ (reference served none)" if value == float("inf") else f"{value:.0%}"


def results_table(points: Points) -> list[str]:
    lines = [
        "| target | endpoint | concurrency | images/request | images/s | p50 ms | p95 ms | p99 ms | non-200 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c = p["concurrency"] if p["concurrency"] is not None else "-"
        latencies = " | ".join(f"{p[k]:.1f}" if p[k] is not None else "n/a" for k in ("p50_ms", "p95_ms", "p99_ms"))
        lines.append(
            f"| {LABELS.get(p['target'], p['target'])} | {p['endpoint']} | {c} | {p['images_per_request']} "
            f"| {p['images_per_s']:.1f} | {latencies} | {p['non_200']} | {p['errors']} |"
        )
    return lines


def ratio_table(result: dict) -> list[str]:
    batch = result["settings"]["bulk_images"]
    lines = [
        f"| concurrency | /predict images/s | ÷ ceiling (batch {batch}) | ÷ unbatched | ÷ unbatched, 1 lane"
        " | ÷ LitServe | /gradcam ÷ /predict |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ratios_by_concurrency(result):
        lines.append(
            f"| {row['concurrency']} | {_num(row['predict_images_per_s'])} | {_pct(row['vs_ceiling'])} "
            f"| {_x(row['vs_unbatched'])} | {_x(row['vs_unbatched_1lane'])} | {_x(row['vs_litserve'])} "
            f"| {_pct(row['gradcam_vs_predict'])} |"
        )
    return lines


def markdown(result: dict) -> str:
    machine = result["machine"]
    settings = result["settings"]
    model = result["model"]
    problems = [p for p in result["points"] if p["non_200"] or p["errors"]]
    title = "# Serving benchmark" + (" (quick smoke run: not for comparison)" if result["quick"] else "")
    lines = [
        title,
        "",
        f"{result['date']} · {machine['cpu']} · {machine['cores']} cores · {result['device']}"
        f" · torch {machine['torch']} · load average at start {machine['load_average_at_start'][0]:.2f}",
        "",
        f"Precision **{result['precision']}** ({result['precision_reason']}); every target ran at it. "
        + (
            f"camserve's test-time augmentation: {result['tta']} (its default is flip; LitServe and the ceiling"
            " run the plain network, so the comparisons use the same network work everywhere)."
            if "tta" in result
            else "This run predates camserve's test-time augmentation: every target ran the plain network."
        ),
        f"Batching: {result['batching']}. Model: {model['name']} ({model['version'][:12]}),"
        f" test accuracy {model['test_accuracy']}.",
        f"LitServe: {result.get('litserve')}. Versions: {result.get('versions')}.",
        f"Load: `hey`, {settings['duration_s']:g} s per point after {settings['warmup_s']:g} s of warm-up at the same"
        f" concurrency; single-image requests unless images/request says otherwise. Images/s counts 200s only;"
        " latency percentiles are hey's, which it prints only once it has enough answers (p99: 100).",
        "",
        f"Command: `{result['command']}`",
        "",
        *_busy_warning(machine),
        "## Results",
        "",
        *results_table(result["points"]),
        "",
        "## Ratios",
        "",
        *ratio_table(result),
        "",
        "## Goals (issue 4)",
        "",
        "| goal | measured | met |",
        "|---|---:|:---:|",
        *[f"| {goal} | {measured} | {_met(met)} |" for goal, measured, met in goal_rows(result)],
        "",
    ]
    if problems:
        lines += ["## Non-200 answers and errors", ""]
        lines += [
            f"- {p['target']} {p['endpoint']} c={p['concurrency']}: {p['status_codes']} {p['error_messages']}"
            for p in problems
        ]
        lines.append("")
    return "\n".join(lines)


def _busy_warning(machine: dict) -> list[str]:
    """A load average above half the cores at start means something else was competing for them."""
    load = machine["load_average_at_start"][0]
    if load <= machine["cores"] / 2:
        return []
    return [f"**Warning:** load average {load:.2f} on {machine['cores']} cores at start: the machine was busy.", ""]


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


# -- plot -----------------------------------------------------------------------------------------
SERIES = (
    ("camserve", "/predict", "camserve /predict", "o-"),
    ("camserve", "/gradcam", "camserve /gradcam", "s-"),
    ("unbatched", "/predict", "camserve MAX_BATCH_SIZE=1 /predict", "v--"),
    ("unbatched_1lane", "/predict", "camserve MAX_BATCH_SIZE=1, 1 lane /predict", "<:"),
    ("camserve_tta", "/predict", "camserve TTA flip /predict", "D:"),
    ("litserve", "/predict", "LitServe /predict", "^--"),
)


def _curve(points: Points, target: str, endpoint: str, key: str, concurrencies: list[int]) -> tuple[list, list]:
    """(concurrency, value) pairs that exist: a point with no 200s has no latency to draw."""
    pairs = [(c, find(points, target, endpoint, c)) for c in concurrencies]
    kept = [(c, p[key]) for c, p in pairs if p and p[key] is not None and p[key] > 0]
    return [c for c, _ in kept], [v for _, v in kept]


def plot(result: dict, path: Path) -> None:
    """Throughput and p99 against concurrency; the ceiling as a horizontal line on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    concurrencies = single_concurrencies(points)
    batch = result["settings"]["bulk_images"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, key in ((left, "images_per_s"), (right, "p99_ms")):
        for target, endpoint, label, style in SERIES:
            xs, ys = _curve(points, target, endpoint, key, concurrencies)
            if xs:
                axis.plot(xs, ys, style, label=label)
        bulk = find(points, "camserve", "/predict", result["settings"]["bulk_concurrency"], batch)
        if bulk and bulk[key]:
            axis.plot([bulk["concurrency"]], [bulk[key]], "*", markersize=12, label=f"camserve bulk ({batch}/request)")
    for images, style in ((batch, "-"), (1, ":")):
        value = rate(points, "ceiling", "in-process", images=images)
        if value:
            left.axhline(value, color="black", linestyle=style, label=f"in-process ceiling, batch {images}")
    for axis, ylabel in ((left, "images/s"), (right, "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent clients (hey -c)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    if right.get_lines():
        right.set_yscale("log")
    else:
        right.text(0.5, 0.5, "no p99: under 100 answers per point", ha="center", transform=right.transAxes)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    title = f"{result['machine']['cpu']}, {result['device']}, {result['precision']}"
    fig.suptitle(title + (" (quick smoke run)" if result["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {suffix: out_dir / f"{stem}.{suffix}" for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/serve_report.py RESULT.json")
    source = Path(sys.argv[1])
    saved = json.loads(source.read_text())
    written = write_reports(saved, source.parent, source.stem)
    print("wrote " + ", ".join(str(p) for p in written.values()))
