# SPDX-License-Identifier: Apache-2.0
"""Drop-in ``torch.nn`` modules backed by fastlayers kernels."""

from fastlayers.nn.fff import FastFeedForward, UltraFastFeedForward
from fastlayers.nn.int4_fp8 import Int4Fp8Linear
from fastlayers.nn.peer import PEER
from fastlayers.nn.quant_attention import RopeAwareQuantAttention
from fastlayers.nn.rmsnorm import RMSNorm
from fastlayers.nn.skip import RoutedSelfAttention

__all__ = [
    "RMSNorm",
    "FastFeedForward",
    "UltraFastFeedForward",
    "PEER",
    "Int4Fp8Linear",
    "RoutedSelfAttention",
    "RopeAwareQuantAttention",
]
