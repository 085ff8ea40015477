"""Triton kernels and their launchers (installed as fastcm.kernels); no autograd here."""
