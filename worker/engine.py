"""Ownership of one llama.cpp model and context: load with every runtime field the config names, decode, free.

Nothing else in the worker calls llama_model_* / llama_init_from_model; the runner (worker/runner.py) asks
this class for decodes, logits and memory (KV) operations by sequence id.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from shared import gpu
from shared.config import ModelOptions, WorkerOverride
from shared.protocol import ModelInfo
from shared.vocab import Vocab, init_backend
from worker.batch import BatchBuffer
from worker.seq_state import restore_seq_state

log = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The model or context could not be created with the configured parameters."""


# The engine's sizes are what the protocol's `ready` carries (plus the embedding service's limits).
EngineInfo = ModelInfo


def _kv_override_array(overrides: dict[str, bool | int | float | str]) -> Any:
    """Builds llama.cpp's NULL-key-terminated kv override array."""
    array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
    for i, (key, value) in enumerate(overrides.items()):
        array[i].key = key.encode()
        if isinstance(value, bool):
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            array[i].value.val_bool = value  # type: ignore[union-attr]
        elif isinstance(value, int):
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            array[i].value.val_i64 = value  # type: ignore[union-attr]
        elif isinstance(value, float):
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            array[i].value.val_f64 = value  # type: ignore[union-attr]
        else:
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            array[i].value.val_str = value.encode()[:127]  # type: ignore[union-attr]
    array[len(overrides)].key = b"\0"
    return array


def model_params(options: ModelOptions, override: WorkerOverride) -> tuple[Any, list[Any]]:
    """llama_model_params from the config; returns the struct and the buffers it points into."""
    params = llama_cpp.llama_model_default_params()
    keep: list[Any] = []
    n_gpu_layers = override.n_gpu_layers if override.n_gpu_layers is not None else options.n_gpu_layers
    if n_gpu_layers is not None:
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
    if options.split_mode is not None:
        params.split_mode = options.split_mode
    main_gpu = override.main_gpu if override.main_gpu is not None else options.main_gpu
    if main_gpu is not None:
        params.main_gpu = main_gpu
    if options.tensor_split:
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*options.tensor_split)
        keep.append(split)
        params.tensor_split = split
    if options.use_mmap is not None:
        params.use_mmap = options.use_mmap
    # draft-mtp without an assistant GGUF drafts from the model's own NextN block, skipped unless asked for.
    own_mtp = options.draft_model_path is None and options.draft_model_from_pretrained is None
    params.load_mtp = options.draft_model == "draft-mtp" and own_mtp
    if options.use_mlock is not None:
        params.use_mlock = options.use_mlock
    if options.kv_overrides:
        array = _kv_override_array(options.kv_overrides)
        keep.append(array)
        params.kv_overrides = array
    return params, keep


def context_params(
    options: ModelOptions, override: WorkerOverride, embedding: bool, pooling_type: int | None
) -> Any:
    params = llama_cpp.llama_context_default_params()
    if options.n_ctx is not None:
        params.n_ctx = options.n_ctx
    if options.n_batch is not None:
        params.n_batch = options.n_batch
    params.n_ubatch = options.n_ubatch if options.n_ubatch is not None else min(params.n_batch, 512)
    if options.n_seq_max is not None:
        params.n_seq_max = options.n_seq_max
    threads = override.threads if override.threads is not None else options.threads
    threads_batch = override.threads_batch if override.threads_batch is not None else options.threads_batch
    if threads is not None:
        params.n_threads = threads
    if threads_batch is not None:
        params.n_threads_batch = threads_batch
    simple = {
        "rope_scaling_type": options.rope_scaling_type,
        "attention_type": options.attention_type,
        "rope_freq_base": options.rope_freq_base,
        "rope_freq_scale": options.rope_freq_scale,
        "yarn_ext_factor": options.yarn_ext_factor,
        "yarn_attn_factor": options.yarn_attn_factor,
        "yarn_beta_fast": options.yarn_beta_fast,
        "yarn_beta_slow": options.yarn_beta_slow,
        "yarn_orig_ctx": options.yarn_orig_ctx,
        "offload_kqv": options.offload_kqv,
        "op_offload": options.op_offload,
        "swa_full": options.swa_full,
        "no_perf": options.no_perf,
        "type_k": options.type_k,
        "type_v": options.type_v,
    }
    for name, value in simple.items():
        if value is not None:
            setattr(params, name, value)
    if options.flash_attn is not None:
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if options.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
    params.kv_unified = options.kv_unified
    params.embeddings = embedding
    if pooling_type is not None:
        params.pooling_type = pooling_type
    return params


