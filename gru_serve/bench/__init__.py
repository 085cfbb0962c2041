"""Benchmarks: `gru-serve bench` (gru_serve.bench.run) runs its sections (gru_serve.bench.section:
each runs and writes its own goals, tables, plots and Markdown; report.py puts them together),
and the GPU check. Nothing here imports torch: PyTorch runs in subprocesses."""
