"""Who gets in, for the JSON API and the Open Inference Protocol alike: readiness, the API key and room
in an endpoint's queue, checked before the body is read; and the batchers' refusals as HTTP answers.

One readiness function (:func:`readiness`) serves ``/readyz``, ``/v2/health/ready`` and every
endpoint's 503; every 503 says ``Retry-After: CAMSERVE_RETRY_AFTER_S``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request

from service.http.auth import authorize, checks_key
from service.inference.batcher import BatchFailed, QueueFull, ShuttingDown
from service.state import ServiceState

Readiness = Literal["ready", "loading", "draining"]


def readiness(state: ServiceState) -> Readiness:
    """Ready: a model is loaded and warm and the service is not draining."""
    if state.draining:
        return "draining"
    return "ready" if state.ready and state.engine is not None else "loading"


def retry_after(state: ServiceState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after_s)}


def service_state(request: Request) -> ServiceState:
    return request.app.state.camserve


async def ready_state(request: Request) -> ServiceState:
    """The service, once it is ready; else 503."""
    state = service_state(request)
    status = readiness(state)
    if status != "ready":
        detail = "service is shutting down" if status == "draining" else "service is not ready"
        raise HTTPException(503, detail, headers=retry_after(state))
    return state


@checks_key
async def authorized_state(request: Request) -> ServiceState:
    """The service, once it is ready (503) and the request carries the API key where one is set (401)."""
    state = await ready_state(request)
    authorize(state, request.headers)
    return state


State = Annotated[ServiceState, Depends(ready_state)]
AuthorizedState = Annotated[ServiceState, Depends(authorized_state)]


def admit(state: ServiceState, batcher_name: str) -> None:
    """503 while the endpoint's queue is full or the service drains.

    Called before the handler reads the body, so an overloaded service answers at once, instead of
    after receiving and decoding an upload it would refuse anyway. (A request admitted here can still
    find the queue full after decoding; :func:`submit` refuses it then.)
    """
    batcher = state.batchers[batcher_name]
    if state.draining or not batcher.accepting:
        state.metrics.rejections.labels("shutting_down").inc()
        raise HTTPException(503, "service is shutting down", headers=retry_after(state))
    if batcher.free <= 0:
        state.metrics.rejections.labels("queue_full").inc()
        detail = f"{batcher_name} queue is full ({batcher.depth} of {batcher.queue_size} images)"
        raise HTTPException(503, detail, headers=retry_after(state))


def admitted(batcher_name: str) -> Any:
    """The one dependency of an endpoint that queues images: ready, authorised, and room in its queue,
    checked in that order before the body is read. One dependency, not three: FastAPI's solving of
    each costs the single-image request more than the check itself (service/http/auth.py)."""

    @checks_key
    async def dependency(request: Request) -> ServiceState:
        state = await authorized_state(request)
        admit(state, batcher_name)
        return state

    return Annotated[ServiceState, Depends(dependency)]


async def submit(state: ServiceState, batcher_name: str, payloads: list) -> list:
    """Submit to an endpoint's batcher, turning its refusals into HTTP answers."""
    settings = state.settings
    try:
        return await state.batchers[batcher_name].submit(payloads, settings.request_timeout_s)
    except QueueFull as exc:
        state.metrics.rejections.labels("queue_full").inc()
        raise HTTPException(503, str(exc), headers=retry_after(state)) from None
    except ShuttingDown as exc:
        state.metrics.rejections.labels("shutting_down").inc()
        raise HTTPException(503, str(exc), headers=retry_after(state)) from None
    except TimeoutError:
        state.metrics.rejections.labels("timeout").inc()
        raise HTTPException(504, f"no answer within {settings.request_timeout_s:g} s") from None
    except BatchFailed as exc:
        state.metrics.rejections.labels("batch_failed").inc()
        raise HTTPException(500, f"inference failed for the batch holding this request: {exc}") from None
