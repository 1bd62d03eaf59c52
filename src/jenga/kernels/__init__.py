"""Triton kernels, each the fast path of a PyTorch reference elsewhere in `jenga` that it must match."""
