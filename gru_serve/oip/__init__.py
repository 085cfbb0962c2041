"""The Open Inference Protocol's core, shared by its gRPC and REST front ends."""
