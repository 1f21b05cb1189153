"""Benchmarks, each comparing the server with a baseline measured in the same run, and the soak harness."""

from shared.threads import tune_openmp

# The raw-engine baselines run in this process: same OpenMP settings as a worker (before llama_cpp loads).
tune_openmp()
