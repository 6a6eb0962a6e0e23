"""The kit the benchmarks and the tests stand on (``bench/harness.py``), checked against the server itself:
a body it builds is answered file by file, and what ``hey`` reports is what the server counted; and
checked to be the only copy of its helpers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fixtures import encode, random_image
from harness import ROOT, camserve, find_hey, metric, multipart_body, parse_hey, request, run_hey, scrape


def predict_200s(base_url: str) -> float:
    """``camserve_requests_total`` for answered /predict requests, as the server counts them."""
    return metric(scrape(base_url), "camserve_requests_total", endpoint="/predict", method="POST", status="200")


@pytest.mark.server
def test_camserve_starts_answers_a_built_body_and_stops(bundle_dir: Path, tmp_path: Path) -> None:
    names = ["b.png", "a.png", "c.png"]  # not sorted: the answer must keep the order sent
    body = multipart_body([(name, encode(random_image(i))) for i, name in enumerate(names)], tmp_path / "body")
    assert body.path is not None and body.path.read_bytes() == body.data and body.images == 3
    with camserve(bundle_dir, tmp_path / "server.log", log_requests="false", max_batch_size=4) as server:
        status, payload = request("POST", f"{server.base_url}/predict?top_k=2", body)
        assert status == 200, payload
        assert [p["filename"] for p in json.loads(payload)["predictions"]] == names
        hey = find_hey()
        if hey is not None:  # the load generator's report against the server's own count
            before = predict_200s(server.base_url)
            parsed = run_hey(hey, f"{server.base_url}/predict", body, concurrency=2, seconds=1.0)
            answered = parsed["status_codes"].get("200", 0)
            assert answered > 0 and parsed["errors"] == [] and set(parsed["status_codes"]) == {"200"}
            assert predict_200s(server.base_url) - before == answered
            # hey prints a percentile only once it has enough answers for it (p99: 100)
            percentiles = [seconds for _, seconds in sorted(parsed["percentiles_s"].items())]
            assert parsed["total_s"] > 0 and 50 in parsed["percentiles_s"]
            assert percentiles == sorted(percentiles) and percentiles[-1] <= parsed["slowest_s"]
        process, address = server.process, server.address
    assert process.returncode == 0  # SIGTERM drains and exits cleanly
    with socket.socket() as probe:
        assert probe.connect_ex(address) != 0, "the port still accepts connections after the stop"
    if find_hey() is None:
        pytest.skip("hey is not installed (apt-get install hey): its wrapper was not exercised")


def test_parse_hey_reads_errors_and_non_200s() -> None:
    """hey's summary when some requests fail below HTTP and some get 503 (its format, abridged)."""
    summary = """
Summary:
  Total:\t2.0031 secs
  Slowest:\t0.5120 secs
  Fastest:\t0.0100 secs
  Average:\t0.0500 secs
  Requests/sec:\t40.4375

Latency distribution:
  10% in 0.0200 secs
  50% in 0.0400 secs
  99% in 0.5000 secs

Status code distribution:
  [200]\t70 responses
  [503]\t9 responses

Error distribution:
  [2]\tPost "http://127.0.0.1:1/predict": dial tcp 127.0.0.1:1: connect: connection refused
"""
    parsed = parse_hey(summary)
    assert parsed["total_s"] == 2.0031 and parsed["slowest_s"] == 0.512 and parsed["average_s"] == 0.05
    assert parsed["percentiles_s"] == {10: 0.02, 50: 0.04, 99: 0.5}
    assert parsed["status_codes"] == {"200": 70, "503": 9}
    assert [n for n, _ in parsed["errors"]] == [2] and "connection refused" in parsed["errors"][0][1]


# What the kit holds, written again elsewhere, is a copy that drifts (issue 23 found 3 to 7 of each).
COPIES = {
    "def free_port": "free_port",
    "def wait_until": "wait_until",
    "def scrape": "scrape",
    "def run_hey": "run_hey",
    "def parse_hey": "parse_hey",
    "class Server": "Server",
    "/proc/cpuinfo": "cpu_model",
    '"-m", "service"': "camserve / run_camserve",
    "text_string_to_metric_families": "parse_metrics / scrape",
}


def test_the_kit_is_the_only_copy_of_its_helpers() -> None:
    files = [*sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
    found = [
        f"{path.relative_to(ROOT)}: {needle!r} (use the kit's {helper})"
        for path in files
        if path.name not in ("harness.py", "test_harness.py")
        for needle, helper in COPIES.items()
        if needle in path.read_text()
    ]
    assert not found, "\n".join(found)
    assert "-m service" not in (ROOT / "bench" / "ab_predict.sh").read_text()
