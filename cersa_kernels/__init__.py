"""cersa_kernels: fused kernels for memory-efficient SVD-based fine-tuning.

Importing this package touches no GPU and does not import triton; kernels load on first use.
"""
from . import backends, nn, ops, para
from .decompose import decompose, global_ranks, select_rank, truncated_svd
from .checkpoint import load_converted, save_converted
from .config import AdapterConfig
from .model import (
    adapter_configs, adapter_layers, apply, export_peft_lora, load, merge, modules_to_save, parameter_counts,
    print_trainable_parameters, save, trainable_parameters,
)
from .nn import AdapterLayer, CersaLinear, LoraLinear, PicaCersaLinear, PicaLinear, SnellLinear
from .peft_interop import from_peft, patch_peft, trainer_callback, unpatch_peft

__version__ = "0.1.0"
__all__ = [
    "AdapterLayer", "CersaLinear", "LoraLinear", "PicaLinear", "PicaCersaLinear", "SnellLinear",
    "decompose", "select_rank", "truncated_svd", "global_ranks", "ops", "backends", "nn", "para",
    "apply", "merge", "save", "load", "trainable_parameters", "adapter_layers", "export_peft_lora",
    "AdapterConfig", "adapter_configs", "print_trainable_parameters", "parameter_counts", "modules_to_save",
    "save_converted", "load_converted",
    "from_peft", "patch_peft", "unpatch_peft", "trainer_callback", "__version__",
]
