// The C++ API of the kernels in csrc/: plain launchers over device pointers, sizes, strides and a
// cudaStream_t. No torch, no Python. Strides are in elements, as torch reports them.
// Errors: std::invalid_argument for bad shapes/dtypes/workspace (the message names the expected and
// the actual value), std::runtime_error carrying the CUDA error string for failed CUDA calls.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace cersa {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown dtype";
}

// A 2-D strided view; a vector of length L is {data, dtype, 1, L, 0, stride}.
struct Matrix {
  void* data;
  DType dtype;
  int64_t rows, cols;
  int64_t stride_row, stride_col;
};

// A 3-D strided view (SNELL's per-head factors: heads × rows × dim).
struct Tensor3 {
  void* data;
  DType dtype;
  int64_t size[3];
  int64_t stride[3];
};

// CERSA forward (docs/methods.md §1): x (T, n), V (n, k), S (k, k), U (m, k), bias (1, m) or nullptr
// -> y = (x V)(U S)ᵀ + b (T, m) and h = x V (T, k). x, V, U, bias, y, h share one dtype; S is in
// that dtype or f32 (cast to it). The workspace holds U·S (and the cast S).
size_t lowrank_fwd_workspace_bytes(const Matrix& x, const Matrix& V, const Matrix& S, const Matrix& U);
void lowrank_fwd(const Matrix& x, const Matrix& V, const Matrix& S, const Matrix& U, const Matrix* bias,
                 const Matrix& y, const Matrix& h, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// CERSA backward: dy (T, m), h (T, k) -> g = dy U once, dS = gᵀ h (k, k) in S's dtype, and, when
// dx is not nullptr, dx = g (S Vᵀ) (T, n). The workspace holds g, S·Vᵀ and the split-T partials of dS.
size_t lowrank_bwd_workspace_bytes(const Matrix& dy, const Matrix& h, const Matrix& V, const Matrix& S,
                                   const Matrix& U, bool need_dx);
void lowrank_bwd(const Matrix& dy, const Matrix& h, const Matrix& V, const Matrix& S, const Matrix& U,
                 const Matrix* dx, const Matrix& dS, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// SNELL's sparse update for merging (docs/methods.md §4): A (H, n, d), B (H, m, d) -> out (m, n) with
// K[i, j] = Σ_h coeffs[h]·‖B[h, i] − A[h, j]‖₂ (fp32) and out = K·|K| where |K| > tau, else 0.
constexpr int kSnellMaxHeads = 16;
void snell_delta(const Tensor3& A, const Tensor3& B, const float* coeffs, int heads, float tau, const Matrix& out,
                 cudaStream_t stream);

}  // namespace cersa
