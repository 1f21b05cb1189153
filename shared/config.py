"""Typed configuration: the seed's JSON format (`server`, `model`, `disk_cache`) plus our `workers` section.

Several models behind one router: `models`, a list of model sections each with its own `workers` section,
instead of `model` (and the top-level `workers`). `Config.pools()` turns either form into one `Config` per
model (a *pool*: its model, its workers, its own sockets), which is what the router's per-model state, the
dispatcher and the workers take, so they never see the difference.

Every section forbids unknown fields so that a misspelt key is an error naming the field and the file, not a
setting that silently does nothing. Environment variables (`LLAMAFLEET_SERVER__PORT=9000`, nested with `__`)
override the file, so systemd units can tweak one value without a second config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_STRICT = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class ServerOptions(BaseModel):
    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer keys clients must send (any one of them): one string or a list; also `api_keys_file` and the
    # LLAMAFLEET_API_KEYS environment variable (router/api/auth.py). None of them set: no key needed.
    api_key: str | list[str] | None = None
    # A file with one key per line (blank lines and lines starting with # ignored), read at start-up.
    api_keys_file: str | None = None
    # With keys configured, /healthz and /metrics need a key too (by default they stay open for probes).
    protect_health_and_metrics: bool = False
    # Requests waiting for a sequence beyond this many answer 429.
    max_queued_requests: int = Field(default=256, ge=0)
    # A request body (or WebSocket message) over this many bytes answers 413 before it is read.
    max_request_bytes: int = Field(default=8 << 20, ge=1024)
    # Seconds to let in-flight requests finish on SIGTERM before cancelling them.
    drain_timeout_seconds: float = Field(default=30.0, ge=0)
    # Disables WS /v1/responses (clients then get 426 and fall back to HTTP).
    responses_websocket: bool = True
    cors_origins: list[str] = Field(default_factory=list)
    # Router processes sharing the port (SO_REUSEPORT), each with its own worker sockets; every worker
    # connects to all of them. More than one needs ipc:// worker endpoints (router N's carry `-rN`).
    router_processes: int = Field(default=1, ge=1, le=64)

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_from_env(cls, value: Any) -> Any:
        # LLAMAFLEET_SERVER__API_KEY=12345 reaches us JSON-decoded as an integer.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class FromPretrainedOptions(BaseModel):
    model_config = _STRICT

    repo_id: str
    filename: str
    additional_files: list[str] | None = None
    local_dir: str | None = None
    local_dir_use_symlinks: bool | Literal["auto"] = "auto"
    cache_dir: str | None = None
    revision: str | None = None


class PackagedOptions(BaseModel):
    """A model shipped inside a PyPI package (see shared/models.py for the known ones)."""

    model_config = _STRICT

    package: str
    # Where assembled or converted files go; defaults to `.models/` under the working directory.
    dest_dir: str | None = None


# A LoRA scale beyond this magnitude is a mistake, not a setting (config and per-request overrides).
LORA_SCALE_LIMIT = 100.0


class LoraOptions(BaseModel):
    model_config = _STRICT

    path: str | None = None
    from_pretrained: FromPretrainedOptions | None = None
    scale: float = Field(default=1.0, ge=0.0, le=LORA_SCALE_LIMIT, allow_inf_nan=False)
    # Named (llamafleet): not applied by default; listed in /v1/models and chosen by a request's `model`.
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")

    @model_validator(mode="after")
    def _one_source(self) -> LoraOptions:
        if (self.path is None) == (self.from_pretrained is None):
            raise ValueError("exactly one of lora.path or lora.from_pretrained is required")
        return self


class EmbeddingCacheOptions(BaseModel):
    model_config = _STRICT

    path: str
    max_bytes: int = Field(ge=0)


class MTMDOptions(BaseModel):
    model_config = _STRICT

    mmproj_path: str | None = None
    mmproj_from_pretrained: FromPretrainedOptions | None = None
    embedding_cache: EmbeddingCacheOptions | None = None
    allowed_media_domains: list[str] | None = None
    allowed_local_media_path: str | None = None
    batch_max_tokens: int = Field(default=1024, ge=1)
    image_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    audio_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    video_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    image_timeout_seconds: float = Field(default=10.0, gt=0.0)
    # Images whose header claims more pixels than this are refused before decoding (llamafleet; not in the
    # seed).
    image_max_pixels: int = Field(default=32 * 1024 * 1024, ge=1)
    # RISK: true lets media URLs reach loopback, private, link-local and cloud-metadata addresses (SSRF).
    # Only for tests and closed networks; see README "Media input safety" (llamafleet; not in the seed).
    allow_private_media_addresses: bool = False
    # At most this many image/audio parts in one request, so one request cannot start thousands of fetches
    # (llamafleet; not in the seed).
    max_media_parts: int = Field(default=16, ge=1)

    @field_validator("allowed_media_domains")
    @classmethod
    def _exact_hosts(cls, value: list[str] | None) -> list[str] | None:
        for host in value or []:
            if not host.strip() or any(c in host for c in "*/:@ ") or host.strip(".") == "":
                raise ValueError(f"allowed_media_domains entries are exact host names, not {host!r}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> MTMDOptions:
        if (self.mmproj_path is None) == (self.mmproj_from_pretrained is None):
            raise ValueError(
                "exactly one of model.mtmd.mmproj_path or model.mtmd.mmproj_from_pretrained is required"
            )
        return self


def _default_threads() -> int:
    return max(os.cpu_count() or 1, 1)


class ModelOptions(BaseModel):
    model_config = _STRICT

    # Sources: exactly one of path / from_pretrained / packaged.
    path: str | None = None
    from_pretrained: FromPretrainedOptions | None = None
    packaged: PackagedOptions | None = None
    alias: str | None = None
    chat_template: str | None = None
    loras: list[LoraOptions] = Field(default_factory=list)
    # Bound of a request's `lora_scale` override (0 to this); config scales are bounded the same way.
    lora_max_scale: float = Field(default=4.0, gt=0.0, le=LORA_SCALE_LIMIT)
    # POST /v1/load_lora_adapter accepts files under this folder only; unset, the endpoints answer 404.
    lora_runtime_dir: str | None = None
    # Engine steps one LoRA adapter set keeps the context before another set that waits gets it.
    lora_switch_steps: int = Field(default=4, ge=1, le=1024)
    mtmd: MTMDOptions | None = None
    # llama_model_params. n_gpu_layers: -1 (llama.cpp's default when unset) puts every layer on the GPU where
    # the build can; a positive count on a build without GPU offload refuses to start unless
    # allow_cpu_fallback (shared/gpu.py).
    n_gpu_layers: int | None = None
    allow_cpu_fallback: bool = False
    split_mode: int | None = None
    main_gpu: int | None = None
    tensor_split: list[float] | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    kv_overrides: dict[str, bool | int | float | str] | None = None
    # llama_context_params
    n_ctx: int | None = Field(default=None, ge=0)
    n_batch: int | None = Field(default=None, ge=1)
    n_ubatch: int | None = Field(default=None, ge=1)
    n_seq_max: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default_factory=_default_threads)
    threads_batch: int | None = Field(default_factory=_default_threads)
    rope_scaling_type: int | None = None
    pooling_type: int | None = None
    attention_type: int | None = None
    embedding: bool | None = None
    # A generation model also serves /v1/embeddings (from a second context) when this names a pooling.
    embedding_pooling: Literal["last", "mean"] | None = None
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    yarn_ext_factor: float | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    yarn_orig_ctx: int | None = None
    offload_kqv: bool | None = None
    flash_attn: bool | None = None
    op_offload: bool | None = None
    swa_full: bool | None = None
    no_perf: bool | None = None
    type_k: int | None = None
    type_v: int | None = None
    max_seq_len: int | None = None
    max_output_tokens: int | None = Field(default=None, ge=0)
    # Grammar-constrained answers end on a complete document within their token budget (worker/budget.py).
    structured_budget: bool = True
    # Close a free JSON string (no maxLength/pattern/format) whose last N bytes are one short unit repeated
    # (a model looping inside a string); 0: off.
    structured_repeat_limit: int = Field(default=0, ge=0)
    kv_unified: bool = True
    # Keep finished sequences' KV and reuse shared prompt prefixes (llamafleet; not in the seed).
    prefix_cache: bool = True
    # Recurrent / hybrid models: bytes of prompt-end state checkpoints kept in memory for reuse.
    checkpoint_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Speculative decoding.
    draft_model: Literal["prompt-lookup-decoding", "draft-mtp", "draft-model"] | None = None
    draft_model_path: str | None = None
    draft_model_from_pretrained: FromPretrainedOptions | None = None
    draft_model_num_pred_tokens: int = Field(default=16, ge=1)
    draft_model_max_ngram_size: int = Field(default=2, ge=1)
    draft_model_top_k: int = Field(default=1, ge=1)
    draft_model_p_min: float = Field(default=0.0, ge=0.0, le=1.0)
    draft_model_max_batch_size: int | None = Field(default=None, ge=1)
    draft_model_threads: int | None = Field(default=None, gt=0)
    draft_model_threads_batch: int | None = Field(default=None, gt=0)
    # Seconds the worker may spend, once, measuring decode cost by output rows on the first sequence about to
    # draft; draft lengths are chosen from that curve (llamafleet; worker/speculative/costs.py). None: 3;
    # 0: measure nothing and adapt draft lengths to acceptance alone.
    draft_model_calibration_seconds: float | None = Field(default=None, ge=0.0, le=60.0)
    # Output parsing.
    response_schema: dict[str, Any] | None = None
    store_logits: bool = True

    @field_validator("chat_template", mode="before")
    @classmethod
    def _join_template_lines(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise TypeError("model.chat_template list entries must be strings")
            return "".join(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelOptions:
        sources = [s for s in (self.path, self.from_pretrained, self.packaged) if s is not None]
        if len(sources) != 1:
            raise ValueError("exactly one of model.path, model.from_pretrained or model.packaged is required")
        if self.draft_model_path is not None and self.draft_model_from_pretrained is not None:
            raise ValueError(
                "model.draft_model_path and model.draft_model_from_pretrained are mutually exclusive"
            )
        k = self.draft_model_num_pred_tokens
        if self.draft_model is not None and self.n_batch is not None and self.n_batch < k + 1:
            raise ValueError(
                f"model.n_batch {self.n_batch} leaves no room to verify model.draft_model_num_pred_tokens "
                f"{k} drafts (needs n_batch >= {k + 1})"
            )
        self._check_loras()
        return self

    def _check_loras(self) -> None:
        """Named adapters are model ids: unique, never the base alias; scales within `lora_max_scale`."""
        names: set[str] = set()
        for index, lora in enumerate(self.loras):
            if lora.scale > self.lora_max_scale:
                raise ValueError(
                    f"model.loras[{index}].scale {lora.scale} exceeds "
                    f"model.lora_max_scale {self.lora_max_scale}"
                )
            if lora.name is None:
                continue
            if lora.name == self.served_name:
                raise ValueError(f"model.loras[{index}].name {lora.name!r} is the base model's name")
            if lora.name in names:
                raise ValueError(f"model.loras[{index}].name {lora.name!r} is used twice")
            names.add(lora.name)

    @property
    def served_name(self) -> str:
        """The id clients send as `model` and `/v1/models` lists."""
        if self.alias:
            return self.alias
        if self.path:
            return Path(self.path).stem
        if self.from_pretrained:
            return f"{self.from_pretrained.repo_id}/{self.from_pretrained.filename}"
        assert self.packaged is not None
        return self.packaged.package


class DiskCacheOptions(BaseModel):
    model_config = _STRICT

    path: str
    max_bytes: int = Field(ge=0)
    min_tokens: int = Field(default=128, ge=1)


class WorkerOverride(BaseModel):
    """Per-worker settings, e.g. one GPU each: `{"env": {"CUDA_VISIBLE_DEVICES": "1"}, "main_gpu": 0}`."""

    model_config = _STRICT

    env: dict[str, str] = Field(default_factory=dict)
    main_gpu: int | None = None
    n_gpu_layers: int | None = None
    threads: int | None = None
    threads_batch: int | None = None


class SimulateOptions(BaseModel):
    """`workers.simulate`: workers that speak the protocol with no model (worker/simulator.py), to test and
    benchmark routing, admission and the router's own cost at scale on a machine without a GPU."""

    model_config = _STRICT

    # Time to the first token after a request gets a slot, and between tokens (one engine step).
    ttft_ms: float = Field(default=50.0, ge=0)
    itl_ms: float = Field(default=10.0, gt=0)
    # Sequences a simulated worker runs at once (its n_seq_max); requests beyond wait in its queue.
    slots: int = Field(default=16, ge=1)
    # Tokens answered when the request set no max_tokens (the router then asks for the whole context).
    max_tokens: int = Field(default=128, ge=1)
    # Fraction of requests that fail (an `error` message, HTTP 500) when their first token is due; seeded.
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = 0
    # Benchmark aid: each worker appends "send_ns rid tokens" per frame item to `trace_path`.N
    # (bench/router_capacity.py measures the latency the router adds with it).
    trace_path: str | None = None


