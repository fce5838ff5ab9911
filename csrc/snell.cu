// SNELL's sparse update for merging (docs/methods.md §4), one fused pass with no m×n intermediate:
//   K[i, j] = Σ_h c_h·‖B[h, i] − A[h, j]‖₂ (fp32),  out[i, j] = K·|K| if |K| > tau else 0,
//   and out = K for tau = −inf (sparsity 0: plain kernelized LoRA, no |K| scaling).
// out is K·mag, a product, so a NaN in K stays NaN (as in the reference) instead of becoming 0.
// The distance is summed from the differences, not from ‖b‖² + ‖a‖² − 2b·a, which cancels badly
// when b ≈ a; d_h is small (4–16), so the O(m·n·d) direct form costs little.
#include "common.cuh"

namespace cersa {
namespace {

constexpr int TILE = 16;     // a 16×16 block of outputs per 256 threads
constexpr int DCHUNK = 32;   // feature dimension staged in shared memory per step

struct Coeffs {
  float c[kSnellMaxHeads];
};

template <typename T>
__global__ void __launch_bounds__(TILE* TILE) snell_delta_kernel(Tensor3 A, Tensor3 B, Coeffs coeffs, int heads,
                                                                  float tau, Matrix out) {
  __shared__ float a_s[TILE][DCHUNK + 1];  // +1: the rows read by one warp fall in distinct banks
  __shared__ float b_s[TILE][DCHUNK + 1];
  const T* a = static_cast<const T*>(A.data);
  const T* b = static_cast<const T*>(B.data);
  const int64_t n = A.size[1], m = B.size[1], d = A.size[2];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * TILE, i0 = static_cast<int64_t>(blockIdx.y) * TILE;
  const int tid = threadIdx.y * TILE + threadIdx.x;

  float k_ij = 0.0f;
  for (int h = 0; h < heads; ++h) {
    float dist2 = 0.0f;
    for (int64_t d0 = 0; d0 < d; d0 += DCHUNK) {
      for (int t = tid; t < TILE * DCHUNK; t += TILE * TILE) {
        const int r = t / DCHUNK, c = t % DCHUNK;
        const int64_t dd = d0 + c;
        a_s[r][c] = (j0 + r < n && dd < d) ? to_f32(a[h * A.stride[0] + (j0 + r) * A.stride[1] + dd * A.stride[2]]) : 0.0f;
        b_s[r][c] = (i0 + r < m && dd < d) ? to_f32(b[h * B.stride[0] + (i0 + r) * B.stride[1] + dd * B.stride[2]]) : 0.0f;
      }
      __syncthreads();
      const int len = static_cast<int>(min(static_cast<int64_t>(DCHUNK), d - d0));
      for (int c = 0; c < len; ++c) {
        const float diff = b_s[threadIdx.y][c] - a_s[threadIdx.x][c];
        dist2 = __fadd_rn(dist2, __fmul_rn(diff, diff));  // _rn intrinsics: never fused into an fma
      }
      __syncthreads();
    }
    // each product and sum rounded on its own, sqrt correctly rounded: the reference's and the
    // Triton kernels' bits, so a threshold from any backend selects the same entries here
    k_ij = __fadd_rn(k_ij, __fmul_rn(coeffs.c[h], __fsqrt_rn(dist2)));
  }
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  if (i < m && j < n) {
    const float abs_k = fabsf(k_ij);
    const float mag = isinf(tau) && tau < 0.0f ? 1.0f : (abs_k > tau ? abs_k : 0.0f);
    static_cast<T*>(out.data)[i * out.stride_row + j * out.stride_col] = from_f32<T>(__fmul_rn(k_ij, mag));
  }
}

void check_tensor3(const char* name, const Tensor3& t, int64_t heads, int64_t dim, DType dtype) {
  if (t.size[0] != heads || t.size[2] != dim) {
    invalid(std::string(name) + " must have shape (H=" + std::to_string(heads) + ", rows, d=" + std::to_string(dim) +
            "), got (" + std::to_string(t.size[0]) + ", " + std::to_string(t.size[1]) + ", " +
            std::to_string(t.size[2]) + ")");
  }
  if (t.dtype != dtype) invalid(std::string(name) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
}

}  // namespace

void snell_delta(const Tensor3& A, const Tensor3& B, const float* coeffs, int heads, float tau, const Matrix& out,
                 cudaStream_t stream) {
  if (heads < 1 || heads > kSnellMaxHeads) {
    invalid("SNELL needs 1 to " + std::to_string(kSnellMaxHeads) + " heads, got " + std::to_string(heads));
  }
  check_tensor3("A", A, heads, A.size[2], A.dtype);
  check_tensor3("B", B, heads, A.size[2], A.dtype);
  const int64_t n = A.size[1], m = B.size[1];
  check_matrix("out", out, m, n, A.dtype);
  if (ceil_div(m, TILE) > 65535) invalid("SNELL: m=" + std::to_string(m) + " is above " + std::to_string(65535 * TILE));
  if (m == 0 || n == 0) return;
  check_device_pointer("out", out.data);
  if (A.size[2] > 0) {  // with d = 0 the factors hold no memory and K = 0
    check_device_pointer("A", A.data);
    check_device_pointer("B", B.data);
  }
  Coeffs c{};
  for (int h = 0; h < heads; ++h) c.c[h] = coeffs[h];
  const dim3 grid(static_cast<unsigned>(ceil_div(n, TILE)), static_cast<unsigned>(ceil_div(m, TILE)));
  dispatch(A.dtype, [&](auto tag) {
    using T = decltype(tag);
    snell_delta_kernel<T><<<grid, dim3(TILE, TILE), 0, stream>>>(A, B, c, heads, tau, out);
  });
  CERSA_CHECK_LAUNCH("snell_delta_kernel");
}

}  // namespace cersa
