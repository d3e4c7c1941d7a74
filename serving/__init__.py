"""Serving GPTQ checkpoints over gRPC on Ray Serve."""
