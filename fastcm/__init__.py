"""fastcm: fused kernels for consistency-model training and sampling."""

__version__ = "0.1.0"
