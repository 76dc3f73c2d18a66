"""cells.parity: the bridge to torch.nn (convert params both ways, compare outputs and gradients)."""

from parity.compare import ParityReport, compare
from parity.convert import TORCH_MODULES, arch_of, from_torch, is_layered, load_params, to_torch

__all__ = ["TORCH_MODULES", "ParityReport", "arch_of", "compare", "from_torch", "is_layered", "load_params", "to_torch"]
