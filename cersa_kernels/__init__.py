"""cersa_kernels: fused kernels for memory-efficient SVD-based fine-tuning.

Importing this package touches no GPU and does not import triton; kernels load on first use.
"""
from . import backends, ops
from .decompose import decompose, global_ranks, select_rank, truncated_svd
from .model import apply, export_peft_lora, load, merge, save, trainable_parameters
from .nn import CersaLinear, LoraLinear, PicaLinear, SnellLinear

__version__ = "0.1.0"
__all__ = [
    "CersaLinear", "LoraLinear", "PicaLinear", "SnellLinear",
    "decompose", "select_rank", "truncated_svd", "global_ranks", "ops", "backends",
    "apply", "merge", "save", "load", "trainable_parameters", "export_peft_lora", "__version__",
]
