// SPDX-License-Identifier: Apache-2.0
// Launchers return a Status instead of throwing; bindings.cpp turns it into a Python exception.
#pragma once

namespace fastlayers {

enum class StatusCode : int {
  kSuccess = 0,
  kInvalidArgument = 1,  // -> ValueError
  kUnsupported = 2,      // -> NotImplementedError (the Python layer falls back before this happens)
  kCudaError = 3,        // -> RuntimeError
};

struct Status {
  StatusCode code = StatusCode::kSuccess;
  const char* message = "";  // always a string literal or a static string (e.g. cudaGetErrorString)

  static Status ok() { return {}; }
  static Status invalid(const char* msg) { return {StatusCode::kInvalidArgument, msg}; }
  static Status unsupported(const char* msg) { return {StatusCode::kUnsupported, msg}; }
  bool is_ok() const { return code == StatusCode::kSuccess; }
};

}  // namespace fastlayers
