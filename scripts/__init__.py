"""Tools, not the service (app/ never imports them). At the top, what a user reaches for:
export_onnx.py (a model folder to ONNX, float32 and INT8) and the GPU check (gpu_check.sh,
fetch_gpu_wheels.sh, gpu_check_report.py). Below, by purpose: training/ (synthetic data, training
and evaluating the default model, test-image generators), bench/ (benchmarks, load generators, the
peer servers they measure against, the server-process helper), checks/ (operational checks:
chaos, hostile payloads, failed loads, model swaps, parity)."""