def is_network_endpoint(endpoint: str) -> bool:
    """tcp:// and any other ZeroMQ transport that leaves the host's user accounts (not ipc:// or inproc://)."""
    return not endpoint.startswith(("ipc://", "inproc://"))


class WorkersOptions(BaseModel):
    model_config = _STRICT

    count: int = Field(default=1, ge=1)
    # The router binds these; workers connect. ipc:// paths default to a per-port runtime folder.
    requests_endpoint: str | None = None
    results_endpoint: str | None = None
    # ZeroMQ CURVE (shared/curve.py): the folder `llamafleet keys DIR` wrote. Set, the router accepts only
    # the workers' keys found there and workers talk only to the router's key.
    keys_dir: str | None = None
    # tcp:// endpoints without keys_dir refuse to start unless this is set (then a warning is logged).
    insecure_tcp: bool = False
    # Environment for every worker process, then per-worker overrides by index.
    env: dict[str, str] = Field(default_factory=dict)
    overrides: list[WorkerOverride] = Field(default_factory=list)
    heartbeat_interval_seconds: float = Field(default=0.25, gt=0)
    heartbeat_timeout_seconds: float = Field(default=1.5, gt=0)
    ready_timeout_seconds: float = Field(default=600.0, gt=0)
    restart_backoff_seconds: float = Field(default=0.5, ge=0)
    # "prefix": send a request to the worker that saw its longest prompt prefix (prefix-cache hits) unless
    # that worker is full; "least_loaded": ignore prefixes.
    routing: Literal["prefix", "least_loaded"] = "prefix"
    # Simulated workers (no model loaded; the router still tokenizes with the model's vocabulary).
    simulate: SimulateOptions | None = None

    @model_validator(mode="after")
    def _tcp_needs_keys(self) -> WorkersOptions:
        for name in ("requests_endpoint", "results_endpoint"):
            endpoint = getattr(self, name)
            if endpoint and is_network_endpoint(endpoint) and not self.keys_dir and not self.insecure_tcp:
                raise ValueError(
                    f"workers.{name} is {endpoint}: anyone who reaches it could act as a worker or the "
                    "router. Set workers.keys_dir (create the keys with `llamafleet keys DIR`) to "
                    "authenticate and encrypt with ZeroMQ CURVE, or workers.insecure_tcp: true to accept this"
                )
        return self

    def override_for(self, index: int) -> WorkerOverride:
        return self.overrides[index] if index < len(self.overrides) else WorkerOverride()


