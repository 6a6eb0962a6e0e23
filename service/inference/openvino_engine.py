"""The OpenVINO engine (:class:`service.inference.contract.Engine`): /predict's forward compiled for the CPU,
Grad-CAM and ROAD on the torch engine it holds (they need gradients).

The forward is the one recipe (:class:`camcore.forward.ServedForward`) converted and compiled by
:mod:`camcore.openvino_forward`, at the precision :func:`service.inference.choice.openvino_precision` picks:
int8 runs the bundle's quantized network (verified against model.json's sha256 when the bundle was
loaded), with the temperature refitted for it where model.json records one.

Threads: the service's model lanes (service/app.py ``parallelism``) each run a batch at once; the
compiled model gets as many OpenVINO streams, each on its share of the threads, and one infer request
per lane (an infer request serves one call at a time). Measured in bench/results/runtimes.md against
one stream over all the threads. ``infer`` releases the GIL for the whole pass.
"""

from __future__ import annotations

import logging
import queue

import numpy as np
import torch

from camcore import openvino_forward as ovf
from camcore.bundle import Bundle, BundleError, quantized_network_path
from camcore.forward import ServedForward
from service.inference.choice import openvino_precision
from service.inference.jobs import GradcamJob, GradcamRow
from service.inference.torch_engine import TorchEngine

log = logging.getLogger("camserve.engine")


class OpenVinoEngine:
    """One bundle, /predict compiled by OpenVINO for the CPU; Grad-CAM delegated to ``gradcam_engine``."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str,
        gradcam_engine: TorchEngine,
        *,
        batch_size: int,
        tta: str = "none",
        streams: int = 1,
        threads: int | None = None,
        runtime_reason: str = "",
    ) -> None:
        self.bundle = bundle
        self.tta = tta
        self.batch_size = batch_size
        self.gradcam_engine = gradcam_engine
        self.model = gradcam_engine.model  # the torch network: its blocks are Grad-CAM's layers
        self.runtime = f"openvino {ovf.openvino_version()}"
        self.runtime_reason = runtime_reason
        self.precision, self.precision_reason = openvino_precision(bundle, precision, tta, ovf.native_bf16())
        temperature = bundle.temperature
        if self.precision == "int8":
            xml = quantized_network_path(bundle)
            try:
                network = ovf.read_network(xml)
            except RuntimeError as exc:  # right sha256, yet not a network OpenVINO reads
                raise BundleError(f"{xml}: not a readable OpenVINO IR ({exc})") from exc
            temperature = float(bundle.metadata["quantized"].get("temperature", temperature))
        else:
            network = ovf.convert_network(bundle.model)
        recipe = ServedForward(bundle.model, bundle.mean, bundle.std, tta=tta, temperature=temperature)
        self.temperature = temperature
        self.compiled_model = ovf.compile_served(
            ovf.served_model(recipe, network), self.precision, streams=streams, threads=threads
        )
        self.streams = int(self.compiled_model.get_property("NUM_STREAMS"))
        self.threads = int(self.compiled_model.get_property("INFERENCE_NUM_THREADS"))
        self.trace_reason = (
            f"on (OpenVINO {self.precision}, inference precision "
            f"{self.compiled_model.get_property('INFERENCE_PRECISION_HINT')}, {self.streams} stream(s) over "
            f"{self.threads} thread(s); Grad-CAM on torch {gradcam_engine.precision})"
        )
        # One infer request per lane: a request runs one call at a time, and a lane holds one while it runs.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, self.streams)):
            self._requests.put(self.compiled_model.create_infer_request())

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def compiled(self) -> bool:
        return True

    def predict(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Served probabilities per image, numpy float32 rows, as the torch engine answers them.

        The batch is stacked with numpy (no torch op: each would let go of the GIL and take it back)."""
        batch = np.stack([image.numpy() for image in images])
        request = self._requests.get()
        try:
            probabilities = ovf.run(request, batch)
        finally:
            self._requests.put(request)
        return list(probabilities)

    def gradcam(self, jobs: list[GradcamJob]) -> list[GradcamRow]:
        return self.gradcam_engine.gradcam(jobs)

    def warm_up(self) -> None:
        """Every infer request at batch 1 and the batch size (OpenVINO sizes its buffers per shape at the
        first call), then the torch engine's Grad-CAM passes."""
        image = np.zeros((1, 3, 32, 32), dtype=np.uint8)
        requests = [self._requests.get() for _ in range(self.streams)]
        try:
            for request in requests:
                for size in (1, self.batch_size):
                    ovf.run(request, np.repeat(image, size, axis=0))
        finally:
            for request in requests:
                self._requests.put(request)
        self.gradcam_engine.warm_up_gradcam()
