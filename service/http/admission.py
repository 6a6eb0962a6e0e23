"""Who gets in, for the JSON API and the Open Inference Protocol alike: readiness, the API key and room
in an endpoint's queue, checked before the body is read; and the batchers' refusals as HTTP answers.

One readiness function (:func:`readiness`) serves ``/readyz``, ``/v2/health/ready`` and every
endpoint's 503; every 503 says ``Retry-After: CAMSERVE_RETRY_AFTER_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, HTTPException, Request
from starlette.requests import ClientDisconnect

from service.http.auth import authorize, checks_key
from service.inference.batcher import BatchFailed, QueueFull, ShuttingDown
from service.state import ServiceState

Readiness = Literal["ready", "loading", "draining"]
T = TypeVar("T")


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


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled as soon as the client disconnects (then :class:`ClientDisconnect`, a 499).

    The body has been read by now, so the next ASGI message is ``http.disconnect``: under uvicorn it
    comes when the connection is lost, under an in-process client when the answer is complete. A
    watcher task waits for it and cancels this one; cancelled, the batcher's ``submit`` cancels its
    images' futures, and a batch that has not started drops them (``camserve_dropped_images``).
    """
    task = asyncio.current_task()
    assert task is not None
    left = False
    finished = False

    async def watch() -> None:
        nonlocal left
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass  # body bytes after the body (none with a well-behaved server): nothing to do with them
        except Exception:  # a receive that fails cannot tell us anything: stop watching
            return
        if not finished:
            left = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:
            raise ClientDisconnect() from None
        raise
    finally:
        finished = True
        watcher.cancel()


async def submit(state: ServiceState, batcher_name: str, payloads: list, request: Request | None = None) -> list:
    """Submit to an endpoint's batcher, turning its refusals into HTTP answers; with ``request``, the
    images that have not started are dropped when its client disconnects."""
    settings = state.settings
    work = state.batchers[batcher_name].submit(payloads, settings.request_timeout_s)
    try:
        return await (work if request is None else _unless_client_leaves(request, work))
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
