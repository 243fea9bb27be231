# SPDX-License-Identifier: Apache-2.0
"""Drop-in ``torch.nn`` modules backed by fastlayers kernels."""

from fastlayers.nn.rmsnorm import RMSNorm

__all__ = ["RMSNorm"]
