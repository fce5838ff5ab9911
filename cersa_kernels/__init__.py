"""cersa_kernels: fused kernels for memory-efficient SVD-based fine-tuning.

Importing this package touches no GPU and does not import triton; kernels load on first use.
"""
from . import backends, ops
from .decompose import decompose, select_rank, truncated_svd
from .nn import CersaLinear
from .nn import SnellLinear

__version__ = "0.1.0"
__all__ = ["CersaLinear", "decompose", "select_rank", "truncated_svd", "ops", "backends", "__version__"]
__all__ += ["SnellLinear"]
