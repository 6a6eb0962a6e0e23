"""One of N worker processes (``CAMSERVE_WORKERS`` > 1): its slot and its share.

Each worker is a full replica (model, lanes, batchers) started by :mod:`service.runtime.supervisor` through
uvicorn's multiprocess supervisor, which calls :func:`service.worker_app.create_worker_app` in the
child. What makes
the N replicas one service lives in the supervisor's private run directory:

* ``slots/<i>.lock``: a worker claims the first free slot with an exclusive ``flock`` held for its
  life; the kernel frees it when the process dies, however it dies, so a restarted worker takes the
  dead one's slot (and its queue share), and anyone can tell a live slot from a dead one.
* ``slots/<i>.json``: the slot's pid and status (``loading``, ``ready``, ``draining``), for
  ``/health`` and ``/readyz``;
* ``service.json``: what the supervisor decided once for all workers (count, precision);
* ``metrics/``: prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``);
* ``reloads/<pid>``: a worker that reloaded for a load request and asks the others to (SIGHUP).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "CAMSERVE_SUPERVISOR_DIR"  # set by the supervisor for its workers only; not a setting
RELOADS = "reloads"  # <run dir>/reloads/<pid>: workers that reloaded already, for the next SIGHUP to skip


def reloaded_already(run_dir: Path) -> set[int]:
    """The pids that asked for the pending SIGHUP (and reloaded themselves); their requests removed."""
    pids = set()
    for request in (run_dir / RELOADS).glob("*"):
        if request.name.isdecimal():
            pids.add(int(request.name))
        request.unlink(missing_ok=True)
    return pids


def queue_share(total: int, count: int, index: int) -> int:
    """Worker ``index``'s part of the service's queue bound; the N parts add up to ``total``."""
    return total // count + (1 if index < total % count else 0)


def cpu_share(cpus: int, count: int, index: int) -> int:
    """Worker ``index``'s CPUs for lanes and intra-op threads (at least 1)."""
    return max(1, cpus // count + (1 if index < cpus % count else 0))


def read_service(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "service.json").read_text())


def _slot_is_held(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own lock, if it got one
    return False


@dataclass
class WorkerSlot:
    """This worker's place in the service: index, share, and the service-wide view for the probes."""

    run_dir: Path
    index: int
    count: int
    queue_size: int
    cpus: int
    total_queue_size: int
    _lock_fd: int = -1

    @classmethod
    def claim(cls, run_dir: Path, count: int, total_queue: int, total_cpus: int) -> WorkerSlot:
        slots = run_dir / "slots"
        for index in range(count):
            fd = os.open(slots / f"{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            slot = cls(
                run_dir,
                index,
                count,
                queue_share(total_queue, count, index),
                cpu_share(total_cpus, count, index),
                total_queue,
                fd,
            )
            slot.publish("loading")
            return slot
        raise RuntimeError(f"all {count} worker slots are taken: more workers than CAMSERVE_WORKERS")

    def publish(self, status: str) -> None:
        """This slot's status file, replaced atomically so a reader never sees half of it."""
        path = self.run_dir / "slots" / f"{self.index}.json"
        record = {"index": self.index, "pid": os.getpid(), "status": status, "queue_size": self.queue_size}
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(path)

    def ask_others_to_reload(self) -> None:
        """After this worker reloaded for a load request: have the supervisor reload every other worker.

        This worker's pid goes into ``reloads/`` first, so the supervisor's SIGHUP skips it: one load
        request reloads each worker exactly once."""
        requests = self.run_dir / RELOADS
        requests.mkdir(exist_ok=True)
        (requests / str(os.getpid())).touch()
        os.kill(os.getppid(), signal.SIGHUP)

    def describe(self) -> dict[str, Any]:
        """The service as every worker sees it: each slot that has a live process, and its status."""
        slots = []
        for index in range(self.count):
            alive = index == self.index or _slot_is_held(self.run_dir / "slots" / f"{index}.lock")
            try:
                record = json.loads((self.run_dir / "slots" / f"{index}.json").read_text())
            except (OSError, ValueError):
                record = {"index": index, "pid": None, "status": "starting"}
            if not alive:
                record = {**record, "status": "down"}
            slots.append(record)
        return {
            "count": self.count,
            "ready": sum(s["status"] == "ready" for s in slots),
            "queue_size": self.total_queue_size,
            "this_worker": self.index,
            "slots": slots,
        }
