"""Benchmarks and load: throughput and latency of detr-serve (bench.py and its --compare,
--overhead and --device cuda runs), per-feature benchmarks (bench_*.py, profile_onnx.py), load
generators (httpload.py, Locust files, the soak test loadtest.py), the peer servers measured
against (LitServe, naive, bare FastAPI) and serverproc.py, which boots the real server for them
and for the end-to-end tests."""
