"""The MiniLM GGUF conversion: llama.cpp must tokenize and embed exactly like the original model."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from shared.convert_bert import (
    FINGERPRINT_KEY,
    convert_sentence_transformer,
    packaged_minilm_source_dir,
    read_safetensors,
)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone strums an acoustic guitar on stage.",
    "The stock market fell sharply after the announcement!",
    "Naïve café-owners don't like UNK-words: xylophonically 42 times.",
]
# Where llama.cpp's WPM tokenizer agrees with HF BertTokenizer (it does not for words over 100
# characters, which HF maps to [UNK], nor for a word-final Greek capital sigma).
TOKENIZER_CASES = [
    "",
    "tab\there\nnew line",
    "a\u2603b \u2603 emoji \U0001f600 test",
    "\u4e2d\u6587\u5b57\u7b26 and \u65e5\u672c\u8a9e",
    "$100 + 5% = <html> [CLS] [MASK]",
    "\u00dcn\u00efc\u00f6d\u00e9 \u00c0\u00c9\u00ce stra\u00dfe",
    "soft\u00adhyphen zero\u200bwidth",
]
N_SEQ_MAX = 4
N_BATCH = 512  # MEAN pooling aborts unless n_ubatch (== n_batch here) is a multiple of n_seq_max


@pytest.fixture(scope="module")
def source_dir() -> Path:
    try:
        return packaged_minilm_source_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf_path(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_sentence_transformer(source_dir, tmp_path_factory.mktemp("minilm") / "m.gguf")


@pytest.fixture(scope="module")
def reference(source_dir: Path) -> Any:
    from tests.support.bert_reference import BertReference

    return BertReference(source_dir)


class LlamaEmbedder:
    """The llama.cpp low-level calls an embedding worker makes: one sequence per sentence."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        assert N_BATCH % N_SEQ_MAX == 0
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        assert self.model, "llama.cpp could not load the converted GGUF"
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.n_ctx = N_BATCH
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = N_SEQ_MAX
        params.n_threads = params.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx, "llama.cpp could not create an embedding context"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        assert n >= 0
        return list(buf[:n])

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Raw (unnormalised) MEAN-pooled embeddings, all texts in one llama_decode."""
        lib = self.lib
        seqs = [self.tokenize(t) for t in texts]
        total = sum(len(s) for s in seqs)
        assert len(seqs) <= N_SEQ_MAX and total <= N_BATCH
        batch = lib.llama_batch_init(total, 0, 1)
        try:
            i = 0
            for seq_id, ids in enumerate(seqs):
                for pos, tok in enumerate(ids):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq_id
                    batch.logits[i] = 1
                    i += 1
            batch.n_tokens = total
            assert lib.llama_decode(self.ctx, batch) == 0
            out = np.empty((len(seqs), self.n_embd), dtype=np.float32)
            for seq_id in range(len(seqs)):
                ptr = lib.llama_get_embeddings_seq(self.ctx, seq_id)
                assert ptr, f"no pooled embedding for sequence {seq_id}"
                out[seq_id] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
            return out
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@pytest.fixture(scope="module")
def embedder(gguf_path: Path) -> Iterator[LlamaEmbedder]:
    emb = LlamaEmbedder(gguf_path)
    yield emb
    emb.close()


def _unit(v: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    v = np.asarray(v, dtype=np.float64)
    return np.asarray(v / np.linalg.norm(v))


@pytest.mark.slow
def test_tokens_match_reference_wordpiece(embedder: LlamaEmbedder, reference: Any) -> None:
    for text in SENTENCES + TOKENIZER_CASES:
        assert embedder.tokenize(text) == reference.tokenizer.encode(text), text


@pytest.mark.slow
def test_embeddings_match_numpy_reference(embedder: LlamaEmbedder, reference: Any) -> None:
    got = embedder.embed(SENTENCES)
    cosines = [float(_unit(g) @ reference.embed(t)) for g, t in zip(got, SENTENCES, strict=True)]
    print("cosine vs numpy reference:", [f"{c:.7f}" for c in cosines])
    # Seen: 0.9999992 (F16 weights); the remainder is llama.cpp's tanh-approximated GELU.
    assert min(cosines) >= 0.999, cosines


@pytest.mark.slow
def test_similar_sentences_are_closer(embedder: LlamaEmbedder) -> None:
    e = [_unit(v) for v in embedder.embed(SENTENCES)]
    similar = float(e[0] @ e[1])  # seen: 0.59
    unrelated = max(float(e[0] @ e[2]), float(e[1] @ e[2]))  # seen: -0.09
    assert similar > unrelated + 0.3, (similar, unrelated)


@pytest.mark.slow
def test_gguf_metadata(gguf_path: Path) -> None:
    reader = gguf.GGUFReader(gguf_path)

    def value(key: str) -> Any:
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "bert"
    assert value("bert.pooling_type") == int(gguf.PoolingType.MEAN)
    assert value("tokenizer.ggml.model") == "bert"
    assert value("tokenizer.ggml.normalizer.lowercase") is True
    assert value("tokenizer.ggml.token_type_count") == 2
    assert value("llamafleet.embedding.normalize") is True
    assert len(value(FINGERPRINT_KEY)) == 64
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_q.bias"] == "F32"
    assert "pooler.dense.weight" not in types


@pytest.mark.slow
def test_conversion_is_skipped_when_up_to_date(source_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF but not really")  # stale or foreign file: converted over
    convert_sentence_transformer(source_dir, out)
    first = out.stat()
    assert first.st_size > 1_000_000
    assert convert_sentence_transformer(source_dir, out) == out
    assert out.stat().st_mtime_ns == first.st_mtime_ns
    assert out.stat().st_ino == first.st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp files left behind


def test_read_safetensors_parses_hand_built_file(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.5, -2.0], dtype=np.float16)
    c = np.array([7, 8, 9], dtype=np.int64)
    bf16 = (np.array([3.25, -0.5], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, dtype, arr in (
        ("a", "F32", a),
        ("b", "F16", b),
        ("c", "I64", c),
        ("d", "BF16", bf16),
    ):
        raw = arr.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))

    got = read_safetensors(path)
    assert sorted(got) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    np.testing.assert_array_equal(got["c"], c)
    np.testing.assert_array_equal(got["d"], np.array([3.25, -0.5], dtype=np.float32))
