"""The serving bundle: the only artefact the service loads.

A bundle is a directory with

* ``model.safetensors``: fp32 weights (safetensors, never a pickle, so loading runs no code);
* ``model.json``: format version, classes, normalisation, input size, architecture, metrics,
  training provenance and the weights' sha256;
* ``misclassified/``: PNGs of test images the model got wrong, listed in ``model.json``;
* optionally ``model_int8.xml``/``.bin``: the network quantized to INT8 as OpenVINO IR (XML and raw
  tensors: reading them runs no code), their sha256 and measurements in ``model.json``'s ``quantized``.

Writing and reading live side by side so the format has one definition.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from camcore.bundle_schema import BundleMetadata
from camcore.network import ARCHITECTURE, CifarResNet, build_network, count_parameters
from camcore.preprocess import Normalize

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
MISCLASSIFIED_DIR = "misclassified"
QUANTIZED_KEY = "quantized"
QUANTIZED_XML = "model_int8.xml"
QUANTIZED_BIN = "model_int8.bin"
REQUIRED_KEYS = ("format", "architecture", "classes", "mean", "std", "input_size", "weights_sha256")
INPUT_SIZE = 32  # what cifar-resnet9 takes (camcore.network), and what uploads are resized to
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_MISCLASSIFIED_BYTES = 1 << 20  # a 32x32 PNG is ~3 KB; /misclassified holds every one in memory


class BundleError(RuntimeError):
    """A bundle that cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Bundle:
    model: CifarResNet
    metadata: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def version(self) -> str:
        return str(self.metadata["weights_sha256"])

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.path.name)

    @property
    def mean(self) -> list[float]:
        return list(self.metadata["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.metadata["std"])

    @property
    def temperature(self) -> float:
        """Logits are divided by this before the softmax (temperature scaling); 1.0 if not calibrated."""
        return float(self.metadata.get("calibration", {}).get("temperature", 1.0))

    @property
    def default_cam_layer(self) -> str:
        """The layer Grad-CAM explains by default: what the bundle recorded, else the network's."""
        recorded = self.metadata.get("gradcam", {}).get("default_layer")
        return recorded if recorded in self.model.blocks else self.model.default_cam_layer

    def file(self, name: str) -> Path:
        """The bundle's file ``name`` (as model.json lists it), checked to lie inside the bundle directory."""
        return inside(self.path, name)


def inside(root: Path, name: str) -> Path:
    """``root / name`` resolved, refused unless it stays inside ``root``: no absolute path, no ``..``, no
    symlink (of the file or of a folder on the way) that leads out. A bundle is data from wherever it was
    copied from; a name in it must never make the service read, or serve, any other file."""
    if not name or "\x00" in name or "\\" in name:
        raise BundleError(f"{root / METADATA_FILE}: file name {name!r} is empty or holds a NUL or backslash")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise BundleError(f"{root / METADATA_FILE}: file {name!r} must be a relative path inside the bundle")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise BundleError(f"{root / name}: leads out of the bundle directory (to {target})")
    return target


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: missing (not a serving bundle?)")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise BundleError(f"{meta_path}: missing keys {missing}")
    if metadata["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: bundle format {metadata['format']!r}, this code reads {BUNDLE_FORMAT}")
    if metadata["architecture"] != ARCHITECTURE:
        raise BundleError(f"{meta_path}: architecture {metadata['architecture']!r}, expected {ARCHITECTURE!r}")
    classes = metadata["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{meta_path}: 'classes' must be a non-empty list of names")
    # Pixels are normalised as (x / 255 - mean) / std: a mean outside the pixels' range, or a std of 0 (or
    # 1e-300, or 1e308), gives infinities and NaN, then every answer is a 500 (issue 24).
    for key, low, low_open in (("mean", 0.0, False), ("std", 0.0, True)):
        value = metadata[key]
        numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not (numbers and len(value) == 3 and all(math.isfinite(v) for v in value)):
            raise BundleError(f"{meta_path}: '{key}' must be three numbers, one per RGB channel")
        if not all((low < v if low_open else low <= v) and v <= 1 for v in value):
            bounds = "(0, 1]" if low_open else "[0, 1]"
            raise BundleError(f"{meta_path}: '{key}' {value} must lie in {bounds} (pixels scaled to [0, 1])")
    if metadata["input_size"] != INPUT_SIZE or isinstance(metadata["input_size"], bool):
        raise BundleError(f"{meta_path}: 'input_size' {metadata['input_size']!r}, {ARCHITECTURE} takes {INPUT_SIZE}")
    calibration = metadata.get("calibration", {})
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, dict) else None
    if not (isinstance(temperature, int | float) and not isinstance(temperature, bool) and 0 < temperature < 1e3):
        raise BundleError(f"{meta_path}: 'calibration.temperature' must be a positive number")
    try:
        BundleMetadata.model_validate(metadata, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(map(str, error['loc']))}': {error['msg']}" for error in exc.errors(include_url=False)[:3]
        )
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise BundleError(f"{meta_path}: not what the service reads: {problems}{more}") from None
    return metadata


