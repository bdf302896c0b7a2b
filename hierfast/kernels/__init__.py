"""Triton kernels. Imported lazily by hierfast.ops so that triton stays optional."""