def detect_pooling(vocab: Vocab) -> int | None:
    """The pooling type a GGUF declares (`<arch>.pooling_type`), or None for generation models."""
    arch = vocab.metadata("general.architecture") or ""
    value = vocab.metadata(f"{arch}.pooling_type")
    return int(value) if value not in (None, "") else None


class LlamaEngine:
    """One llama_model + llama_context; the only owner of both, freed by `close()`."""

    def __init__(self, options: ModelOptions, model_path: Path, override: WorkerOverride) -> None:
        init_backend()
        self.options = options
        m_params, self._keep = model_params(options, override)
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), m_params)
        if not model:
            raise EngineLoadError(f"llama.cpp could not load the model {model_path}")
        self.model = model
        self.vocab = Vocab(model)
        declared_pooling = detect_pooling(self.vocab)
        embedding = (
            options.embedding
            if options.embedding is not None
            else declared_pooling
            not in (
                None,
                llama_cpp.LLAMA_POOLING_TYPE_NONE,
            )
        )
        pooling = options.pooling_type if options.pooling_type is not None else None
        c_params = context_params(options, override, embedding, pooling)
        self._validate_context(c_params, embedding, pooling if pooling is not None else declared_pooling)
        ctx = llama_cpp.llama_init_from_model(model, c_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise EngineLoadError("llama.cpp could not create the context (check n_ctx / n_batch / memory)")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(ctx))
        self.embedding = embedding
        self.batch = BatchBuffer(self.n_batch)
        devices = gpu.devices()
        n_layer = int(llama_cpp.llama_model_n_layer(model))
        self.info = EngineInfo(
            n_ctx=int(llama_cpp.llama_n_ctx(ctx)),
            n_ctx_seq=int(llama_cpp.llama_n_ctx_seq(ctx)),
            n_seq_max=self.n_seq_max,
            n_batch=self.n_batch,
            n_vocab=self.vocab.n_vocab,
            n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(model)),
            embedding=embedding,
            pooling_type=int(llama_cpp.llama_pooling_type(ctx)),
            swa=int(llama_cpp.llama_model_n_swa(model)) > 0,
            recurrent=bool(
                llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
            ),
            can_shift=bool(llama_cpp.llama_memory_can_shift(self.memory)),
            description=self._description(),
            backend=gpu.backend_name(devices),
            devices=tuple(device.label() for device in devices),
            offloaded_layers=gpu.offloaded_layers(
                gpu.requested_gpu_layers(options, override), n_layer, devices
            ),
            n_layer=n_layer,
        )

    @staticmethod
    def _validate_context(params: Any, embedding: bool, pooling: int | None) -> None:
        """Rejects parameter combinations that abort the process inside llama.cpp."""
        if params.n_ubatch > params.n_batch:
            raise EngineLoadError(f"n_ubatch {params.n_ubatch} exceeds n_batch {params.n_batch}")
        if (
            embedding
            and pooling == llama_cpp.LLAMA_POOLING_TYPE_MEAN
            and params.n_ubatch % max(params.n_seq_max, 1)
        ):
            raise EngineLoadError(
                f"mean pooling needs n_ubatch ({params.n_ubatch}) to be a multiple of "
                f"n_seq_max ({params.n_seq_max})"
            )

    def _description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def decode(self, n_tokens: int) -> int:
        """Decodes the first `n_tokens` rows of the batch buffer; returns llama_decode's status."""
        return int(llama_cpp.llama_decode(self.ctx, self.batch.view(n_tokens)))

    def logits_row(self, index: int) -> npt.NDArray[np.float32]:
        """The logits of batch row `index` (a row that asked for output), as a read-only numpy view."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab.n_vocab,))

    def seq_rm(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, start, end))

    def seq_cp(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, start, end)

    def replace_seq_state(self, seq_id: int, state: bytes) -> bool:
        """Replaces the sequence's KV with a saved state (`llama_state_seq_get_data` bytes); on failure
        the sequence is left empty, never half-restored."""
        self.seq_rm(seq_id)
        if restore_seq_state(self.ctx, seq_id, state):
            return True
        self.seq_rm(seq_id)
        return False

    def seq_pos_min(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
