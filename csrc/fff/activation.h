// SPDX-License-Identifier: Apache-2.0
// Scalar activations and their derivatives, shared by the CPU (per-ISA) and CUDA kernels. The formulas
// are torch's: gelu (erf), gelu(approximate="tanh"), relu (gradient 0 at 0), silu.
// NOTE(isa): static inline only (see cmake/CpuIsa.cmake).
#pragma once

#include <math.h>

#include "fff/fff.h"

#if defined(__CUDACC__)
#define FL_HD __host__ __device__
#else
#define FL_HD
#endif

namespace fastlayers::fff {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;

FL_HD static inline float act_value(Activation act, float a) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * a * (1.0f + erff(a * kInvSqrt2));
    case Activation::kGeluTanh:
      return 0.5f * a * (1.0f + tanhf(kSqrt2OverPi * (a + kGeluTanhC * a * a * a)));
    case Activation::kRelu:
      return a > 0.0f ? a : 0.0f;
    default:
      return a / (1.0f + expf(-a));
  }
}

FL_HD static inline float act_grad(Activation act, float a) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * (1.0f + erff(a * kInvSqrt2)) + a * kInvSqrt2Pi * expf(-0.5f * a * a);
    case Activation::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (a + kGeluTanhC * a * a * a));
      return 0.5f * (1.0f + t) +
             0.5f * a * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * a * a);
    }
    case Activation::kRelu:
      return a > 0.0f ? 1.0f : 0.0f;
    default: {
      const float s = 1.0f / (1.0f + expf(-a));
      return s * (1.0f + a * (1.0f - s));
    }
  }
}

}  // namespace fastlayers::fff
