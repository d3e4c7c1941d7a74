"""Pure-torch GPTQ quantization: math, packing, checkpoint formats and the layer-wise engine.

Nothing in this package imports Ray or gRPC; the cluster and serving packages build on it.
"""
