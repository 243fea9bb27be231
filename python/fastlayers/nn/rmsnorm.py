# SPDX-License-Identifier: Apache-2.0
"""Drop-in RMSNorm for ``torch.nn.RMSNorm``, Hugging Face ``LlamaRMSNorm`` and ``GemmaRMSNorm``."""

from __future__ import annotations

import numbers

import torch

from fastlayers.ops.rmsnorm import fused_add_rms_norm, rms_norm


def norm_weight_offset(module: torch.nn.Module) -> float:
    """The offset an RMSNorm adds to its weight: a fastlayers RMSNorm's ``weight_offset``, 1.0 for
    Hugging Face's ``Gemma*RMSNorm`` (``1 + w``), else 0."""
    if isinstance(module, RMSNorm):
        return module.weight_offset
    name = type(module).__name__
    return 1.0 if name.startswith("Gemma") and name.endswith("RMSNorm") else 0.0


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension, with an optional fused residual add.

    Parameters
    ----------
    hidden_size : int
        Size of the last dimension (an int, or a one-element shape as ``torch.nn.RMSNorm`` takes).
    eps : float
        Added to ``mean(x**2)`` inside the square root (1e-6, as Llama configs use).
    weight_offset : float
        0: Llama form, ``weight * round(x * r)`` (normalise in fp32, cast to the input dtype, then
        multiply by the weight; matches ``LlamaRMSNorm``).
        1.0: Gemma form, ``x * r * (1 + weight)`` computed in fp32 and cast once at the end (matches
        ``GemmaRMSNorm``); the weight is then initialised to zeros.
    round_once : bool
        ``torch.nn.RMSNorm``'s rounding: ``x * r * (weight_offset + weight)`` in fp32, cast once
        (the Llama form rounds twice: in bf16/fp16 about a quarter of the outputs differ by one
        unit in the last place). :meth:`from_module` sets it for a ``torch.nn.RMSNorm``.

    ``forward(x)`` returns ``y``; ``forward(x, residual)`` returns ``(y, x + residual)``, the
    Hugging Face decoder-layer order, in one pass. The parameter is ``weight`` (same state_dict key
    as the modules it replaces). Output dtype is the input's; with a float32 weight and a 16-bit
    input, ``LlamaRMSNorm`` would return float32 while this returns the input dtype (as vLLM and
    Liger do).
    """

    def __init__(
        self,
        hidden_size,
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        device=None,
        dtype=None,
        round_once: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(hidden_size, numbers.Integral):
            shape = tuple(hidden_size)
            if len(shape) != 1:
                raise ValueError(
                    f"hidden_size: fastlayers.nn.RMSNorm normalises the last dimension only; "
                    f"got normalized_shape {shape}"
                )
            hidden_size = shape[0]
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if eps is None or eps < 0:
            raise ValueError(f"eps must be a float >= 0, got {eps}")
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)
        self.round_once = bool(round_once)
        init = 1.0 - self.weight_offset
        self.weight = torch.nn.Parameter(
            torch.full((self.hidden_size,), init, device=device, dtype=dtype)
        )

    # Hugging Face modules name it variance_epsilon; code that reads it keeps working.
    @property
    def variance_epsilon(self) -> float:
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        once = self.round_once
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.weight_offset, round_once=once)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset,
                                  round_once=once)  # fmt: skip

    def reset_parameters(self) -> None:
        torch.nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def extra_repr(self) -> str:
        s = f"{self.hidden_size}, eps={self.eps}"
        if self.weight_offset != 0.0:
            s += f", weight_offset={self.weight_offset}"
        if self.round_once:
            s += ", round_once=True"
        return s

    @classmethod
    def from_module(cls, module: torch.nn.Module, weight_offset: float | None = None) -> RMSNorm:
        """A fastlayers RMSNorm with ``module``'s weight (shared, not copied) and eps.

        Reads ``eps`` (torch) or ``variance_epsilon`` (Hugging Face). ``torch.nn.RMSNorm(eps=None)``
        means the machine epsilon of the dtype it computes in: float32 for 16-bit and float32
        inputs (checked bit for bit), float64 for float64; resolved here from the weight's dtype.
        ``weight_offset`` defaults to 1.0 for classes named ``Gemma*RMSNorm``, else 0; a
        ``torch.nn.RMSNorm`` gets its one rounding (``round_once``).
        """
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise TypeError(
                f"module: expected an RMSNorm with a 1-D weight, got {type(module).__name__}"
            )
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:  # (not the 16-bit dtype's own epsilon: 0.0078 for bf16)
            eps = torch.finfo(torch.promote_types(weight.dtype, torch.float32)).eps
        if weight_offset is None:
            weight_offset = norm_weight_offset(module)
        once = isinstance(module, torch.nn.RMSNorm)
        new = cls(weight.shape[0], eps=eps, weight_offset=weight_offset, device="meta",
                  round_once=once)  # fmt: skip
        new.weight = (
            weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight)
        )
        return new
