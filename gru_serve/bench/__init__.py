"""Benchmarks: `gru-serve bench` (gru_serve.bench.run), its in-process and served parts, the
report, and the GPU check. Nothing here imports torch: PyTorch runs in subprocesses."""
