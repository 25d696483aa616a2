"""The model behind a small interface (`base.Backend`: infer on a batch of pixel_values), with
no HTTP here.

    base.py           Backend, RawOutputs
    torch_backend.py  eager transformers models (and the device/dtype resolution)
    cuda_graphs.py    any torch Backend replayed as one CUDA graph per batch bucket
    capture_guard.py  what makes transformers' RT-DETR family capturable
    onnx_backend.py   onnxruntime sessions of an exported model
    ultralytics.py    an Ultralytics RT-DETR checkpoint giving logits and boxes like transformers
"""
