"""The bias gradient every op's autograd formula forms (no kernel of its own)."""
import torch
from torch import Tensor


def bias_grad(dy: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """dbias (m,) = Σ_T dy for dy (T, m), accumulated in float32 (float64 for float64 dy, whose
    precision a float32 sum would lose), returned in the bias's dtype."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc).to(bias_dtype)
