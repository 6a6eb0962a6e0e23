"""Who gets served, whatever carries the request: readiness, the API key, room in an endpoint's queue,
and the batchers' refusals, as a protocol-neutral :class:`Refused` each front renders its own way (HTTP
statuses in service/http/admission.py, gRPC status codes in service/grpc/status.py).

One readiness function (:func:`readiness`) serves ``/readyz``, ``/v2/health/ready``, gRPC's ServerReady
and every refusal for being not ready; the rejections are counted here, once for both fronts.
"""

from __future__ import annotations

import hmac
from typing import Literal

from service.inference.batcher import BatchFailed, QueueFull, ShuttingDown
from service.state import ServiceState

Readiness = Literal["ready", "loading", "draining"]


class Refused(Exception):
    """A request the service will not serve now. ``status`` is the HTTP status that names the reason (503:
    not ready, queue full or draining; 504: no answer in time; 500: the batch failed); REST answers it,
    gRPC maps it to its status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def readiness(state: ServiceState) -> Readiness:
    """Ready: a model is loaded and warm and the service is not draining."""
    if state.draining:
        return "draining"
    return "ready" if state.ready and state.engine is not None else "loading"


def not_ready(state: ServiceState) -> Refused | None:
    """Why the service cannot serve now (503), or None when it is ready."""
    status = readiness(state)
    if status == "ready":
        return None
    return Refused(503, "service is shutting down" if status == "draining" else "service is not ready")


def key_matches(state: ServiceState, supplied: bytes) -> bool:
    """No key is set, or ``supplied`` is it (compared as bytes, in constant time). Counts nothing."""
    expected = state.settings.api_key
    return expected is None or hmac.compare_digest(supplied, expected.get_secret_value().encode("utf-8"))


def key_accepted(state: ServiceState, supplied: bytes) -> bool:
    """:func:`key_matches`; a refusal is counted."""
    if key_matches(state, supplied):
        return True
    state.metrics.rejections.labels("unauthorized").inc()
    return False


def has_room(state: ServiceState, batcher_name: str) -> bool:
    """The endpoint's queue takes images now (no refusal to count: :func:`queue_refusal` says why not)."""
    batcher = state.batchers[batcher_name]
    return not state.draining and batcher.accepting and batcher.free > 0


def queue_refusal(state: ServiceState, batcher_name: str) -> Refused | None:
    """Why the endpoint's queue takes nothing now (503: draining, or full), or None when it has room.

    Checked before a request's body is read or decoded, so an overloaded service answers at once, instead
    of after receiving and decoding an upload it would refuse anyway. (A request admitted here can still
    find the queue full after decoding; :func:`submit` refuses it then.)
    """
    batcher = state.batchers[batcher_name]
    if state.draining or not batcher.accepting:
        state.metrics.rejections.labels("shutting_down").inc()
        return Refused(503, "service is shutting down")
    if batcher.free <= 0:
        state.metrics.rejections.labels("queue_full").inc()
        return Refused(503, f"{batcher_name} queue is full ({batcher.depth} of {batcher.queue_size} images)")
    return None


async def submit(state: ServiceState, batcher_name: str, payloads: list) -> list:
    """Submit to an endpoint's batcher; its refusals become :class:`Refused`."""
    settings = state.settings
    try:
        return await state.batchers[batcher_name].submit(payloads, settings.request_timeout_s)
    except QueueFull as exc:
        state.metrics.rejections.labels("queue_full").inc()
        raise Refused(503, str(exc)) from None
    except ShuttingDown as exc:
        state.metrics.rejections.labels("shutting_down").inc()
        raise Refused(503, str(exc)) from None
    except TimeoutError:
        state.metrics.rejections.labels("timeout").inc()
        raise Refused(504, f"no answer within {settings.request_timeout_s:g} s") from None
    except BatchFailed as exc:
        state.metrics.rejections.labels("batch_failed").inc()
        raise Refused(500, f"inference failed for the batch holding this request: {exc}") from None
