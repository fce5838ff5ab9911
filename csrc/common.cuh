// Helpers shared by the kernels in csrc/: error checks, dtype dispatch, fp32 conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launchers.h"

namespace cersa {

// Throws std::runtime_error with CUDA's own error string, so Python sees e.g. "no CUDA-capable device".
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
  }
}
#define CERSA_CUDA_CHECK(expr) ::cersa::check_cuda((expr), #expr)
// Launch errors (bad configuration, no kernel image for this GPU) surface here, not at the next sync.
#define CERSA_CHECK_LAUNCH(name) ::cersa::check_cuda(cudaGetLastError(), name)

[[noreturn]] inline void invalid(const std::string& msg) { throw std::invalid_argument(msg); }

inline std::string shape_str(int64_t r, int64_t c) {
  return "(" + std::to_string(r) + ", " + std::to_string(c) + ")";
}

inline void check_matrix(const char* name, const Matrix& t, int64_t rows, int64_t cols, DType dtype) {
  if (t.rows != rows || t.cols != cols) {
    invalid(std::string(name) + " must have shape " + shape_str(rows, cols) + ", got " + shape_str(t.rows, t.cols));
  }
  if (t.dtype != dtype) {
    invalid(std::string(name) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  }
}

// A host pointer handed to a kernel would corrupt the CUDA context; refuse it with a clear error.
// On a machine without a GPU or driver the first CUDA call here raises the driver's message.
inline void check_device_pointer(const char* name, const void* ptr) {
  int device = 0;
  CERSA_CUDA_CHECK(cudaGetDevice(&device));
  cudaPointerAttributes attr{};
  CERSA_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::runtime_error(std::string(name) + " is not CUDA device memory (host or unregistered pointer)");
  }
  if (attr.device != device) {
    throw std::runtime_error(std::string(name) + " lives on CUDA device " + std::to_string(attr.device) +
                             " but the current device is " + std::to_string(device));
  }
}

inline void check_device_matrix(const char* name, const Matrix& t) {
  if (t.rows > 0 && t.cols > 0) check_device_pointer(name, t.data);  // empty tensors may hold no memory
}

// Runs f(T{}) with T the C++ element type of dt.
template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
  }
  invalid("unknown dtype code " + std::to_string(static_cast<int>(dt)));
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cersa
