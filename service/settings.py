"""Service settings, read from ``CAMSERVE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The shipped bundle, next to the packages in a checkout and baked into the container image.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet"

# Also decode_image's default, for callers without settings (the benchmarks).
DEFAULT_MAX_IMAGE_FRAMES = 1000

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Runtime = Literal["auto", "torch", "openvino"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAMSERVE_", extra="ignore")

    model_dir: Path = DEFAULT_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC, in every worker (as Triton); 0: off"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = Field(
        "auto",
        description="/predict's precision; auto: the fastest the bundle's own measurements allow "
        "(service/inference/choice.py); int8 needs the bundle's quantized model and the openvino runtime",
    )
    runtime: Runtime = Field(
        "auto",
        description="what runs /predict's forward: auto = openvino on a CPU where it is installed, else torch; "
        "Grad-CAM and ROAD always run on torch",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads; default: cores / model_lanes on a CPU with 2+ lanes, else torch's"
    )
    model_lanes: int | None = Field(
        None, ge=1, le=16, description="batches run at once, one model thread each; default: 2 on a CPU, 1 on a GPU"
    )
    trace: bool = Field(True, description="run /predict's forward as one TorchScript call (CPU), GIL released")
    tta: Literal["none", "flip"] = Field(
        "flip",
        description="test-time augmentation: 'flip' averages each image's probabilities with its mirror's "
        "(the bundle's test_accuracy_flip_tta, for twice the model work); 'none' is the plain network",
    )

    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="processes answering HTTP on one port, each a full replica (model, batchers); "
        "auto: 1 where at most 2 CPUs are available, else CPUs // 2 up to 8 (service/supervisor.py)",
    )
    engine: Literal["torch", "null"] = Field(
        "torch", description="null: answers of the right shape without running the network, to measure the front"
    )
    null_batch_ms: float = Field(0.0, ge=0, le=10_000, description="null engine: sleep per batch (GIL released)")

    max_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a batch waits to fill, when arrivals are due")
    queue_size: int = Field(512, ge=1, description="images waiting per endpoint before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503")

    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="whole request body")
    body_timeout_s: float = Field(15.0, gt=0, description="a body not fully received by then gets 408")
    max_files: int = Field(64, ge=1, description="images per request")
    max_image_pixels: int = Field(25_000_000, ge=1024, description="per image, checked before decoding")
    max_image_frames: int = Field(
        DEFAULT_MAX_IMAGE_FRAMES, ge=1, description="frames per animated image, checked before decoding"
    )
    max_image_decode_mb: float = Field(
        48,
        gt=0,
        description="per image: width x height x bands x bytes per sample to be decoded (after a "
        "JPEG's reduced-scale draft), MiB, checked before decoding",
    )
    max_request_decode_mb: float = Field(256, gt=0, description="the same, summed over a request's images, MiB")
    decode_budget_mb: float = Field(
        1024, gt=0, description="peak memory of all decodes running at once in this process, MiB"
    )
    decode_wait_s: float = Field(2.0, ge=0, description="longest wait for room in the decode budget, then 503")
    decode_threads: int = Field(4, ge=1, le=64, description="decode threads per process")

    max_header_bytes: int = Field(16384, ge=1024, description="request line and headers; 431 beyond")
    max_headers: int = Field(100, ge=8, description="request headers; 431 beyond")
    header_timeout_s: float = Field(10.0, gt=0, description="from a request's first byte to the end of its headers")
    idle_timeout_s: float = Field(15.0, gt=0, description="a connection without a request in progress is closed")
    max_connections: int = Field(1000, ge=1, description="open connections (or requests) before 503s")

    api_key: SecretStr | None = Field(None, description="when set, the API needs it (X-API-Key or Bearer)")
    model_control: bool = Field(
        False,
        description="allow the repository's load requests, REST and gRPC (hot reload; behind the API key when one "
        "is set); off, as Triton's --model-control-mode=none, REST answers 403, gRPC FAILED_PRECONDITION, and "
        "SIGHUP is the way to reload",
    )
    cors_origins: list[str] = []
    log_level: str = "info"
    log_requests: bool = True

    @model_validator(mode="after")
    def _runtime_fits_precision(self) -> Settings:
        """Combinations no engine serves, refused at start-up rather than at the first request."""
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("CAMSERVE_PRECISION=int8 runs on the openvino runtime, not CAMSERVE_RUNTIME=torch")
        if self.precision == "fp16" and self.runtime == "openvino":
            raise ValueError("CAMSERVE_RUNTIME=openvino serves fp32, bf16 or int8 on a CPU, not fp16")
        if self.device == "cuda" and self.runtime == "openvino":
            raise ValueError("CAMSERVE_RUNTIME=openvino runs on the CPU; CAMSERVE_DEVICE=cuda keeps torch")
        return self

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        """An empty key would lock everyone out (or, compared carelessly, let everyone in), and a key with
        spaces around it can never match a header value (HTTP strips them): refuse both at start-up."""
        if key is None:
            return None
        value = key.get_secret_value()
        if not value.strip():
            raise ValueError("CAMSERVE_API_KEY is set but empty; unset it to serve without a key, or give a key")
        if value != value.strip():
            raise ValueError("CAMSERVE_API_KEY starts or ends with whitespace, which no HTTP header can carry")
        return key
