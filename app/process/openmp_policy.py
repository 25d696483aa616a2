"""OpenMP's wait policy for torch's CPU threads, set in the environment before anything loads
libgomp: the engine process (spawned) and every process it starts inherit it. A policy the user
set (OMP_WAIT_POLICY or GOMP_SPINCOUNT) wins.

- One process (--no-engine-process): PASSIVE. Idle OpenMP workers must sleep so that decoding and
  HTTP get the cores between forward passes (+18% end to end on 2 cores).
- The engine in a process of its own: a short spin, GOMP_SPINCOUNT=10000 (about 0.13 ms of a
  waiting thread's CPU after each parallel region, against 4.1 ms for libgomp's default of
  300,000). Long enough to keep a forward pass's team awake between its ops; short enough that
  the stretches where one thread works alone (the decoder's small ops, Python between them) and
  the gaps between batches leave the other core to the decode workers and the front ends. On
  2 cores, 16 clients, `--backend torch`, eight rounds over three runs of `bench.py --e2e-vs-raw`:
  0.90x to 1.24x libgomp's default in img/s (median 1.07x base64 JSON, 1.08x multipart), with
  0.79x to 1.05x its CPU per image (median 0.89x; docs/BENCHMARKS.md, 2026-12-03). Earlier,
  libgomp's default measured 21.6-26.4 img/s there against 16.0-17.6 under PASSIVE (ACTIVE,
  spinning without end, starves the front ends: 12.8-16.8). onnxruntime's own threads do not
  read these variables (the `--backend auto` default on the CPU measured the same with both
  spins). The front ends do not load OpenMP at all.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENGINE_SPINCOUNT = 10_000


def set_openmp_policy(engine_process: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set OpenMP's wait policy in `environ` for the process shape, unless the user set one."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    if engine_process:
        environ["GOMP_SPINCOUNT"] = str(ENGINE_SPINCOUNT)
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
