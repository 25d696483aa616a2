"""Gigapixel images as background jobs (issue 15).

store.py   SQLite (WAL) job table and result rows, the uploads folder; shared by the
           front ends (accept, poll, cancel, list) and the runner (claim, progress, finish)
reader.py  region reads of tiled/pyramidal TIFF (tifffile + zarr), plain images decoded once
runner.py  the one place jobs run: claims queued jobs, reads tiles, submits them to the
           engine at low priority, merges the boxes, writes the result
process.py the job-runner process the supervisor starts (a client of the engine processes)
"""
