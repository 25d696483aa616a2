"""Images in and out: the container walk, the one decode (Pillow, nvjpeg), the decode
workers, rendering."""
