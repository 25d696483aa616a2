"""The model side of a batch: everything between the batcher and the backend.

    pipeline.py     Engine: prepare (decode, pre-process) -> compute (backend) -> finish
                    (post-process), each stage with its own lock; out-of-memory splitting
    preprocess.py   images -> pixel_values, batched in torch (transformers' image processors)
    postprocess.py  logits and boxes -> detections in each image's pixels (transformers'
                    post_process_object_detection); the one place a box is scaled
    preprocess_spec.py  the checkpoint's preprocessing rules, read from its JSON (no torch)
    tasks.py        what crosses between the service and the engine (no torch)
    build.py        start-up per device: an EngineSpec resolved (backend, precision, CUDA
                    graphs, buckets, image decoder, warm-up), then the Engine built once
    backend_choice.py  --backend auto resolved (onnxruntime on the CPU, torch on CUDA), the
                    ONNX file found or exported (app/export/), the fallbacks to torch
    pool.py         one engine per device; each batch to the least busy engine
    buckets.py      batch-size buckets (padding a batch to a captured graph's size)
    precision.py    dtype auto on CUDA: fp16 only if it agrees with fp32
    tile_tasks.py   tiled images: tasks -> tile tasks (views), tiles' boxes -> merged (NMS/NMM)

    host_staging.py  decoded pixels to a CUDA device through one pinned buffer per device
    memory_budget.py  the device memory a start-up needs, checked before loading
    null.py         --backend null: no model, a fixed answer (the serving path measured alone)

Images are decoded in app/images/ (the engine asks its decoder there, app/images/device.py, for
pixels on the device). The front end's tiling geometry is app/tile_geometry.py. Nothing here
knows HTTP; app/process/engine_host.py builds the engines and app/service.py feeds them.
"""
