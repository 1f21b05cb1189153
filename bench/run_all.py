"""`make bench`: every benchmark in turn, each printing ratios against a baseline measured in the same run."""

from __future__ import annotations

from bench import embeddings, prefix, serving, step_overhead, structured_budget, vs_llama_server, wire


def main() -> None:
    print("== serving: server vs raw llama-cpp-python loop ==")
    serving.main([])
    print("\n== prefix caching ==")
    prefix.main([])
    print("\n== host overhead per engine step ==")
    step_overhead.main([])
    print("\n== wire format: frames messages ==")
    wire.main([])
    print("\n== structured output: budget tracking ==")
    structured_budget.main([])
    print("\n== embeddings ==")
    embeddings.main([])
    print("\n== against llama-server (LLAMA_SERVER_BIN) ==")
    vs_llama_server.main([])


if __name__ == "__main__":
    main()
