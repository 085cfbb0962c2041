"""The engine: continuous batching, onnxruntime, the derived decode graphs, sampling, tokenizers."""
