"""N worker processes on one port, one service to the outside (``CAMSERVE_WORKERS`` > 1).

Each worker is a full replica: its own model, lanes and batchers (LitServe's ``workers_per_device``),
and its own event loop parsing HTTP, which is what one process could not do fast enough. The
process management is uvicorn's own multiprocess supervisor (``uvicorn.supervisors.Multiprocess``):
it binds the socket once and hands it to every worker (the kernel spreads connections over the
processes blocked in ``accept``), forwards SIGTERM/SIGINT to them and waits for each to drain,
health-checks them over a pipe and restarts one that dies or hangs. This module adds what makes
the replicas one service:

* decisions taken once, here, for every worker and every restart: the worker count, the precision
  (``auto`` timed on start-up by each worker could pick differently under contention, and the
  answers must not depend on which process took the connection);
* a private run directory (created here, removed at exit): prometheus-client's multiprocess files,
  so one scrape of ``/metrics`` counts every worker's requests and batches, and the worker slots
  (service/worker.py) that split the queue bound so the shares add up to ``CAMSERVE_QUEUE_SIZE``
  and let ``/health`` describe every worker;
* no silent half-service: a worker that dies is restarted, and its live gauges are dropped from the
  metrics; one that cannot start (uvicorn's STARTUP_FAILURE) stops the service, and the exit status
  is then non-zero;
* a dead worker noticed at once: uvicorn pings each worker over its pipe and waits up to the whole
  health-check timeout (30 s here, for a worker importing torch on a loaded machine) for the answer,
  even from a worker that has already exited, since the pipe's other end stays open in this process.
  :func:`responsive` waits for the answer in short slices and checks between them that the process
  is still alive.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from camcore.bundle import Bundle
from service.runtime.slots import RUN_DIR_ENV, reloaded_already
from service.settings import Settings

log = logging.getLogger("camserve.supervisor")

WORKER_APP = "service.runtime.worker_app:create_worker_app"
MAX_AUTO_WORKERS = 8
HEALTHCHECK_TIMEOUT_S = 30  # a worker importing torch on a loaded machine answers its first ping late
PING_SLICE_S = 0.25  # how often a wait for a worker's answer checks that the worker still lives
EXIT_WORKER_FAILED = 1


def responsive(process: Process, timeout_s: float, slice_s: float = PING_SLICE_S) -> bool:
    """Whether a worker answers uvicorn's health ping within ``timeout_s`` (``Process.is_alive``'s
    contract), giving up as soon as the process has exited instead of when the timeout runs out."""
    if not process.process.is_alive():
        return False
    try:
        process.parent_conn.send(b"ping")
    except OSError:
        return False
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            if process.parent_conn.poll(min(slice_s, left)):
                process.parent_conn.recv()  # the worker's started flag: any answer means it lives
                return True
        except (OSError, EOFError, pickle.UnpicklingError):
            return False
        if not process.process.is_alive():
            return False
    return False


def worker_count(setting: int | str, cpus: int) -> int:
    """``auto``: 1 on up to 2 CPUs (a second replica would only compete with the first's two model
    lanes for the same cores), else one worker per 2 CPUs, at most 8 (each is a model replica)."""
    if setting != "auto":
        return int(setting)
    return 1 if cpus <= 2 else min(MAX_AUTO_WORKERS, cpus // 2)


def decide_precision(settings: Settings, bundle: Bundle) -> tuple[str, str | None]:
    """The precision every worker serves at, and why; timed here once when it is ``auto`` on torch.

    On OpenVINO ``auto`` stays ``auto``: each worker reads the same choice from the bundle's recorded
    measurements (service/inference/choice.py), no timing, so all agree, and a reload to a bundle
    without a quantized network falls back to bf16 there instead of being refused for int8."""
    if settings.precision != "auto" or settings.engine == "null":
        return settings.precision, None
    from service.inference.choice import choose_runtime
    from service.inference.torch_engine import TorchEngine, resolve_device

    device = resolve_device(settings.device)
    if choose_runtime(settings, device)[0] == "openvino":
        return settings.precision, None
    engine = TorchEngine(bundle, device, "auto", settings.max_batch_size, trace=False, tta=settings.tta)
    return engine.precision, f"{engine.precision_reason} (timed once by the supervisor for every worker)"


class Supervisor(Multiprocess):
    """uvicorn's supervisor, plus: metrics bookkeeping for dead workers, and a failure exit status."""

    def __init__(self, config: uvicorn.Config, sockets: list, run_dir: Path) -> None:
        super().__init__(config, sockets)
        self.run_dir = run_dir
        self.metrics_dir = run_dir / "metrics"
        self.failed = False
        self.restarts = 0

    def handle_hup(self) -> None:
        """SIGHUP reloads the bundle in every worker in place (each verifies, warms and swaps it in between
        batches, service/inference/registry.py) instead of uvicorn's restart of every process: no worker stops
        serving, and a bundle that fails verification leaves every worker on the model it had. A worker that
        asked for this SIGHUP after a load request has reloaded already and is skipped."""
        skip = reloaded_already(self.run_dir)
        targets = [p for p in self.processes if p.pid is not None and p.pid not in skip]
        log.info("SIGHUP: reloading the bundle in %d worker(s)", len(targets))
        for process in targets:
            if process.process.is_alive():  # no ping: never blocks
                os.kill(process.pid, signal.SIGHUP)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's loop over the workers (restart the dead, stop on a start-up failure), with the
        liveness check of :func:`responsive` and this service's bookkeeping for a dead worker."""
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if responsive(process, self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or gone already
            process.join()
            if process.pid is not None:
                mark_process_dead(process.pid, str(self.metrics_dir))  # its queue depth no longer counts
            if process.exitcode == STARTUP_FAILURE:  # it would fail the same way on every restart
                log.error("worker %s failed to start, stopping the service", process.pid)
                self.failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[index] = replacement
            self.restarts += 1
            log.warning("worker %s died and was replaced (%d restart(s) so far)", process.pid, self.restarts)


def serve_workers(settings: Settings, bundle: Bundle, workers: int, make_config: Callable[..., uvicorn.Config]) -> int:
    """Run ``workers`` replicas on ``settings.host:port`` until SIGTERM/SIGINT; the exit status."""
    if settings.queue_size < workers:
        log.error("CAMSERVE_QUEUE_SIZE=%d cannot be split over %d workers", settings.queue_size, workers)
        return 2
    precision, precision_reason = decide_precision(settings, bundle)
    run_dir = Path(tempfile.mkdtemp(prefix="camserve-"))
    try:
        (run_dir / "metrics").mkdir()
        (run_dir / "slots").mkdir()
        (run_dir / "service.json").write_text(
            json.dumps({"workers": workers, "precision": precision, "precision_reason": precision_reason})
        )
        # Inherited by every worker, restarted ones too (spawn copies this process's environment).
        os.environ.update(
            {
                RUN_DIR_ENV: str(run_dir),
                "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics"),
                "CAMSERVE_PRECISION": precision,
                "CAMSERVE_WORKERS": str(workers),
            }
        )
        config = make_config(
            settings, WORKER_APP, factory=True, workers=workers, timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_S
        )
        socket = config.bind_socket()
        log.info("%d workers on %s:%d, precision %s", workers, settings.host, settings.port, precision)
        supervisor = Supervisor(config, [socket], run_dir)
        supervisor.run()
        socket.close()
        return EXIT_WORKER_FAILED if supervisor.failed else 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
