"""`make bench`: every benchmark in turn, each printing ratios against a baseline measured in the same run."""

from __future__ import annotations

from bench import (
    embeddings,
    lora,
    media,
    mtp,
    prefix,
    router_capacity,
    serving,
    spec_ceiling,
    speculative,
    step_overhead,
    structured_budget,
    vs_llama_server,
    wire,
)


def main() -> None:
    print("== serving: server vs raw llama-cpp-python loop ==")
    serving.main([])
    print("\n== prefix caching ==")
    prefix.main([])
    print("\n== speculative decoding: prompt lookup, predicted outputs ==")
    speculative.main([])
    print("\n== speculative decoding: the most it could gain on this machine ==")
    spec_ceiling.main([])
    print("\n== host overhead per engine step ==")
    step_overhead.main([])
    print("\n== wire format: frames messages ==")
    wire.main([])
    print("\n== router capacity on simulated workers ==")
    router_capacity.main([])
    print("\n== structured output: budget tracking ==")
    structured_budget.main([])
    print("\n== embeddings ==")
    embeddings.main([])
    print("\n== image input: embedding cache and prefix cache ==")
    media.main([])
    print("\n== speculative decoding: draft-mtp on tiny NextN models ==")
    mtp.main(["--concurrency", "1,4", "--ks", "1,3"])
    print("\n== LoRA: half the streams on an adapter vs all on the base model ==")
    lora.main([])
    print("\n== against llama-server (LLAMA_SERVER_BIN) ==")
    vs_llama_server.main([])


if __name__ == "__main__":
    main()
