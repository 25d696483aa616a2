"""The one place that reads the environment: every setting of detr-serve, typed and validated.

Each field is also a `detr-serve` flag (see app/cli.py) and an environment variable
`DETR_SERVE_<FIELD>`; flags win over the environment, the environment over the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.buckets import DEFAULT_BUCKETS, parse_buckets
from app.models.repository import model_name as name_of_model
from app.models.repository import model_problem
from app.tile_geometry import MAX_OVERLAP, MAX_TILE_SIZE, MIN_TILE_SIZE

REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "rtdetr-shapes"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_CUDA_INDEX_RE = re.compile(r"^(cuda:)?(\d+)$")


def model_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be served as a model (of any registered kind), or None."""
    return model_problem(path)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DETR_SERVE_", extra="forbid", validate_default=True, protected_namespaces=()
    )

    # Before `model`: its validator reads it (a missing folder is then a load failure).
    exit_on_load_failure: bool = Field(
        default=True,
        description="When the model cannot be loaded (missing folder, corrupt weights, unknown "
        "architecture), exit with status 1 and a log line naming the model and the cause (as "
        "Triton does). false: stay up, /readyz answers 503 {status: failed, reason} and every "
        "inference route 503 with the reason.",
    )
    model: Path = Field(
        default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME,
        description="Hugging Face-format checkpoint directory (config.json, weights, "
        "preprocessor_config.json), or an Ultralytics RT-DETR checkpoint file (.pt; needs the "
        "ultralytics extra). Defaults to the embedded model.",
    )
    model_name: str | None = Field(
        default=None,
        description="Name the model is served under (default: the folder name; a checkpoint "
        "file's name without its suffix).",
    )
    models: str = Field(
        default="",
        description="Several models at once: comma-separated model folders (or checkpoint "
        "files), each served under its folder's name; `--model` given more than once fills it.",
    )
    model_repository: Path | None = Field(
        default=None,
        description="Serve every model folder (or checkpoint file) under this directory, each "
        "with its own engine and optional serve.json overrides (see README, model repository).",
    )
    default_model: str | None = Field(
        default=None,
        description="With several models: the one that answers requests naming none (default: "
        "the only one, else the first by name).",
    )
    model_control: Literal["none", "explicit"] = Field(
        default="none",
        description="With several models (or a repository): explicit lets clients load and "
        "unload models at run time (POST /v2/repository/models/{name}/load|unload, as "
        "Triton's --model-control-mode=explicit); none refuses those calls with 403.",
    )
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to bind (0: any).")
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="TCP port of the KServe v2 gRPC endpoint (Triton's default); 0: no gRPC.",
    )
    backend: Literal["auto", "torch", "onnx", "null"] = Field(
        default="auto",
        description="auto: onnxruntime on the CPU (exported once into onnx_cache_dir; torch if "
        "the export fails), torch with CUDA graphs on CUDA; torch: eager transformers model; "
        "onnx: onnxruntime; null: no model, one fixed detection per image (measures the "
        "serving path alone). The choice and its reason are logged and shown in /v1/models.",
    )
    precision: Literal["float", "int8"] = Field(
        default="float",
        description="float: the dtype setting decides; int8: the statically quantized ONNX "
        "model written by scripts/export_onnx.py --int8 (onnx or auto backend, CPU).",
    )
    onnx_spinning: bool = Field(
        default=False,
        description="Let onnxruntime's intra-op threads spin between ops instead of sleeping: "
        "less latency on idle cores, CPU taken from decoding and HTTP on busy ones. Batches "
        "of tiles spin either way (on the CPU, a second session made at the first of them).",
    )
    onnx_cache_dir: Path | None = Field(
        default=None,
        description="Folder where ONNX exports are kept, one per model version, and reused "
        "(default: the user's cache folder, $XDG_CACHE_HOME/detr-serve/onnx).",
    )
    null_batch_ms: float = Field(
        default=0.0,
        ge=0,
        le=600_000,
        description="With --backend null: how long each batch takes, as a stand-in for a "
        "forward pass (tests and scripts/checks/chaos.py use it for a slow engine).",
    )
    msda_kernel: bool = Field(
        default=True,
        description="Replace the models' multi-scale deformable attention with detr-serve's op.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    devices: str = Field(
        default="",
        description="Comma-separated CUDA devices to serve on, one engine each (e.g. 0,1); "
        "batches go to the least busy. Empty: --device alone.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Inference precision. auto: float32 on the CPU; on CUDA the first of float16 "
        "and bfloat16 whose detections match float32's on the example images (else float32).",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="Capture a CUDA graph per batch bucket at start-up and replay it (torch "
        "backend on CUDA; ignored with a log line elsewhere; eager if a capture fails).",
    )
    batch_buckets: str = Field(
        default=DEFAULT_BUCKETS,
        description="Batch sizes warmed up and captured as CUDA graphs, clipped to "
        "max_batch_size (always a bucket). With CUDA graphs a batch is padded to the next bucket.",
    )
    torch_compile: bool = Field(
        default=False,
        description="Compile the model with torch.compile (inductor) before capturing the CUDA "
        "graphs: fused kernels, for a compilation per bucket at start-up.",
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        description="Directory where torch.compile and Triton keep compiled kernels "
        "(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) so that restarts reuse them.",
    )
    image_decoder: Literal["auto", "pillow", "nvjpeg"] = Field(
        default="auto",
        description="JPEG decoding. auto: batched on the GPU with nvjpeg when torchvision and "
        "CUDA are there and one device is served, else Pillow. Other formats and EXIF-rotated "
        "JPEGs always use Pillow.",
    )
    batches_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="Batches each device holds at once; 2 decodes and pre-processes the next "
        "batch while the current one runs (default: 2 on CUDA; on the CPU 2 with onnxruntime, "
        "the second only when it is full, and 1 with torch).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op CPU threads of the model, torch's and onnxruntime's (default: the "
        "CPUs this process may use, container limits included).",
    )
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        description="Images decoded at once on the CPU, each in a worker process of its own "
        "(default: the cores).",
    )
    decode_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest decode of one image; past it its worker process is ended and the "
        "answer is 504.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="HTTP front-end processes (uvicorn workers) beside the engine process "
        "(default: from the CPUs this process may use, container limits included).",
    )
    engine_process: bool = Field(
        default=True,
        description="Run the model in an engine process of its own (one per device), fed by "
        "the front-end workers; false: one process does everything (debugging).",
    )
    shm_arena_mb: int = Field(
        default=64,
        ge=4,
        le=65536,
        description="Shared memory each front-end worker holds for decoded pixels on their "
        "way to the engine (/dev/shm; an image that does not fit travels over the socket).",
    )
    max_batch_size: int = Field(default=8, ge=1, le=1024, description="Images per forward pass.")
    max_batch_delay_ms: float = Field(
        default=5.0, ge=0, le=10_000, description="How long a batch waits to fill up."
    )
    max_queue_size: int = Field(
        default=256, ge=1, description="Images waiting for the model before 429 is answered."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of a request; past it the answer is 504."
    )
    max_images_per_request: int = Field(default=16, ge=1, description="Images in one request.")
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body, and largest image."
    )
    max_inflated_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest inflated size of a gzip/deflate request body (v2); never more "
        "than max_upload_bytes. Inflation stops there: 413.",
    )
    max_inflation_ratio: float = Field(
        default=20.0,
        ge=1.0,
        le=1000.0,
        description="A compressed request body may inflate to this many times its size "
        "(beyond its first MiB); more is a compression bomb: 413.",
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest width*height accepted, read from the header."
    )
    max_request_pixels: int = Field(
        default=200_000_000,
        ge=1,
        description="Pixels the images of one request may decode to, summed (JPEGs count at "
        "the scale they are decoded at); 413 beyond it.",
    )
    max_inflight_pixels: int = Field(
        default=400_000_000,
        ge=1,
        description="Decoded pixels the server holds at once (being decoded, queued, in a "
        "batch); a request that does not fit waits up to a second, then gets 429.",
    )
    max_tiled_image_pixels: int = Field(
        default=120_000_000,
        ge=1,
        description="Largest width*height accepted for an image that runs tiled (such an "
        "image is decoded whole and cut into tiles); taken as at least max_image_pixels and "
        "at most max_request_pixels.",
    )
    tiling_tile_size: int | None = Field(
        default=None,
        ge=MIN_TILE_SIZE,
        le=MAX_TILE_SIZE,
        description="Default tile side in pixels (default: the model's input side).",
    )
    tiling_overlap: float = Field(
        default=0.2, ge=0.0, le=MAX_OVERLAP, description="Default share of overlapping tiles."
    )
    tiling_full_image: bool = Field(
        default=False,
        description="Tiled images also run whole (resized) by default; off because a "
        "high-resolution frame squashed to the model's input mostly adds false boxes "
        "(measured: README, tiled inference).",
    )
    tiling_merge: Literal["nms", "greedy_nmm"] = Field(
        default="greedy_nmm", description="Default merge of the tiles' boxes."
    )
    tiling_match_metric: Literal["iou", "ios"] = Field(
        default="ios", description="Default overlap measure of the merge (ios: over the smaller)."
    )
    tiling_match_threshold: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Default match threshold of the merge."
    )
    tiling_class_agnostic: bool = Field(
        default=False, description="Merge boxes of different classes by default."
    )
    tiling_auto_factor: float = Field(
        default=2.0,
        ge=1.0,
        description='"tiling": "auto" tiles an image whose longer side is over this many '
        "times the model's input side.",
    )
    tiling_max_tiles: int = Field(
        default=256,
        ge=1,
        description="Tiles (full-image passes included) one request may make, all images "
        "together; 413 beyond. Taken as at most max_queue_size.",
    )
    jobs: bool = Field(
        default=True,
        description="Serve /v1/jobs (gigapixel images as background jobs) and run them in a "
        "job-runner process.",
    )
    jobs_dir: Path | None = Field(
        default=None,
        description="Folder of the job store: the SQLite database (WAL) and the uploaded "
        "images (default: the user's cache folder, $XDG_CACHE_HOME/detr-serve/jobs). One "
        "server runs the jobs of a folder at a time (a lock file); give each server its own.",
    )
    max_job_bytes: int = Field(
        default=4 << 30,
        ge=1,
        description="Largest image file a job accepts (upload or URL download), in bytes; 413 "
        "beyond.",
    )
    max_job_image_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="Largest width*height of a job image that is decoded whole (JPEG, PNG, "
        "WebP, untiled TIFF); tiled TIFFs are read tile by tile and have no pixel limit.",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=1, description="Jobs running at once (the others wait queued)."
    )
    max_queued_jobs: int = Field(
        default=16, ge=0, description="Jobs waiting to run; POST /v1/jobs answers 429 beyond."
    )
    job_batch_items: int | None = Field(
        default=None,
        ge=1,
        description="Job tiles one batch may carry (default: 1 on the CPU, max_batch_size / 4 "
        "on CUDA): what an online request arriving meanwhile may wait for.",
    )
    job_batch_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of every batch kept for job tiles while online requests also wait "
        "(0: jobs only fill the places online traffic leaves free).",
    )
    job_yield: float = Field(
        default=1.0,
        ge=0.0,
        description="While online requests keep coming (one in the last second), a batch of "
        "job tiles alone is followed by an idle gap this many times its duration, cut short "
        "by online work: the CPU left to the front ends' decoding (0: no gap).",
    )
    job_max_detections: int = Field(
        default=100_000, ge=1, description="Detections a job keeps when it asks for no limit."
    )
    job_inline_detections: int = Field(
        default=1_000,
        ge=0,
        description="GET /v1/jobs/{id} carries the detections up to this many; beyond, only "
        "the results link (JSON lines).",
    )
    job_retention_s: float = Field(
        default=7 * 86_400.0,
        gt=0,
        description="Finished jobs (and their results and uploads) are deleted this long after "
        "they end.",
    )
    job_store_max_bytes: int = Field(
        default=20 << 30,
        ge=1,
        description="Size limit of the job store (database and uploads): the oldest finished "
        "jobs are deleted first; POST /v1/jobs answers 507 while it is still over.",
    )
    default_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Score threshold when a request gives none."
    )
    default_max_detections: int = Field(
        default=100, ge=1, description="Detections per image when a request gives no limit."
    )
    allow_private_urls: bool = Field(
        default=False,
        description="Let image URLs reach private, loopback and link-local addresses.",
    )
    allowed_url_hosts: str = Field(
        default="",
        description="Comma-separated host names whose URLs are fetched even when they resolve "
        "to private addresses.",
    )
    url_timeout_s: float = Field(
        default=10.0, gt=0, description="Total deadline of one image download."
    )
    max_concurrent_downloads: int = Field(
        default=32, ge=1, description="Image URLs downloaded at once; more wait their turn."
    )
    max_redirects: int = Field(
        default=3, ge=0, le=10, description="Redirects an image URL may take."
    )
    max_download_buffer_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="Bytes that image downloads in progress may hold, all requests together; "
        "a download that would pass it is answered 429 with Retry-After.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, every endpoint but health, metrics and docs needs "
        "'Authorization: Bearer <key>'.",
    )
    protect_metrics: bool = Field(
        default=False,
        description="With api_key set, /metrics needs the key too (Prometheus: "
        "authorization.credentials in the scrape config).",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest request line plus headers of one request; more: 431 and the "
        "connection is closed.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Time a connection has to send a request's headers (from the connection "
        "or the previous response); past it: 408 and the connection is closed.",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="An idle keep-alive connection is closed after this."
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="Open connections (and requests in flight) at once; past it requests are "
        "answered 503 (uvicorn's limit_concurrency).",
    )
    backlog: int = Field(
        default=2048, ge=1, le=65535, description="Connections the kernel queues before accept."
    )
    cors_origins: str = Field(
        default="", description="Comma-separated origins allowed by CORS (empty: CORS off; *: any)."
    )
    watchdog_s: float = Field(
        default=60.0, gt=0, description="A forward pass running longer turns /readyz to 503."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    json_logs: bool = Field(default=False, description="Log one JSON object per line.")
    drain_timeout_s: float = Field(
        default=20.0, ge=0, description="On shutdown, how long in-flight work may take to finish."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("use one of auto, cpu, cuda or cuda:N (e.g. cuda:0)")
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        parts = [p.strip().lower() for p in value.split(",") if p.strip()]
        indices = []
        for part in parts:
            match = _CUDA_INDEX_RE.match(part)
            if match is None:
                raise ValueError(f"{part!r} is not a CUDA device: write indices, e.g. 0,1")
            indices.append(int(match.group(2)))
        if len(set(indices)) != len(indices):
            raise ValueError("a device is listed twice")
        return ",".join(f"cuda:{i}" for i in indices)

    @field_validator("batch_buckets")
    @classmethod
    def _check_buckets(cls, value: str) -> str:
        return ",".join(str(s) for s in parse_buckets(value))

    @field_validator("model")
    @classmethod
    def _check_model_dir(cls, value: Path, info: ValidationInfo) -> Path:
        value = value.expanduser()
        problem = model_dir_problem(value)
        # With --no-exit-on-load-failure the server stays up and says why it cannot serve.
        if problem is not None and info.data.get("exit_on_load_failure", True):
            raise ValueError(problem)
        return value.resolve()

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        """Settings that contradict each other: every pair found, each message naming both."""
        problems = contradictions(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def device_list(self) -> list[str]:
        """The devices to serve on, one engine each."""
        return self.devices.split(",") if self.devices else [self.device]

    @property
    def tiled_image_pixels(self) -> int:
        """The pixel limit of a tiled image: never below the plain one, never over what one
        request may hold."""
        return min(max(self.max_tiled_image_pixels, self.max_image_pixels), self.max_request_pixels)

    @property
    def max_tiles(self) -> int:
        """Tiles one request may make: never more than the queue holds (that would be 429
        forever)."""
        return min(self.tiling_max_tiles, self.max_queue_size)

    @property
    def jobs_path(self) -> Path:
        """The job store's folder."""
        if self.jobs_dir is not None:
            return self.jobs_dir.expanduser()
        import platformdirs

        return Path(platformdirs.user_cache_dir("detr-serve", appauthor=False)) / "jobs"

    def job_tiles_per_batch(self, on_cuda: bool) -> int:
        """Job tiles one batch may carry: job_batch_items, else 1 on the CPU (a batch's time
        grows with its size there, and is what an online request arriving meanwhile waits
        for; batching buys the CPU no throughput) and max_batch_size / 4 on CUDA."""
        chosen = self.job_batch_items or (max(1, self.max_batch_size // 4) if on_cuda else 1)
        return min(chosen, self.max_batch_size)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def allowed_url_host_set(self) -> frozenset[str]:
        return frozenset(
            h.strip().rstrip(".").lower() for h in self.allowed_url_hosts.split(",") if h.strip()
        )

    @property
    def served_model_name(self) -> str:
        return self.model_name or name_of_model(self.model)

    @property
    def model_list(self) -> list[Path]:
        """The models named by --model (repeated) / models, in order."""
        return [Path(p.strip()).expanduser() for p in self.models.split(",") if p.strip()]

    @property
    def several_models(self) -> bool:
        """A model repository or more than one model: the multi-model shape (app/models/)."""
        return self.model_repository is not None or len(self.model_list) > 1


# (setting, limit, what would happen): the setting may not be over the limit.
_AT_MOST = [
    (
        "max_images_per_request",
        "max_queue_size",
        "a request of that many images would be refused with 429 every time",
    ),
    ("max_batch_size", "max_queue_size", "a batch is taken from the queue and could never fill"),
    ("max_request_pixels", "max_inflight_pixels", "such a request could never be admitted"),
    (
        "max_upload_bytes",
        "max_download_buffer_bytes",
        "a download of an image of the allowed size could never fit the buffer (429 every time)",
    ),
]


def contradictions(s: Settings) -> list[str]:
    """Pairs of settings that cannot both hold: one of them could never take effect, or some
    request could never be served. Each message names both settings and how to fix them.

    Not contradictions, and so not refused: max_image_pixels over max_request_pixels (a large
    JPEG counts at the 1/2-1/8 scale it is decoded at, so it can pass both), url_timeout_s or
    decode_timeout_s over request_timeout_s (the request's deadline cuts them short),
    max_inflated_bytes over max_upload_bytes (documented as capped by it), request_timeout_s
    over drain_timeout_s (a drain may end requests before their deadline, its purpose)."""
    found = []
    if s.device == "cpu" and s.dtype == "float16":
        found.append(
            "dtype float16 is not supported on the CPU: use float32 or bfloat16 with device cpu"
        )
    if s.devices and not s.device.startswith(("auto", "cuda")):
        found.append(
            f"--devices lists CUDA devices but --device is {s.device}: "
            "leave --device at auto (or cuda) with --devices"
        )
    for larger, limit, consequence in _AT_MOST:
        value, bound = getattr(s, larger), getattr(s, limit)
        if value > bound:
            found.append(
                f"{larger} ({value}) is over {limit} ({bound}): {consequence}; raise {limit} "
                f"or lower {larger}"
            )
    if s.max_batch_delay_ms / 1e3 >= s.request_timeout_s:
        found.append(
            f"max_batch_delay_ms ({s.max_batch_delay_ms} ms) is not under request_timeout_s "
            f"({s.request_timeout_s} s): a request alone would reach its deadline while its "
            "batch waits to fill; lower max_batch_delay_ms or raise request_timeout_s"
        )
    if s.precision == "int8" and s.backend not in ("auto", "onnx"):
        found.append(
            f"precision int8 is an ONNX model; backend {s.backend} cannot serve it: "
            "use backend auto or onnx"
        )
    if s.precision == "int8" and s.dtype not in ("auto", "float32"):
        found.append(f"precision int8 takes float32 inputs: leave dtype at auto, not {s.dtype}")
    if s.grpc_port and s.grpc_port == s.port:
        found.append(
            f"grpc_port and port are both {s.port}: give gRPC another port (8001 by default) "
            "or turn it off with grpc_port 0"
        )
    if s.several_models and not s.engine_process:
        found.append(
            "several models (model_repository, or models listing more than one) need engine "
            "processes, one per model: drop --no-engine-process (engine_process false)"
        )
    if s.model_repository is not None and not s.model_repository.is_dir():
        found.append(
            f"model_repository {s.model_repository} is not a directory: point it at a folder "
            "holding one folder (or checkpoint file) per model"
        )
    if s.protect_metrics and s.api_key is None:
        found.append(
            "protect_metrics is set but api_key is not: there is no key to protect /metrics "
            "with; set api_key or drop protect_metrics"
        )
    if s.image_decoder == "nvjpeg" and s.device == "cpu":
        found.append(
            "image_decoder nvjpeg decodes on a CUDA device, but device is cpu; use "
            "image_decoder auto or pillow, or a CUDA device"
        )
    if s.image_decoder == "nvjpeg" and len(s.device_list) > 1:
        found.append(
            f"image_decoder nvjpeg serves one device, but devices lists {len(s.device_list)} "
            "(torchvision's one global decoder is rebuilt on every device change); use "
            "image_decoder auto or pillow with several devices"
        )
    return found