def _check_misclassified(path: Path, metadata: dict[str, Any]) -> None:
    """Every listed image inside the bundle, a PNG of a sane size, labelled with the bundle's classes. One that
    is absent is skipped by the service (the gallery is optional), so it is allowed here too."""
    classes = set(metadata["classes"])
    for entry in metadata.get("misclassified", []):
        file = inside(path, entry["file"])
        unknown = {entry["true_label"], entry["predicted_label"]} - classes
        if unknown:
            raise BundleError(f"{path / METADATA_FILE}: misclassified {entry['file']!r}: unknown labels {unknown}")
        if not file.is_file():
            continue
        with file.open("rb") as handle:
            head = handle.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE or file.stat().st_size > MAX_MISCLASSIFIED_BYTES:
            raise BundleError(f"{file}: not a PNG of at most {MAX_MISCLASSIFIED_BYTES} bytes")


@torch.inference_mode()
def _check_outputs(path: Path, model: CifarResNet, metadata: dict[str, Any]) -> None:
    """Finite probabilities on one noise image (every grey level from black to white, ~0.1 s), normalised,
    through the network and divided by the temperature as served (camcore.forward's steps; that module
    builds on this one): what no check on one value alone can see, NaN or infinite weights, and weights
    and normalisation that overflow together."""
    temperature = float(metadata.get("calibration", {}).get("temperature", 1.0))
    probe = torch.randint(0, 256, (1, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8, generator=torch.Generator())
    logits = model(Normalize(metadata["mean"], metadata["std"])(probe)).float()
    if torch.isfinite((logits / temperature).softmax(1)).all():
        return
    for name, tensor in model.state_dict().items():  # only now, to name the culprit (a scan costs as much)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(f"{path / WEIGHTS_FILE}: '{name}' holds NaN or infinity")
    raise BundleError(
        f"{path}: the network answers NaN or infinity with this bundle's weights, mean, std and temperature"
    )


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle: fp32 network in eval mode returning logits, plus its metadata.

    Every failure is a :class:`BundleError` naming the offending file, so a bad deployment stops at
    start-up with a message an operator can act on instead of serving garbage.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory does not exist")
    inside(path, METADATA_FILE)
    metadata = _read_metadata(path)
    _check_misclassified(path, metadata)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: missing")
    inside(path, WEIGHTS_FILE)
    actual = sha256_of(weights_path)
    if actual != metadata["weights_sha256"]:
        raise BundleError(
            f"{weights_path}: sha256 {actual} does not match {METADATA_FILE}'s {metadata['weights_sha256']}"
            " (corrupt or replaced weights)"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    model = build_network(num_classes=len(metadata["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(
            f"{weights_path}: weights do not fit {ARCHITECTURE} with {len(metadata['classes'])} classes ({exc})"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    recorded_layer = metadata.get("gradcam", {}).get("default_layer")
    if recorded_layer is not None and recorded_layer not in model.blocks:
        raise BundleError(
            f"{path / METADATA_FILE}: 'gradcam.default_layer' {recorded_layer!r} is none of {list(model.blocks)}"
        )
    _check_outputs(path, model, metadata)
    verify_quantized(path, metadata)
    return Bundle(model=model, metadata=metadata, path=path)


def verify_quantized(path: Path, metadata: dict[str, Any]) -> None:
    """The optional INT8 network, checked like the weights: each file ``quantized.files`` lists exists and
    has its sha256, it was quantized from these very weights, and its temperature is a positive number.
    A bundle without the section has nothing to check; a bad one is refused whole (BundleError)."""
    record = metadata.get(QUANTIZED_KEY)
    if record is None:
        return
    meta_path = path / METADATA_FILE
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or set(files) != {QUANTIZED_XML, QUANTIZED_BIN}:
        raise BundleError(
            f"{meta_path}: '{QUANTIZED_KEY}.files' must give the sha256 of {QUANTIZED_XML} and {QUANTIZED_BIN}"
        )
    if record.get("weights_sha256") != metadata["weights_sha256"]:
        raise BundleError(
            f"{meta_path}: the quantized network was made from weights {record.get('weights_sha256')}, not these "
            f"({metadata['weights_sha256']}): quantize again"
        )
    temperature = record.get("temperature", 1.0)
    if not (isinstance(temperature, int | float) and not isinstance(temperature, bool) and 0 < temperature < 1e3):
        raise BundleError(f"{meta_path}: '{QUANTIZED_KEY}.temperature' must be a positive number")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (listed in {METADATA_FILE}'s {QUANTIZED_KEY}.files)")
        actual = sha256_of(file)
        if actual != expected:
            raise BundleError(
                f"{file}: sha256 {actual} does not match {METADATA_FILE}'s {expected}"
                " (corrupt or replaced quantized network)"
            )


def quantized_network_path(bundle: Bundle) -> Path:
    """The INT8 network's IR (its ``.bin`` beside it), verified by :func:`load_bundle` when the bundle was loaded."""
    if QUANTIZED_KEY not in bundle.metadata:
        raise BundleError(f"{bundle.path}: no quantized network (python -m training quantize writes one)")
    return bundle.path / QUANTIZED_XML


def write_bundle(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """Write weights and ``model.json``; fills in format, architecture, parameters and sha256.

    The caller writes any ``misclassified/`` images first and lists them in ``metadata``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights_path = path / WEIGHTS_FILE
    state = {
        key: (value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()).contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(state, str(weights_path), metadata={"format": str(BUNDLE_FORMAT), "architecture": ARCHITECTURE})
    full = {
        "format": BUNDLE_FORMAT,
        "architecture": ARCHITECTURE,
        "parameters": count_parameters(model),
        **metadata,
        "weights_sha256": sha256_of(weights_path),
    }
    (path / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return path
