"""bench/front_cost_report.py: issue 26's verdicts come from the figures in the record, both ways."""

from __future__ import annotations

import copy
from collections.abc import Callable

from front_cost_report import markdown, with_verdicts


def row(server: str, body: str, cpu_us: int, concurrency: int = 32, req_per_s: float = 1000.0) -> dict:
    return {
        "server": server,
        "body": body,
        "concurrency": concurrency,
        "requests": 5000,
        "req_per_s": req_per_s,
        "server_cpu_us_per_request": cpu_us,
        "hey_cpu_us_per_request": 100,
        "p50_ms": 10.0,
        "p99_ms": 40.0,
        "others_cpu_share": 0.01,
        "steal_share": 0.0,
    }


def served_point(server: str, concurrency: int, images_per_s: float, p99_ms: float, ceiling: float) -> dict:
    point = row(server, "multipart", 2000, concurrency, images_per_s) | {"p99_ms": p99_ms}
    edge = {"images_per_s": ceiling, "cpu_us_per_image": 800, "besides_cpu_share": 0.02}
    return point | {"ceiling_before": edge, "ceiling_after": edge, "ceiling_mean": ceiling}


def record() -> dict:
    """A run where every target is met: raw +150 us, multipart +200 us, photo 1.2x its decode, c=32 at 0.5."""
    return {
        "when": "2026-12-04T22:00:00+00:00",
        "command": "python bench/front_cost.py",
        "run_seconds": 300,
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "cores_usable": 2,
            "python": "3.11",
            "torch": "2.14.1",
            "load_average_at_start": (0.5, 0.5, 0.5),
            "load_average_at_end": (1.5, 1.0, 0.7),
        },
        "settings": {"seconds": 6.0, "warmup": 2.0, "ceiling_seconds": 3.0, "concurrency": 32, "photo_concurrency": 4},
        "inputs": {"png": {"bytes": 3172}, "photo": {"bytes": 1_021_541, "size": [1600, 1200]}},
        "front": {
            "fastapi/raw": row("fastapi", "raw", 100),
            "fastapi/photo": row("fastapi", "photo", 900, 4),
            "fastapi_multipart/multipart": row("fastapi_multipart", "multipart", 180),
            "camserve/raw": row("camserve (null engine)", "raw", 250),
            "camserve/multipart": row("camserve (null engine)", "multipart", 380),
            "camserve/photo": row("camserve (null engine)", "photo", 7200, 4),
        },
        "decode": {"draft_load_cpu_us": 6000, "draft_size": [200, 150], "decode_image_cpu_us": 6400},
        "served": {
            "camserve": {
                "runtime": "openvino 2026.4.1",
                "precision": "int8",
                "precision_reason": "auto",
                "batching": {"model_lanes": 2},
            },
            "ceiling_model": ["openvino", "int8", 2],
            "points": [
                served_point("camserve", 1, 300, 8, 1200),
                served_point("camserve", 32, 600, 90, 1200),
                served_point("camserve", 128, 800, 250, 1200),
                served_point("litserve", 1, 50, 30, 1200),
                served_point("litserve", 32, 150, 400, 1200),
                served_point("litserve", 128, 600, 450, 1200),
            ],
        },
    }


def verdicts(run: dict) -> list[bool | None]:
    return [target["met"] for target in with_verdicts(run)["targets"]]


def test_every_target_is_met_by_figures_that_meet_it() -> None:
    checked = with_verdicts(record())
    assert checked["derived"]["raw_minus_floor_us"] == 150
    assert checked["derived"]["multipart_minus_floor_us"] == 200
    assert checked["derived"]["photo_over_draft_decode"] == 1.2
    assert checked["derived"]["c32_ceiling_ratio"] == 0.5
    assert checked["derived"]["camserve_over_litserve"] == {"1": 6.0, "32": 4.0, "128": 1.333}
    assert verdicts(record()) == [True] * 8
    text = markdown(checked)
    assert "| 150 | <= 200 | met |" in text and "not met" not in text
    assert "machine was shared" not in text
    loaded = record()
    loaded["front"]["camserve/raw"]["others_cpu_share"] = 0.4  # another process took 40% of the cores
    assert "machine was shared during this run** (others over 10% of the cores in 1 of 12 rows)" in markdown(
        with_verdicts(loaded)
    )


def test_each_target_fails_when_its_own_figure_does() -> None:
    def worse(change) -> list[bool | None]:
        run = copy.deepcopy(record())
        change(run)
        return verdicts(run)

    order = [(p["server"], p["concurrency"]) for p in record()["served"]["points"]]

    def served(server: str, concurrency: int, **fields) -> Callable[[dict], None]:
        def change(run: dict) -> None:
            run["served"]["points"][order.index((server, concurrency))].update(fields)

        return change

    cases = {
        0: lambda run: run["front"]["camserve/raw"].update(server_cpu_us_per_request=301),
        1: lambda run: run["front"]["fastapi_multipart/multipart"].update(server_cpu_us_per_request=129),
        2: lambda run: run["decode"].update(draft_load_cpu_us=5000),  # 7200 / 5000 = 1.44x
        3: served("camserve", 32, req_per_s=500),  # 500 / 1200 = 0.42
        4: served("camserve", 32, p99_ms=101),
        5: served("litserve", 1, req_per_s=300),  # a tie is not ahead
        7: served("camserve", 128, req_per_s=599),
    }
    for index, change in cases.items():
        assert worse(change) == [i != index for i in range(8)], index


def test_an_unmeasured_target_says_so_rather_than_passing() -> None:
    run = record()
    run["served"]["points"] = [p for p in run["served"]["points"] if p["server"] == "camserve"]
    assert verdicts(run)[5:] == [None, None, None]
    run["served"] = None
    assert verdicts(run) == [True, True, True, None, None, None, None, None]
    assert "not measured" in markdown(with_verdicts(run))
