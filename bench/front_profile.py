"""Where a request's CPU goes in the front: cProfile of the one-process server's event loop under hey.

Runs the one-process service with the null engine (so only the HTTP front, decoding and answer
building are on the profile) and a profiler on its event-loop thread that SIGUSR1 starts and
SIGUSR2 stops and dumps, so start-up and warm-up stay off the profile; loads it with ``hey`` for a
few seconds with one body kind and prints the functions with the most CPU per request (cProfile's
own overhead inflates small calls: read the shares, not the absolute figures).

    flock -x /tmp/camserve-cpu.lock python bench/front_profile.py --body multipart --seconds 5 \
        --output bench/results/front_profile_multipart.md

``--tree`` profiles another checkout's service (``git worktree add /tmp/base <commit>``) with this script,
so a before and an after come from the same profiler.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_bench import cifar_png, hey_run, photo_jpeg, upload
from harness import camserve, cpu_model, raw_body, require_hey, wait_until

LAUNCHER = """
import cProfile, signal, sys
from service.__main__ import main
profiler = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
def stop(*_):
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
signal.signal(signal.SIGUSR2, stop)
main()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body", choices=["multipart", "raw", "photo"], default="multipart")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tree", type=Path, default=None, help="the checkout whose service to profile")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()

    hey = require_hey()
    scratch = Path(tempfile.mkdtemp(prefix="front-profile-"))
    body = {
        "multipart": lambda: upload("cifar.png", cifar_png(), scratch / "body.bin"),
        "raw": lambda: raw_body(cifar_png(), "image/png", scratch / "body.bin"),
        "photo": lambda: raw_body(photo_jpeg(), "image/jpeg", scratch / "body.bin"),
    }[args.body]()
    profile = scratch / "front.prof"
    command = [sys.executable, "-c", LAUNCHER, str(profile)]
    settings = {"workers": "1", "engine": "null", "log_requests": "false", "log_level": "warning"}
    tree = {"tree": args.tree} if args.tree else {}
    with camserve(None, scratch / "server.log", command=command, **tree, **settings) as server:
        url = f"{server.base_url}/predict"
        hey_run(hey, url, body, args.concurrency, 1.0)  # warm: connections, first calls
        server.process.send_signal(signal.SIGUSR1)
        result = hey_run(hey, url, body, args.concurrency, args.seconds)
        server.process.send_signal(signal.SIGUSR2)
        wait_until(profile.exists, 60, what="the profile dump")
        time.sleep(0.5)  # dump_stats writes the file in several steps
    ok = result["codes"].get(200, 0)
    stats = pstats.Stats(str(profile))
    checkout = args.tree or Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False)
    lines = [
        f"# {args.body} body ({len(body.data)} bytes), {ok} requests answered 200 at c={args.concurrency}",
        f"# {cpu_model()}, {os.cpu_count()} cores; service at commit {commit.stdout.strip() or '?'}",
        f"# `{' '.join(['python', 'bench/front_profile.py', *sys.argv[1:]])}`",
        f"# profiled CPU of the event-loop thread per request: {stats.total_tt * 1e6 / ok:.0f} us (with cProfile)",
        "",
        "| cumulative us/request | own us/request | calls/request | function |",
        "|---:|---:|---:|---|",
    ]
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append((cumtime, tottime, calls, f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"))
    for cumtime, tottime, calls, where in sorted(rows, reverse=True)[: args.top]:
        lines.append(f"| {cumtime * 1e6 / ok:.0f} | {tottime * 1e6 / ok:.0f} | {calls / ok:.2f} | `{where}` |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