class ModelEntry(ModelOptions):
    """One entry of `models`: a model section with its own `workers` section (its own pool)."""

    workers: WorkersOptions = Field(default_factory=WorkersOptions)

    def model_section(self) -> ModelOptions:
        return ModelOptions.model_validate(self.model_dump(exclude={"workers"}, exclude_unset=True))


class Config(BaseSettings):
    """The whole config file; environment variables `LLAMAFLEET_<SECTION>__<FIELD>` override it."""

    model_config = SettingsConfigDict(
        env_prefix="LLAMAFLEET_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    server: ServerOptions = Field(default_factory=ServerOptions)
    # With `models`, `model` is filled with the first entry (the default for requests naming no model).
    model: ModelOptions
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    disk_cache: DiskCacheOptions | None = None
    workers: WorkersOptions = Field(default_factory=WorkersOptions)
    # Pools after the first of a `models` config name their default sockets `m<K>-requests.sock` etc.
    _socket_prefix: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _model_or_models(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("models") is None:
            return data
        for field in ("model", "workers"):
            if field in data:
                raise ValueError(
                    f"`{field}` and `models` cannot both be set: with `models`, each entry is a model "
                    "section with its own `workers` section (environment overrides of model.* and "
                    "workers.* do not apply to it)"
                )
        models = data["models"]
        if isinstance(models, list) and models and isinstance(models[0], dict):
            first = {k: v for k, v in models[0].items() if k in ModelOptions.model_fields}
            data = {**data, "model": first}  # its errors are reported under models.0
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [entry.served_name for entry in self.models or []]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two entries of `models` are served as {name!r}: give each an `alias`")
        return self

    def pools(self) -> list[Config]:
        """One config per model: this one, or one per `models` entry (sharing `server` and `disk_cache`)."""
        if self.models is None:
            return [self]
        pools = []
        for index, entry in enumerate(self.models):
            pool = Config.model_construct(
                server=self.server,
                model=entry.model_section(),
                models=None,
                disk_cache=self.disk_cache,
                workers=entry.workers,
            )
            pool._socket_prefix = f"m{index}-" if index else ""
            pools.append(pool)
        return pools

    def worker_slots(self) -> list[tuple[Config, int]]:
        """Every worker of every pool as (pool, index in the pool), in one numbering: what `serve` and the
        router's supervisor link call worker N (pool after pool)."""
        return [(pool, index) for pool in self.pools() for index in range(pool.workers.count)]

    def pool(self, name: str | None) -> Config:
        """The pool serving `name` (None: the only one); a ConfigError naming the choices otherwise."""
        pools = self.pools()
        if name is None and len(pools) == 1:
            return pools[0]
        for pool in pools:
            if pool.model.served_name == name:
                return pool
        names = ", ".join(repr(pool.model.served_name) for pool in pools)
        what = f"no model {name!r}" if name is not None else "several models"
        raise ConfigError(f"{what} in the config: pass --model with one of {names}")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it overrides what the file says.
        return (env_settings, init_settings)

    def ipc_dir(self) -> Path:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        return Path(base) / f"llamafleet-{self.server.port}"

    def insecure_network_endpoints(self) -> list[str]:
        """Network endpoints in use without CURVE (`workers.insecure_tcp`): to warn about at start-up."""
        if self.workers.keys_dir:
            return []
        endpoints = (self.requests_endpoint(), self.results_endpoint())
        return [endpoint for endpoint in endpoints if is_network_endpoint(endpoint)]

    def requests_endpoint(self, router: int = 0) -> str:
        return _for_router(
            self.workers.requests_endpoint
            or f"ipc://{self.ipc_dir() / (self._socket_prefix + 'requests.sock')}",
            router,
        )

    def results_endpoint(self, router: int = 0) -> str:
        return _for_router(
            self.workers.results_endpoint
            or f"ipc://{self.ipc_dir() / (self._socket_prefix + 'results.sock')}",
            router,
        )

    def router_endpoints(self) -> list[tuple[str, str]]:
        """(requests, results) endpoints of every router process for this pool, in router order: the
        pool's workers connect to all."""
        return [
            (self.requests_endpoint(r), self.results_endpoint(r)) for r in range(self.server.router_processes)
        ]

    @model_validator(mode="after")
    def _routers_need_ipc(self) -> Config:
        if self.server.router_processes > 1:
            for pool in self.pools():
                for name in ("requests_endpoint", "results_endpoint"):
                    endpoint = getattr(pool.workers, name)
                    if endpoint and not endpoint.startswith("ipc://"):
                        raise ValueError(
                            "server.router_processes > 1 needs ipc:// worker endpoints "
                            f"(workers.{name} is {endpoint})"
                        )
        return self


def _for_router(endpoint: str, router: int) -> str:
    """Router 0 binds the configured endpoint; router N an ipc path with `-rN` appended."""
    return endpoint if router == 0 else f"{endpoint}-r{router}"


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validates an already-loaded mapping; errors name `source` and each bad field."""
    try:
        return Config(**data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path) -> Config:
    """Reads a JSON config file; relative paths stay relative to the working directory, as the seed's."""
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"config {file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {file} must be a JSON object")
    return parse_config(data, str(file))
