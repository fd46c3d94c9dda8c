"""Attention in plain torch ops for devices without attend's Triton kernels."""
