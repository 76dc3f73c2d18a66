"""The bridge to asappresearch/sru (optional extra `cells[sru]`): its SRUCell, called like an nn cell."""

from __future__ import annotations

import contextlib
import functools
import warnings
from types import ModuleType

import torch
from torch import nn

INSTALL_HINT = "pip install 'cells[sru]' (the sru==2.6.0 package; its CPU kernel compiles on first import)"


class SRUMissing(ValueError):
    """SRU parity or `--imp torch` for sru was asked for without the optional package."""


@functools.cache
def sru_package() -> ModuleType:
    """The `sru` module, or SRUMissing naming the extra to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns that CUDA kernels cannot be compiled on a CPU machine
            import sru
    except ImportError as error:
        raise SRUMissing(f"the sru package is not installed ({error}); {INSTALL_HINT}") from None
    return sru


def sru_available() -> bool:
    try:
        sru_package()
        return True
    except SRUMissing:
        return False


@functools.cache
def sru_step_class() -> type[nn.Module]:
    """`sru.SRUCell`, also callable one step at a time like `nn.LSTMCell`: `(x (B, I), (h, c)) -> (h, c)`."""

    class SRUStepCell(sru_package().SRUCell):
        def forward(self, x, carry=None, mask_pad=None):  # type: ignore[override]
            c0 = carry[1] if isinstance(carry, tuple) else carry
            # sru's no-grad CPU kernel is float32-only; in other dtypes run its pure-Python reference path
            # (taken in grad mode) and detach, so that inference works in float64 too.
            detach = not torch.is_grad_enabled() and x.dtype != torch.float32
            with warnings.catch_warnings(), torch.enable_grad() if detach else contextlib.nullcontext():
                warnings.simplefilter("ignore")  # "Running SRU on CPU with grad_enabled=True": the path we want
                h, c = super().forward(x, c0, mask_pad)
            if detach:
                h, c = h.detach(), c.detach()
            return (h[0], c) if x.dim() == 2 else (h, c)  # one step: (1, B, H) -> (B, H)

    return SRUStepCell


def is_sru_module(module: nn.Module) -> bool:
    """True for an `sru.SRUCell` (without importing sru when it is not installed)."""
    return any(cls.__module__.startswith("sru.") and cls.__name__ == "SRUCell" for cls in type(module).__mro__)


def check_sru_settings(module: nn.Module) -> None:
    """Refuse SRUCell options that `functional.sru_cell` does not implement, instead of converting them wrongly."""
    unsupported = {
        "use_tanh": getattr(module, "activation_type", 0) != 0,
        "has_skip_term=False": not getattr(module, "has_skip_term", True),
        "bidirectional": getattr(module, "bidirectional", False),
        "n_proj": getattr(module, "projection_size", 0) > 0,
        "layer_norm": getattr(module, "layer_norm", None) is not None,
        "custom_m": getattr(module, "custom_m", None) is not None,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"module: SRUCell with {', '.join(found)} is not supported by functional.sru_cell "
            "(expected the default identity activation, skip term on, one direction, no projection, no layer norm)"
        )
