"""layerfs's benchmark suite: cached test layers, mounts of each union implementation, the workloads,
the interleaved comparison runner (``tools/bench``, ``python -m benchmarks.compare``) and pytest-benchmark
suites (``python -m pytest benchmarks/``). It never imports layerfs: layerfs is measured as users run it,
through its command. See benchmarks/README.md.
"""
