"""fastcm: fused kernels for consistency-model training and sampling.

Importing fastcm imports neither triton nor the compiled extension; both load on first use.
"""

from .precondition import precondition, precondition_scalings

__version__ = "0.1.0"

__all__ = ["precondition", "precondition_scalings"]
