"""Task-delta types and the linear algebra that works on them."""

from starmerge.tensors.delta import Delta, Dense, LowRank, densify, zeros_like_delta

__all__ = ["Delta", "Dense", "LowRank", "densify", "zeros_like_delta"]
