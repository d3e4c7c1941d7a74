"""Fused GPU kernels for QuantLinear. Optional: QuantLinear falls back to its torch path without them."""
