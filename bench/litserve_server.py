"""The LitServe peer: the same network served by LitServe with LitServe's own batching.

Everything a fair comparison needs is shared with camserve: the bundle (``load_bundle``), the
upload decoding (``service.decoding.probe.decode_image``, so preprocessing is byte-for-byte the same),
and the one forward recipe (``camcore.forward.ServedForward``: normalisation, precision, no TTA), run
by the same runtime camserve serves with:

* ``--runtime torch`` (fp32, bf16, fp16): the recipe in eager torch, channels_last, as before;
* ``--runtime openvino`` (fp32, bf16, int8): the recipe compiled by ``camcore.openvino_forward`` exactly
  as camserve's OpenVINO engine compiles it (int8: the bundle's quantized IR and its refitted
  temperature), one stream over every core, since LitServe's one inference worker runs one batch at a
  time. The default runtime is openvino for int8, torch otherwise.

Only the serving machinery differs. Requests are multipart with a field ``files`` holding one image,
like a single-image camserve ``/predict``; the answer has the same shape (top 3 per image).

LitServe hands ``decode_request`` the parsed form (starlette ``FormData``, pickled to the inference
worker process along with its ``UploadFile``s) when the parameter is not annotated and the request is
``multipart/form-data``; see ``litserve.server.BaseRequestHandler._prepare_request``.

    python bench/litserve_server.py --model-dir models/cifar10-resnet --port 8001 --precision int8
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import litserve as ls
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from camcore.bundle import Bundle, load_bundle, quantized_network_path
from camcore.forward import AUTOCAST_DTYPES, ServedForward
from service.decoding.probe import decode_image

MAX_IMAGE_PIXELS = 25_000_000  # camserve's default limit
TOP_K = 3  # camserve's default top_k
PRECISIONS = {"torch": sorted(AUTOCAST_DTYPES), "openvino": ["fp32", "bf16", "int8"]}


def torch_forward(bundle: Bundle, precision: str, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """The recipe in eager torch on ``device``: uint8 (N, 3, 32, 32) -> probabilities (N, classes)."""
    bundle.model.to(device=device, memory_format=torch.channels_last)
    forward = ServedForward.from_bundle(bundle, precision=precision).eval()

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return forward(torch.from_numpy(images).to(device, non_blocking=True)).cpu().numpy()

    return run


def openvino_forward(bundle: Bundle, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """The recipe compiled as ``service/inference/openvino_engine.py`` compiles it, one infer request."""
    from camcore import openvino_forward as ovf

    temperature = bundle.temperature
    if precision == "int8":
        network = ovf.read_network(quantized_network_path(bundle))
        temperature = float(bundle.metadata["quantized"].get("temperature", temperature))
    else:
        network = ovf.convert_network(bundle.model)
    recipe = ServedForward(bundle.model, bundle.mean, bundle.std, temperature=temperature)
    compiled = ovf.compile_served(
        ovf.served_model(recipe, network), precision, streams=1, threads=len(os.sched_getaffinity(0))
    )
    request = compiled.create_infer_request()
    return lambda images: ovf.run(request, images)


class CifarAPI(ls.LitAPI):
    """One image per request in, top-k out; LitServe gathers requests into batches for ``predict``."""

    def __init__(self, model_dir: str, runtime: str, precision: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_dir = model_dir
        self.runtime = runtime
        self.precision = precision

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.model_dir)
        self.classes = bundle.classes
        if self.runtime == "openvino":
            self.forward = openvino_forward(bundle, self.precision)
        else:  # not `self.device`: LitServe resets that to a string
            self.forward = torch_forward(bundle, self.precision, torch.device(device))
        for size in (1, self.max_batch_size):  # pay kernel selection before the first request, as camserve does
            self.forward(np.zeros((size, 3, 32, 32), dtype=np.uint8))

    def decode_request(self, request):  # unannotated on purpose: LitServe then passes the parsed form
        upload = request.getlist("files")[0]
        name = upload.filename or "upload"
        return name, decode_image(upload.file.read(), name, max_pixels=MAX_IMAGE_PIXELS).numpy()

    def batch(self, inputs: list[tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
        names, images = zip(*inputs, strict=True)
        return list(names), np.stack(images)

    def predict(self, batch: tuple[list[str], np.ndarray]) -> list[tuple[str, np.ndarray]]:
        names, images = batch
        return list(zip(names, self.forward(images), strict=True))

    def unbatch(self, output: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
        return output

    def encode_response(self, output: tuple[str, np.ndarray]):  # unannotated: LitServe's default response
        name, probabilities = output
        indices = np.argsort(-probabilities, kind="stable")[:TOP_K]
        top_k = [{"label": self.classes[i], "index": int(i), "probability": float(probabilities[i])} for i in indices]
        return {"predictions": [{"filename": name, "top_k": top_k}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--precision", choices=sorted({p for ps in PRECISIONS.values() for p in ps}), required=True)
    parser.add_argument("--runtime", choices=sorted(PRECISIONS), help="default: openvino for int8, else torch")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--workers", type=int, default=1, help="inference workers (processes) per device")
    args = parser.parse_args()
    runtime = args.runtime or ("openvino" if args.precision == "int8" else "torch")
    if args.precision not in PRECISIONS[runtime]:
        parser.error(f"--runtime {runtime} serves {', '.join(PRECISIONS[runtime])}, not {args.precision}")

    api = CifarAPI(args.model_dir, runtime, args.precision, args.max_batch_size, args.batch_timeout)
    accelerator = "cpu" if runtime == "openvino" else "auto"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
