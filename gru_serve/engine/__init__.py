"""The engine: continuous batching on onnxruntime, the engine process and its protocol, and the
interface the core uses (engine/api.py)."""
