"""The peer in ``serve_bench.py``: the same network served by LitServe with LitServe's own batching.

Everything a fair comparison needs is shared with camserve: the bundle (``load_bundle``), the
upload decoding (``service.images.decode_image``, so preprocessing is byte-for-byte the same), and
the one forward recipe (``camcore.forward.ServedForward``: normalisation, channels_last, precision,
no TTA). Only the serving machinery differs.
Requests are multipart with a field ``files`` holding one image, like a single-image camserve
``/predict``; the answer has the same shape (top 3 per image).

LitServe hands ``decode_request`` the parsed form (starlette ``FormData``, pickled to the inference
worker process along with its ``UploadFile``s) when the parameter is not annotated and the request is
``multipart/form-data``; see ``litserve.server.BaseRequestHandler._prepare_request``.

    python bench/litserve_server.py --model-dir models/cifar10-resnet --port 8001 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from camcore.bundle import load_bundle
from camcore.forward import AUTOCAST_DTYPES, ServedForward
from service.decoding.probe import decode_image

MAX_IMAGE_PIXELS = 25_000_000  # camserve's default limit
TOP_K = 3  # camserve's default top_k


class CifarAPI(ls.LitAPI):
    """One image per request in, top-k out; LitServe gathers requests into batches for ``predict``."""

    def __init__(self, model_dir: str, precision: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_dir = model_dir
        self.precision = precision

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.model_dir)
        self.torch_device = torch.device(device)  # not `self.device`: LitServe resets that to a string
        self.classes = bundle.classes
        bundle.model.to(device=self.torch_device, memory_format=torch.channels_last)
        self.forward = ServedForward.from_bundle(bundle, precision=self.precision).eval()
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay kernel selection before the first request, as camserve's lifespan does."""
        for size in (1, self.max_batch_size):
            self._probabilities(torch.zeros(size, 3, 32, 32, dtype=torch.uint8))

    @torch.inference_mode()
    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images.to(self.torch_device, non_blocking=True)).cpu()

    def decode_request(self, request):  # unannotated on purpose: LitServe then passes the parsed form
        upload = request.getlist("files")[0]
        name = upload.filename or "upload"
        return name, decode_image(upload.file.read(), name, max_pixels=MAX_IMAGE_PIXELS)

    def batch(self, inputs: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
        names, images = zip(*inputs, strict=True)
        return list(names), torch.stack(images)

    def predict(self, batch: tuple[list[str], torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        names, images = batch
        return list(zip(names, self._probabilities(images).unbind(0), strict=True))

    def unbatch(self, output: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        return output

    def encode_response(self, output: tuple[str, torch.Tensor]):  # unannotated: LitServe's default response
        name, probabilities = output
        values, indices = probabilities.topk(TOP_K)
        top_k = [
            {"label": self.classes[i], "index": i, "probability": p}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        return {"predictions": [{"filename": name, "top_k": top_k}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--precision", choices=sorted(AUTOCAST_DTYPES), required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--workers", type=int, default=1, help="inference workers (processes) per device")
    args = parser.parse_args()

    api = CifarAPI(args.model_dir, args.precision, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="auto", devices=1, workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
