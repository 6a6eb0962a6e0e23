"""Where a request's CPU goes in the front: cProfile of the one-process server's event loop under hey.

Runs the one-process service with the null engine (so only the HTTP front, decoding and answer
building are on the profile) and a profiler on its event-loop thread that SIGUSR1 starts and
SIGUSR2 stops and dumps, so start-up and warm-up stay off the profile; loads it with ``hey`` for a
few seconds with one body kind and prints the functions with the most CPU per request (cProfile's
own overhead inflates small calls: read the shares, not the absolute figures).

    flock -x /tmp/camserve-cpu.lock python bench/front_profile.py --body multipart --seconds 5
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_bench import BOUNDARY, REPO, cifar_png, free_port, multipart, photo_jpeg, run_hey

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
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="front-profile-"))
    data, content_type = {
        "multipart": (multipart("cifar.png", cifar_png()), f"multipart/form-data; boundary={BOUNDARY}"),
        "raw": (cifar_png(), "image/png"),
        "photo": (photo_jpeg(), "image/jpeg"),
    }[args.body]
    body = scratch / "body.bin"
    body.write_bytes(data)
    port = free_port()
    env = {
        **os.environ,
        "CAMSERVE_PORT": str(port),
        "CAMSERVE_WORKERS": "1",
        "CAMSERVE_ENGINE": "null",
        "CAMSERVE_LOG_REQUESTS": "false",
        "CAMSERVE_LOG_LEVEL": "warning",
    }
    profile = scratch / "front.prof"
    command = [sys.executable, "-c", LAUNCHER, str(profile)]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    run_hey(f"{base}/predict", body, content_type, args.concurrency, 1.0)  # warm: connections, first calls
    process.send_signal(signal.SIGUSR1)
    hey = run_hey(f"{base}/predict", body, content_type, args.concurrency, args.seconds)
    process.send_signal(signal.SIGUSR2)
    while not profile.exists():
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    ok = hey["codes"].get(200, 0)
    stats = pstats.Stats(str(profile))
    print(f"# {args.body} body ({len(data)} bytes), {ok} requests answered 200 at c={args.concurrency}")
    print(f"# profiled CPU of the event-loop thread per request: {stats.total_tt * 1e6 / ok:.0f} us (with cProfile)")
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append((cumtime, tottime, calls, f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"))
    print("\n| cumulative us/request | own us/request | calls/request | function |\n|---:|---:|---:|---|")
    for cumtime, tottime, calls, where in sorted(rows, reverse=True)[: args.top]:
        print(f"| {cumtime * 1e6 / ok:.0f} | {tottime * 1e6 / ok:.0f} | {calls / ok:.2f} | `{where}` |")


if __name__ == "__main__":
    main()
