"""Images in and out; the one place an image is decoded.

structure.py  the container walk that refuses decode-time bombs before any pixel
decode.py     Pillow with its guards: probe, decode (reduced to the model's input), upright
pool.py       the front end's decode worker processes (killed past their time)
device.py     the engine's decoder: pixels and JPEGs onto the model's device (Pillow, or
              nvjpeg with Pillow for each JPEG it refuses)
render.py     detections drawn on the upright image (/v1/render)
"""
