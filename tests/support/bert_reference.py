"""A numpy forward pass of a sentence-transformers BERT model (all-MiniLM-L6-v2) without torch.

It is the oracle for the GGUF converter: the HF BertTokenizer (basic tokenizer + greedy WordPiece)
and the HF BertModel maths (exact-erf GELU, post-norm layers), then mean pooling and L2 norm.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.convert_bert import read_safetensors

FloatArray = npt.NDArray[np.float64]

_erf = np.vectorize(math.erf, otypes=[np.float64])


class WordPieceTokenizer:
    """HF BertTokenizer: clean text, split CJK/punctuation, lower-case, strip accents, WordPiece."""

    def __init__(self, vocab_path: Path, *, lowercase: bool = True, strip_accents: bool = True):
        with vocab_path.open(encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.unk_id = self.vocab["[UNK]"]

    def encode(self, text: str) -> list[int]:
        """Token ids of one sentence, wrapped in [CLS] ... [SEP]."""
        ids = [self.cls_id]
        for word in self.basic_tokenize(text):
            ids.extend(self.wordpiece(word))
        ids.append(self.sep_id)
        return ids

    def basic_tokenize(self, text: str) -> list[str]:
        chars: list[str] = []
        for ch in text:
            cp = ord(ch)
            if cp in (0, 0xFFFD) or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_chinese(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        words: list[str] = []
        for raw in "".join(chars).split():
            word = raw.lower() if self.lowercase else raw
            if self.strip_accents:
                word = "".join(
                    c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"
                )
            words.extend(_split_punctuation(word))
        return words

    def wordpiece(self, word: str, max_chars: int = 100) -> list[int]:
        """Greedy longest-match-first; a word with any unmatched piece becomes [UNK]."""
        if len(word) > max_chars:
            return [self.unk_id]
        pieces: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found: int | None = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    found = self.vocab[sub]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            pieces.append(found)
            start = end
        return pieces


class BertReference:
    """The encoder, pooling and normalisation of a sentence-transformers BERT folder."""

    def __init__(self, model_dir: Path):
        with (model_dir / "config.json").open(encoding="utf-8") as f:
            cfg: dict[str, Any] = json.load(f)
        self.n_layer = int(cfg["num_hidden_layers"])
        self.n_head = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        raw = read_safetensors(model_dir / "model.safetensors")
        self.w = {k.removeprefix("bert."): np.asarray(v, dtype=np.float64) for k, v in raw.items()}
        self.tokenizer = WordPieceTokenizer(model_dir / "vocab.txt")

    def embed(self, text: str) -> FloatArray:
        """Mean-pooled, L2-normalised sentence embedding."""
        return self.embed_ids(self.tokenizer.encode(text))

    def embed_ids(self, ids: list[int]) -> FloatArray:
        hidden = self.hidden_states(ids)
        pooled = hidden.mean(axis=0)
        return np.asarray(pooled / np.linalg.norm(pooled), dtype=np.float64)

    def hidden_states(self, ids: list[int]) -> FloatArray:
        w = self.w
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        for il in range(self.n_layer):
            p = f"encoder.layer.{il}."
            attn = self._attention(x, p + "attention.self.")
            x = self._norm(
                x + self._linear(attn, p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            h = self._linear(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = self._norm(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def _attention(self, x: FloatArray, prefix: str) -> FloatArray:
        n, d = x.shape
        hd = d // self.n_head

        def heads(name: str) -> FloatArray:
            return self._linear(x, prefix + name).reshape(n, self.n_head, hd).transpose(1, 0, 2)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        return np.asarray((probs @ v).transpose(1, 0, 2).reshape(n, d), dtype=np.float64)

    def _linear(self, x: FloatArray, prefix: str) -> FloatArray:
        return np.asarray(x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"])

    def _norm(self, x: FloatArray, prefix: str) -> FloatArray:
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + self.eps)
        return np.asarray(y * self.w[prefix + ".weight"] + self.w[prefix + ".bias"])


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_chinese(cp: int) -> bool:
    ranges = (
        (0x4E00, 0x9FFF),
        (0x3400, 0x4DBF),
        (0x20000, 0x2A6DF),
        (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF),
        (0xF900, 0xFAFF),
        (0x2F800, 0x2FA1F),
    )
    return any(lo <= cp <= hi for lo, hi in ranges)


def _split_punctuation(word: str) -> list[str]:
    out: list[str] = []
    current = ""
    for ch in word:
        if _is_punctuation(ch):
            if current:
                out.append(current)
            out.append(ch)
            current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out
