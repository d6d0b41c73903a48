"""Triton kernels of the CUDA fast path. Triton is optional: ``paged_attention.available()`` says whether
these kernels can run (Triton ships with CUDA torch; CPU users without it take the torch reference path)."""
