"""DVC stage entry points, run as `python -m pipelines.NAME` so they import this checkout's tracer."""
