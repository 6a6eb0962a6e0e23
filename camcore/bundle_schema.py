"""What ``model.json`` must say beyond its required keys: the records the service reads, in the shape it reads them.

:func:`camcore.bundle.load_bundle` validates a bundle's metadata against :class:`BundleMetadata` (strictly:
a number is a JSON number, never a string or a boolean; no NaN or infinity), so a bundle whose
calibration record, Grad-CAM record, ROAD table or misclassified list the service could not show is
refused when it is loaded, at start-up or on a reload, rather than serving 500s from ``/health`` or
``/misclassified`` afterwards (issue 24: ``calibration.test: []`` or ``gradcam: []``).

The tables the service reports as they are written (reliability bins, calibration metrics, the ROAD
table) are defined here once: ``service/api/schemas.py`` answers with these same models. Keys nobody
reads (the recipe, the confusion matrix, provenance) may hold anything.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# A name the Open Inference Protocol's paths (/v2/models/<name>) and the metrics' labels can carry.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]


class _Record(BaseModel):
    """A table the service reads: unknown keys ignored, every number finite."""

    model_config = ConfigDict(allow_inf_nan=False)


class ReliabilityBin(_Record):
    lower: float = Field(description="the bin holds images whose top-1 probability is in (lower, upper]")
    upper: float
    count: int
    confidence: float | None = Field(description="mean top-1 probability in the bin; null when empty")
    accuracy: float | None = Field(description="fraction of the bin's images whose top-1 class is right")


class CalibrationMetrics(_Record):
    images: int
    accuracy: float
    ece: float = Field(description="expected calibration error, top-1, equal-width bins")
    nll: float = Field(description="mean negative log-likelihood of the true class")
    brier: float = Field(description="mean squared distance to the one-hot label, summed over classes")
    mean_confidence: float
    reliability: list[ReliabilityBin]


class CalibrationComparison(_Record):
    before: CalibrationMetrics = Field(description="T = 1: the network's own probabilities")
    after: CalibrationMetrics = Field(description="with the bundle's temperature, as served")
    top1_changed: int = Field(description="test images whose top-1 class the temperature changed")


class FittedOn(_Record):
    images: Count | None = None


class CalibrationRecord(_Record):
    """``model.json``'s ``calibration`` (camcore/calibration.py writes it): the temperature, and what
    ``/health`` shows of its fit and test-set figures."""

    temperature: Annotated[float, Field(gt=0, lt=1e3)] = 1.0
    fitted_for_tta: str | None = None
    fitted_on: FittedOn | None = None
    ece_bins: Count | None = None
    test: dict[str, CalibrationComparison] = Field(default_factory=dict)


class CamLayer(_Record):
    name: str
    channels: int
    output_size: int
    receptive_field: int
    jump: int


class GradcamRecord(_Record):
    default_layer: str | None = None
    layers: list[CamLayer] = Field(default_factory=list)


class BestCam(_Record):
    method: str
    layer: str
    road: float


class CamFaithfulness(_Record):
    """Mean ROAD per method and layer on test images, measured by ``bench/cam_faithfulness.py``."""

    metric: str = Field(examples=["ROAD"])
    definition: str
    images: int = Field(description="test images scored per method and layer")
    precision: str
    test_time_augmentation: str
    target: str = Field(examples=["predicted class"])
    layers: list[str]
    road: dict[str, dict[str, float]] = Field(
        description="method (and 'random', a random heatmap for scale) -> layer -> mean ROAD"
    )
    standard_error: dict[str, dict[str, float]]
    best: BestCam
    machine: str
    command: str
    started: str
    seconds: float


class MisclassifiedEntry(_Record):
    file: str = Field(description="a PNG inside the bundle directory, relative to it")
    test_index: Count
    true_label: str
    predicted_label: str
    confidence: Fraction


class BundleMetadata(BaseModel):
    """The keys of ``model.json`` that code reads besides the required ones (checked in camcore/bundle.py).

    A record that is absent is fine (``/health`` shows null or nothing); one that is present must have
    this shape; ``null`` stands in for a record only where the service reads it as optional."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] | None = None
    parameters: Count = 0
    test_accuracy: Fraction | None = None
    test_accuracy_flip_tta: Fraction | None = None
    val_accuracy: Fraction | None = None
    per_class_accuracy: dict[str, Fraction] = Field(default_factory=dict)
    precision_agreement: dict[str, Fraction] = Field(default_factory=dict)
    trained_epochs: Count | None = None
    training_seconds: Annotated[float, Field(ge=0)] | None = None
    hardware: str | None = None
    dataset: dict[str, Any] | str | None = None
    calibration: CalibrationRecord = Field(default_factory=CalibrationRecord)
    gradcam: GradcamRecord = Field(default_factory=GradcamRecord)
    cam_faithfulness: CamFaithfulness | None = None
    misclassified: list[MisclassifiedEntry] = Field(default_factory=list)
