"""Byte formats only: the layout constants, the control block, ring records, snapshot and
index segments, the event codec, and the optional C speedups of their hot loops."""
