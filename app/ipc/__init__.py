"""The boundary between the HTTP front-end processes and the engine process(es).

    wire.py     framing of the control channel, the shared-memory arena and its allocator
    client.py   RemoteEngine: the front end's engine client (submit -> detections)
    server.py   the engine process: loads the model, serves RemoteEngines on a unix socket

Pixels cross in shared memory (one arena per front-end worker, written by it, read by the
engine); the socket carries ids, options, offsets and the small result arrays.
"""
