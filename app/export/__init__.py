"""ONNX files the onnx backend serves: the exporter (onnx_export.py), the cache that makes each
export once per model (cache.py), and static INT8 quantization (quantize.py)."""
