"""Response models: the HTTP contract the web page, the container and the tests rely on."""

from __future__ import annotations

from pydantic import BaseModel, Field

# The bundle's own tables, answered as model.json records them (and as load_bundle verified them).
from camcore.bundle_schema import CalibrationComparison, CamFaithfulness
from service.http.errors import error_responses


class ClassScore(BaseModel):
    label: str = Field(examples=["cat"])
    index: int = Field(examples=[3])
    probability: float = Field(examples=[0.91])


class Prediction(BaseModel):
    filename: str = Field(examples=["cat.png"])
    top_k: list[ClassScore]


class PredictResponse(BaseModel):
    model_version: str = Field(description="sha256 of the served weights")
    predictions: list[Prediction] = Field(description="one per uploaded file, in the order sent")


class GradcamResult(BaseModel):
    filename: str
    label: str = Field(description="predicted class")
    probability: float = Field(description="probability of the predicted class")
    target: str = Field(description="class the heatmap explains")
    target_index: int
    target_probability: float
    layer: str
    method: str = Field(description="CAM method: gradcam, hirescam, gradcampp, xgradcam or layercam")
    road: float | None = Field(
        None,
        description="ROAD faithfulness of the heatmap (with faithfulness=road; else null): the mean over percentiles "
        "10..90 of (drop in the target's probability when the least relevant pixels are removed minus when the most "
        "relevant are) / 2, as pytorch-grad-cam's ROADCombined; higher is more faithful, a random heatmap scores ~0",
    )
    heatmap: list[list[float]] = Field(description="H x W values in [0, 1] at the model's input resolution")
    overlay_png: str = Field(description="base64 PNG: viridis heatmap blended over the image")


class GradcamResponse(BaseModel):
    model_version: str
    results: list[GradcamResult]


class LayerInfo(BaseModel):
    name: str
    channels: int
    output_size: int
    receptive_field: int
    jump: int


class CalibrationInfo(BaseModel):
    temperature: float = Field(description="every view's logits are divided by T before its softmax")
    fitted_for_tta: str | None = Field(None, examples=["flip"], description="the TTA mode T was fitted for")
    fitted_on_images: int | None = Field(
        None, description="held-out training images T was fitted on, never test images"
    )
    ece_bins: int | None = Field(None, examples=[15])
    test: dict[str, CalibrationComparison] = Field(
        default_factory=dict, description="test-set figures per TTA mode ('flip', 'none'), before and after T"
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    architecture: str
    parameters: int
    classes: list[str]
    test_accuracy: float | None
    test_accuracy_flip_tta: float | None = None
    served_test_accuracy: float | None = Field(
        None, description="test accuracy of what this server answers: the flip TTA figure when it is on"
    )
    val_accuracy: float | None
    per_class_accuracy: dict[str, float]
    trained_epochs: int | None
    training_seconds: float | None = None
    hardware: str | None = None
    dataset: dict | str | None
    calibration: CalibrationInfo | None = Field(None, description="temperature scaling; null if not calibrated")


class GradcamInfo(BaseModel):
    layers: list[LayerInfo]
    default_layer: str
    methods: list[str] = Field(description="CAM methods /gradcam serves (method=)")
    default_method: str
    faithfulness: CamFaithfulness | None = Field(
        None, description="which method and layer to trust: the bundle's measured ROAD table, if it has one"
    )
    colormap: list[list[int]] = Field(
        description="256 RGB colours: heatmap value v is drawn as colormap[round(255 v)] (viridis)"
    )


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    model_lanes: int = Field(description="batches that run at once, each on its own model thread")
    torch_threads: int = Field(description="intra-op threads per batch")
    traced: bool = Field(description="/predict's forward runs as one TorchScript call")


class WorkerSlotInfo(BaseModel):
    index: int
    pid: int | None
    status: str = Field(examples=["ready"], description="starting, loading, ready, draining, or down (no process)")
    queue_size: int | None = Field(None, description="this worker's share of the service's queue bound")


class WorkersInfo(BaseModel):
    count: int = Field(description="worker processes answering on this port (CAMSERVE_WORKERS)")
    ready: int = Field(description="workers ready now")
    this_worker: int = Field(description="the slot of the worker that answered this request")
    queue_size: int = Field(description="the service's queue bound per endpoint: the workers' shares add up to it")
    slots: list[WorkerSlotInfo]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    device: str = Field(examples=["cpu"])
    runtime: str = Field(
        examples=["openvino 2026.4.1"], description="what runs /predict's forward (Grad-CAM always runs on torch)"
    )
    runtime_reason: str = Field(examples=["auto: OpenVINO on a CPU"])
    precision: str = Field(examples=["int8"], description="/predict's precision")
    precision_reason: str
    test_time_augmentation: str = Field(
        examples=["flip"], description="'flip': probabilities are the mean over each image and its mirror"
    )
    model: ModelInfo
    gradcam: GradcamInfo
    batching: BatchingInfo
    workers: WorkersInfo


class MisclassifiedItem(BaseModel):
    file: str
    test_index: int
    true_label: str
    predicted_label: str
    confidence: float
    image_png: str = Field(description="base64 PNG of the 32x32 test image")


class MisclassifiedResponse(BaseModel):
    model_version: str
    total: int
    items: list[MisclassifiedItem]


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["photo.txt: not an image (unrecognised data)"])


class FieldError(BaseModel):
    loc: list[str | int] = Field(examples=[["query", "top_k"]])
    msg: str = Field(examples=["Input should be less than or equal to 10"])
    type: str = Field(examples=["less_than_equal"])


class ValidationErrorResponse(BaseModel):
    """422: the service's own checks send a message; FastAPI's parameter validation sends a list."""

    detail: str | list[FieldError]


# The error answers of the JSON API's routes, for ``responses=``.
ERRORS = error_responses(ErrorResponse, 400, 401, 408, 413, 415, 422, 503, 504, c422=ValidationErrorResponse)
