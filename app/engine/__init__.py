"""The model side of a batch: everything between the batcher and the backend.

    pipeline.py     Engine: prepare (decode, pre-process) -> compute (backend) -> finish
                    (post-process), each stage with its own lock; out-of-memory splitting
    processing.py   batched torch pre/post-processing that reproduces transformers' processors
    preprocess_spec.py  the checkpoint's preprocessing rules, read from its JSON (no torch)
    tasks.py        what crosses between the service and the engine (no torch)
    build.py        start-up per device: backend, precision, CUDA graphs, device decode, warm-up
    backend_choice.py  --backend auto resolved (onnxruntime on the CPU, torch on CUDA), the
                    ONNX file found or exported (app/export/), the fallbacks to torch
    pool.py         one engine per device; each batch to the least busy engine
    buckets.py      batch-size buckets (padding a batch to a captured graph's size)
    precision.py    dtype auto on CUDA: fp16 only if it agrees with fp32
    tiling.py       tiled images: tasks -> tile tasks (views), tiles' boxes -> merged (NMS/NMM)

Images are decoded in app/images/ (Pillow; nvjpeg on the device). Nothing here knows HTTP;
app/process/runtime.py builds the engines and app/service.py feeds them.
"""
