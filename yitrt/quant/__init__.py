"""Quantization schemes: the registry, data-free encoders and (later) calibrated quantization."""
