"""Pure-PyTorch specifications of every fastcm op (also the CPU fallback)."""
