"""A/B of single-image ``/predict`` under hey between checkouts of camserve (e.g. git worktrees of two commits).

Fresh servers, alternating A B A B ... round after round, bf16, TTA none, each tree serving its own
shipped bundle from its own code (``python -m service`` run in that tree). Prints one line per round
and server: requests/s, p99 s, the server's CPU per answered request (utime + stime; one process,
``CAMSERVE_WORKERS`` unset = 1 on 2 cores), status codes. Loopback only; every run bounded by its
duration. ``bench/ab_predict.sh`` is the command the results quote:

    C=32 DUR=10 ROUNDS=4 bench/ab_predict.sh /tmp/ab/before /tmp/ab/after
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import camserve, multipart_body, process_cpu_seconds, require_hey, run_hey


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts to compare, each with models/cifar10-resnet")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of hey per point")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    hey = require_hey()
    trees = [tree.resolve() for tree in args.trees]
    image = sorted((trees[0] / "models/cifar10-resnet/misclassified").glob("*.png"))[0].read_bytes()
    with tempfile.TemporaryDirectory(prefix="ab-predict-") as tmp:
        work = Path(tmp)
        body = multipart_body([("a.png", image)], work / "body.bin", boundary="XB", part_type="image/png")
        settings = {"tta": "none", "precision": "bf16", "log_requests": "false"}
        for round_index in range(1, args.rounds + 1):
            for tree in trees:
                try:
                    with camserve(
                        tree / "models/cifar10-resnet", work / "server.log", tree=tree, start_timeout_s=120, **settings
                    ) as server:
                        url = f"{server.base_url}/predict"
                        run_hey(hey, url, body, concurrency=args.concurrency, seconds=2)  # warm-up
                        cpu_before = process_cpu_seconds(server.pid)
                        parsed = run_hey(hey, url, body, concurrency=args.concurrency, seconds=args.duration)
                        cpu = process_cpu_seconds(server.pid) - cpu_before
                except (RuntimeError, TimeoutError) as exc:
                    print(f"round {round_index} {tree.name}: the server did not become ready: {exc}", flush=True)
                    continue
                ok = parsed["status_codes"].get("200", 0)
                p99 = parsed["percentiles_s"].get(99)
                print(
                    f"round {round_index} {tree.name} c={args.concurrency} rps={parsed['requests_per_s']} p99={p99} "
                    f"server_cpu_us_per_request={round(cpu * 1e6 / max(ok, 1))} codes: {parsed['status_codes']}",
                    flush=True,
                )
                time.sleep(2)  # let the machine settle between servers


if __name__ == "__main__":
    main()
