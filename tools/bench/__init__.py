"""Parts of tools/bench_overhead.py: the model families, the timed rows, peak memory and
the COCO evaluation speed check."""
