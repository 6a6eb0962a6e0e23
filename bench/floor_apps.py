"""The least an HTTP front in this stack can do per request, as ASGI apps for ``bench/front_cost.py``.

Each app answers ``POST /predict`` with a fixed answer of camserve's shape (one image, top 3), doing
only what its name says; none runs a model. Served by uvicorn (httptools), one process, they measure
the CPU a request costs before camserve's own work: issue 26 holds camserve's null-engine front to the
FastAPI route + 200 us (raw body) and the FastAPI route with a multipart read + 250 us.

* ``asgi``: bare ASGI callable: read the body, write the JSON (the server and protocol alone);
* ``starlette``: one Starlette route reading ``request.body()``;
* ``fastapi``: one FastAPI route taking ``Request``, reading the body (FastAPI's routing and
  endpoint machinery, no dependencies);
* ``fastapi_multipart``: as ``fastapi``, reading the file from ``request.form()`` (python-multipart);
* ``fastapi_multipart_decode``: as ``fastapi_multipart``, then Pillow decodes the file to a
  (32, 32, 3) array on the event loop (what camserve must do per image, at the cheapest place).
"""

from __future__ import annotations

import io
import json

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route

ANSWER = {
    "model_version": "0" * 12,
    "predictions": [
        {
            "filename": "a.png",
            "top_k": [
                {"label": "cat", "index": 3, "probability": 0.5},
                {"label": "dog", "index": 5, "probability": 0.3},
                {"label": "frog", "index": 6, "probability": 0.1},
            ],
        }
    ],
}
ANSWER_BYTES = json.dumps(ANSWER).encode()


async def asgi(scope, receive, send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        while message["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
            message = await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER_BYTES)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER_BYTES})


async def _starlette_predict(request):
    await request.body()
    return JSONResponse(ANSWER)


starlette = Starlette(routes=[Route("/predict", _starlette_predict, methods=["POST"])])

fastapi = FastAPI()


@fastapi.post("/predict")
async def _fastapi_predict(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(ANSWER)


fastapi_multipart = FastAPI()


async def _read_file(request: Request) -> bytes:
    form = await request.form()
    try:
        return await form.getlist("files")[0].read()
    finally:
        await form.close()


@fastapi_multipart.post("/predict")
async def _fastapi_multipart_predict(request: Request) -> JSONResponse:
    await _read_file(request)
    return JSONResponse(ANSWER)


fastapi_multipart_decode = FastAPI()


@fastapi_multipart_decode.post("/predict")
async def _fastapi_multipart_decode_predict(request: Request) -> JSONResponse:
    data = await _read_file(request)
    with Image.open(io.BytesIO(data)) as image:
        np.asarray(image.convert("RGB").resize((32, 32)))
    return JSONResponse(ANSWER)
