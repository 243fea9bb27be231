# SPDX-License-Identifier: Apache-2.0
"""Drop-in RMSNorm for ``torch.nn.RMSNorm``, Hugging Face ``LlamaRMSNorm`` and ``GemmaRMSNorm``."""

from __future__ import annotations

import copy
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


def rms_norm_form(module: torch.nn.Module) -> tuple[float, bool] | None:
    """``(weight_offset, round_once)`` under which :class:`RMSNorm` computes what the RMSNorm
    ``module`` computes, bit for bit: a copy of it with random weights runs on a random bf16 input
    and is compared with each form (Llama: cast, then weight; one rounding: weight in fp32, then
    cast, as ``torch.nn.RMSNorm`` and OLMo 2 do; Gemma: ``1 + w`` in fp32). None when no form
    matches. Where the copy cannot run on the CPU (meta or offloaded weights, a failing forward),
    the name rule of :meth:`RMSNorm.from_module` answers instead."""
    from fastlayers.reference import rms_norm as ref_rms_norm

    guess = (norm_weight_offset(module), isinstance(module, torch.nn.RMSNorm))
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return guess
    n = weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, n, generator=g).to(torch.bfloat16)
    w = (torch.rand(n, generator=g) * 2.5 - 0.75).to(torch.bfloat16)
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.bfloat16)
        with torch.no_grad():
            probe.weight.copy_(w)
            want = probe(x)
    except Exception:  # noqa: BLE001 (a module that cannot run here: keep the name rule)
        return guess
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    best, best_bad = None, None
    for offset, once in dict.fromkeys((guess, (0.0, False), (0.0, True), (1.0, False))):
        got = ref_rms_norm(x, w, eps, offset, once)
        bad = int((got != want).sum()) if got.shape == want.shape else x.numel()
        if best_bad is None or bad < best_bad:
            best, best_bad = (offset, once), bad
    # a form that is not the module's differs in a quarter or more of the elements; the right one
    # in at most the few whose fp32 sum of squares rounds differently in another reduction order
    return best if best_bad <= x.numel() // 100 else None


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
    def from_module(
        cls,
        module: torch.nn.Module,
        weight_offset: float | None = None,
        round_once: bool | None = None,
    ) -> RMSNorm:
        """A fastlayers RMSNorm with ``module``'s weight (shared, not copied) and eps.

        Reads ``eps`` (torch) or ``variance_epsilon`` (Hugging Face). ``torch.nn.RMSNorm(eps=None)``
        means the machine epsilon of the dtype it computes in: float32 for 16-bit and float32
        inputs (checked bit for bit), float64 for float64; resolved here from the weight's dtype.
        ``weight_offset`` defaults to 1.0 for classes named ``Gemma*RMSNorm``, else 0;
        ``round_once`` defaults to True for a ``torch.nn.RMSNorm`` (its one rounding), else False.
        :func:`rms_norm_form` finds both by running the module instead (what ``patch_model`` uses).
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
        if round_once is None:
            round_once = isinstance(module, torch.nn.RMSNorm)
        new = cls(weight.shape[0], eps=eps, weight_offset=weight_offset, device="meta",
                  round_once=round_once)  # fmt: skip
        new.weight = (
            weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight)
        )
        return new
