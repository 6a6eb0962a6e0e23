"""The torch engine (:class:`service.inference.contract.Engine`): the model on its device, precision
choice, warm-up, and the batch functions the batchers call.

Everything here runs on the model threads (see :mod:`service.inference.batcher`), never on the event loop;
with two lanes two batches run at once, so nothing here keeps per-batch state on the engine (and
Grad-CAM splits the network by block rather than hooking it).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from camcore.bundle import Bundle
from camcore.cam import class_activation_maps
from camcore.forward import AUTOCAST_DTYPES, Precision, ServedForward, TestTimeAugmentation
from camcore.road import road_scores
from service.inference.jobs import GradcamJob, GradcamRow
from service.inference.tracing import traced_forward

log = logging.getLogger("camserve.engine")

MIN_AGREEMENT = 0.995  # top-1 agreement with fp32 on the test set a faster mode must keep


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def low_precision_modes(device: torch.device) -> list[str]:
    """Reduced-precision modes worth timing on this device.

    No capability check on a CPU: where bf16 is not native (no AVX-512 BF16 or AMX) oneDNN emulates
    it, which is slower than fp32, so the start-up timing rejects it by itself.
    """
    if device.type == "cuda":
        return ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["bf16"]


class TorchEngine:
    """One bundle on one device at its serving precision, in torch: the batch functions the batchers call."""

    def __init__(
        self,
        bundle: Bundle,
        device: torch.device,
        precision: str,
        batch_size: int,
        trace: bool = True,
        tta: TestTimeAugmentation = "none",
        runtime_reason: str = "",
    ) -> None:
        self.bundle = bundle
        self.runtime = f"torch {torch.__version__}"
        self.runtime_reason = runtime_reason
        self.tta = tta
        self.device = device
        self.model = bundle.model.to(device=device, memory_format=torch.channels_last).eval()
        self.batch_size = batch_size
        self.precision, self.precision_reason = self._choose_precision(precision)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.forward = ServedForward.from_bundle(bundle, precision=self.precision, tta=tta).eval()
        # ROAD scores the plain network (no TTA views, no temperature) at the serving precision.
        self.plain_forward = self.forward.plain()
        self.traced, self.trace_reason = self._trace() if trace else (None, "off (CAMSERVE_TRACE=false)")

    @property
    def compiled(self) -> bool:
        return self.traced is not None

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    # -- precision -------------------------------------------------------------------------------
    def _choose_precision(self, requested: str) -> tuple[str, str]:
        if requested != "auto":
            return requested, f"set by CAMSERVE_PRECISION={requested}"
        agreement: dict[str, float] = self.bundle.metadata.get("precision_agreement", {})
        candidates = ["fp32"]
        skipped = []
        for mode in low_precision_modes(self.device):
            measured = agreement.get(mode)
            if measured is not None and measured >= MIN_AGREEMENT:
                candidates.append(mode)
            else:
                skipped.append(f"{mode} (top-1 agreement {measured if measured is not None else 'not measured'})")
        timings = {mode: self._time_forward(mode) for mode in candidates}
        best = min(timings, key=timings.__getitem__)
        parts = [f"{m} {t * 1000:.1f} ms" for m, t in timings.items()]
        reason = f"fastest at batch {self.batch_size} of " + ", ".join(parts)
        if best != "fp32":
            reason += f"; top-1 agreement with fp32 {agreement[best]:.2%} >= {MIN_AGREEMENT:.1%}"
        if skipped:
            reason += "; not eligible: " + ", ".join(skipped)
        return best, reason

    @torch.inference_mode()
    def _time_forward(self, mode: Precision, repeats: int = 3) -> float:
        x = torch.zeros(self.batch_size, 3, 32, 32, dtype=torch.uint8, device=self.device)
        forward = ServedForward.from_bundle(self.bundle, precision=mode).eval()
        best = float("inf")
        for i in range(repeats + 1):
            self._sync()
            started = time.perf_counter()
            forward(x)
            self._sync()
            if i:  # the first call pays one-off kernel selection
                best = min(best, time.perf_counter() - started)
        return best

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- tracing ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _trace(self) -> tuple[torch.jit.ScriptModule | None, str]:
        """/predict's forward as one TorchScript call, kept only if it matches eager mode bit for bit.

        Eager mode takes the GIL back after every op (~40 per pass); while the event loop holds it,
        the model thread and torch's intra-op workers sit idle. A traced module runs the whole pass in
        C++ with the GIL released once. Only the ops are recorded (same kernels, same autocast casts),
        and graph optimisation is off, so the numbers are eager mode's: checked here on a batch.
        """
        if self.device.type != "cpu":
            return None, f"off on {self.device.type} (measured on CPU only)"
        example = torch.randint(0, 256, (self.batch_size, 3, 32, 32), dtype=torch.uint8, device=self.device)
        try:
            # Traced once per process and recipe, then reused bound to these weights: a trace per build
            # leaked ~100 MB per reload (service/inference/tracing.py).
            traced = traced_forward(self.forward, example)
            with torch.jit.optimized_execution(False):
                same = all(torch.equal(traced(x), self.forward(x)) for x in (example, example[:3]))
        except Exception as exc:  # an op the tracer cannot record: eager mode still works
            log.warning("TorchScript trace failed, /predict runs eagerly: %s", exc)
            return None, f"failed ({type(exc).__name__})"
        if not same:
            log.warning("TorchScript trace disagrees with eager mode, /predict runs eagerly")
            return None, "off (differs from eager mode)"
        return traced, "on"

    # -- batch functions -------------------------------------------------------------------------
    def predict(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Probabilities (softmax of the logits; with flip TTA, averaged over the two views) per image.

        Rows leave as numpy float32 arrays: what the event loop then does with them (top-k, JSON)
        holds the GIL throughout, whereas every torch op there would let go of it and take it back,
        a hand-over to a model or decode thread and back each time under load."""
        batch = torch.stack(images).to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.traced is None:
                probabilities = self.forward(batch)
            else:
                with torch.jit.optimized_execution(False):
                    probabilities = self.traced(batch)
        return list(probabilities.cpu().numpy())

    def gradcam(self, jobs: list[GradcamJob]) -> list[GradcamRow]:
        """One forward+backward per distinct layer in the batch (usually one), each image its own target
        and method (every method reads the same activations and gradients); then, for the jobs that
        asked, the ROAD scores of all their heatmaps in one batched run."""
        heatmaps: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
        probabilities: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
        targets = [0] * len(jobs)
        for layer in dict.fromkeys(job.layer for job in jobs):
            index = [i for i, job in enumerate(jobs) if job.layer == layer]
            images = torch.stack([jobs[i].image for i in index]).to(self.device, non_blocking=True)
            out = class_activation_maps(
                self.forward, images, layer, [jobs[i].target for i in index], [jobs[i].method for i in index]
            )
            layer_probabilities, layer_heatmaps = out.probabilities.cpu(), out.heatmaps.cpu()
            for row, (i, target) in enumerate(zip(index, out.targets.tolist(), strict=True)):
                heatmaps[i], probabilities[i], targets[i] = layer_heatmaps[row], layer_probabilities[row], target
        scored = [i for i, job in enumerate(jobs) if job.road]
        road: dict[int, float] = {}
        if scored:
            scores = road_scores(
                self.plain_forward,
                torch.stack([jobs[i].image for i in scored]),
                torch.stack([heatmaps[i] for i in scored]),
                [targets[i] for i in scored],
            )
            road = dict(zip(scored, scores.tolist(), strict=True))
        return [GradcamRow(heatmaps[i], probabilities[i], targets[i], road.get(i)) for i in range(len(jobs))]

    def warm_up(self) -> None:
        """Pay kernel selection and allocator growth before the first request, not during it."""
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        for size in (1, self.batch_size):
            self.predict([image] * size)
        self.warm_up_gradcam()

    def warm_up_gradcam(self) -> None:
        """Grad-CAM's share of :meth:`warm_up` (an engine that runs /predict elsewhere warms only this)."""
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        self.gradcam([GradcamJob(image, self.bundle.default_cam_layer, None)] * min(self.batch_size, 8))
        self.gradcam([GradcamJob(image, self.bundle.default_cam_layer, None, road=True)])
