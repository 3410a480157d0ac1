"""Fused / chunked numerical kernels (plain PyTorch, device-agnostic)."""
