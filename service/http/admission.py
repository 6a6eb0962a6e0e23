"""Who gets in, for the JSON API and the Open Inference Protocol alike: readiness, the API key and room
in an endpoint's queue, checked before the body is read; and the batchers' refusals as HTTP answers.

The checks themselves are the protocol-neutral ones gRPC uses too (service/fronts/gate.py); this
module turns their refusals into HTTP answers. Every 503 says ``Retry-After: CAMSERVE_RETRY_AFTER_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service.fronts import gate
from service.fronts.gate import Readiness as Readiness
from service.fronts.gate import readiness as readiness
from service.http.auth import authorize, checks_key
from service.state import ServiceState

T = TypeVar("T")


def retry_after(state: ServiceState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after_s)}


def service_state(request: Request) -> ServiceState:
    return request.app.state.camserve


async def ready_state(request: Request) -> ServiceState:
    """The service, once it is ready; else 503."""
    state = service_state(request)
    refusal = gate.not_ready(state)
    if refusal is not None:
        raise HTTPException(refusal.status, str(refusal), headers=retry_after(state))
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
    """503 while the endpoint's queue is full or the service drains (:func:`service.fronts.gate.queue_refusal`)."""
    refusal = gate.queue_refusal(state, batcher_name)
    if refusal is not None:
        raise HTTPException(refusal.status, str(refusal), headers=retry_after(state))


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


async def _unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
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
            while (await receive())["type"] != "http.disconnect":
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
    return await submit_watching(state, batcher_name, payloads, None if request is None else request.receive)


async def submit_watching(state: ServiceState, batcher_name: str, payloads: list, receive: Receive | None) -> list:
    """:func:`submit` for a caller holding the ASGI ``receive`` (the front's direct routes)."""
    work = gate.submit(state, batcher_name, payloads)
    try:
        return await (work if receive is None else _unless_client_leaves(receive, work))
    except gate.Refused as exc:
        headers = retry_after(state) if exc.status == 503 else None
        raise HTTPException(exc.status, str(exc), headers=headers) from None
