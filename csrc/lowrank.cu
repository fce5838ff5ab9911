// CERSA low-rank op (docs/methods.md §1) on tensor cores; mirrors cersa_kernels/triton/lowrank.py.
// Every product in the op is a skinny GEMM, so one tiled kernel serves them all: it takes any
// strides (transposes are free views, x may have a row stride), accumulates in fp32, adds the bias
// in its epilogue, and can split the reduction dimension over blocks into fp32 partials.
//   forward:  US = U·S (m×k, once per call), h = x·V (saved), y = h·USᵀ + b
//   backward: g = dy·U (once), dS = gᵀ·h (split over T), SVt = S·Vᵀ, dx = g·SVt (only if needed)
// bf16/fp16 run on WMMA 16×16×16 tiles with fp32 accumulators; fp32 runs exact FMAs (tf32 tensor
// cores would miss the fp32 tolerance of the tests).
#include <mma.h>

#include <algorithm>

#include "common.cuh"

namespace cersa {
namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;  // 4 warps, one 64×64 output tile per block
constexpr int PAD_AB = 8;  // keeps every WMMA tile start 32-byte aligned and staggers smem banks
constexpr int PAD_C = 4;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMinRowsPerSplit = 256;  // dS: below this a split costs more than it hides

// A 2-D strided view; strides in elements.
struct View {
  void* data;
  int64_t rows, cols, sr, sc;
};
View view(const Matrix& t) { return {t.data, t.rows, t.cols, t.stride_row, t.stride_col}; }
View transposed(const View& v) { return {v.data, v.cols, v.rows, v.sc, v.sr}; }
View contiguous(void* data, int64_t rows, int64_t cols) { return {data, rows, cols, cols, 1}; }

struct GemmArgs {
  const void* a; int64_t sam, sak;         // A (M×K)
  const void* b; int64_t sbk, sbn;         // B (K×N)
  void* c; int64_t scs, scm, scn;          // C[split] (M×N)
  const void* bias; int64_t sbias;         // (N,) in A's dtype, or nullptr
  int64_t M, N, K, k_per_split;
};

template <typename T>
struct Tiles {
  T a[BM][BK + PAD_AB];
  T b[BK][BN + PAD_AB];
};
using CTile = float[BN + PAD_C];

// 16-bit inputs: the 4 warps form a 2×2 grid, each owns a 32×32 block of 2×2 WMMA tiles.
template <typename T>
struct Accumulator {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ void init() {
    for (auto& row : acc)
      for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  }
  __device__ void step(const Tiles<T>& t) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &t.a[wm + 16 * i][kk], BK + PAD_AB);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &t.b[kk][wn + 16 * j], BN + PAD_AB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(CTile* c) const {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&c[wm + 16 * i][wn + 16 * j], acc[i][j], BN + PAD_C, wmma::mem_row_major);
  }
};

// fp32: plain FMAs; thread t owns rows t/8 + 16·i (i < 4) and columns t%8 + 8·j (j < 8).
template <>
struct Accumulator<float> {
  float acc[4][8];

  __device__ void init() {
    for (auto& row : acc)
      for (float& v : row) v = 0.0f;
  }
  __device__ void step(const Tiles<float>& t) {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = t.a[tr + 16 * i][kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = t.b[kk][tc + 8 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(CTile* c) const {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) c[tr + 16 * i][tc + 8 * j] = acc[i][j];
  }
};

// C[z] = A[:, Kz] · B[Kz, :] (+ bias) for the z-th slice Kz of the reduction; T inputs, TC output.
template <typename T, typename TC>
__global__ void __launch_bounds__(THREADS) gemm_kernel(GemmArgs p) {
  constexpr size_t kTileBytes = sizeof(Tiles<T>), kCBytes = sizeof(float) * BM * (BN + PAD_C);
  __shared__ __align__(128) unsigned char smem[kTileBytes > kCBytes ? kTileBytes : kCBytes];
  Tiles<T>& tiles = *reinterpret_cast<Tiles<T>*>(smem);
  CTile* c_tile = reinterpret_cast<CTile*>(smem);  // reuses the operand tiles after the main loop

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = min(p.K, k_begin + p.k_per_split);
  // Element order of the staging loops: consecutive threads read consecutive addresses whichever
  // stride is the unit one (x row-major, gᵀ and Vᵀ column-major).
  const bool a_k_fast = p.sak == 1;
  const bool b_k_fast = p.sbn != 1 && p.sbk == 1;
  const T zero = from_f32<T>(0.0f);

  Accumulator<T> acc;
  acc.init();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
      const int r = a_k_fast ? i / BK : i % BM, c = a_k_fast ? i % BK : i / BM;
      const int64_t gm = m0 + r, gk = k0 + c;
      tiles.a[r][c] = (gm < p.M && gk < k_end) ? A[gm * p.sam + gk * p.sak] : zero;
    }
    for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
      const int r = b_k_fast ? i % BK : i / BN, c = b_k_fast ? i / BK : i % BN;
      const int64_t gk = k0 + r, gn = n0 + c;
      tiles.b[r][c] = (gk < k_end && gn < p.N) ? B[gk * p.sbk + gn * p.sbn] : zero;
    }
    __syncthreads();
    acc.step(tiles);
    __syncthreads();  // every warp is done with the tiles before they are overwritten
  }
  acc.store(c_tile);
  __syncthreads();

  TC* C = static_cast<TC*>(p.c) + static_cast<int64_t>(blockIdx.z) * p.scs;
  const bool c_m_fast = p.scn != 1 && p.scm == 1;
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int r = c_m_fast ? i % BM : i / BN, c = c_m_fast ? i / BM : i % BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm < p.M && gn < p.N) {
      float v = c_tile[r][c];
      if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[gn * p.sbias]);
      C[gm * p.scm + gn * p.scn] = from_f32<TC>(v);
    }
  }
}

// out (M×N, strided) = Σ_z partials[z] (contiguous fp32 slices).
template <typename TC>
__global__ void sum_splits_kernel(const float* partials, int64_t splits, int64_t M, int64_t N, TC* out, int64_t som,
                                  int64_t son) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t z = 0; z < splits; ++z) s += partials[z * total + i];
    out[(i / N) * som + (i % N) * son] = from_f32<TC>(s);
  }
}

// dst (contiguous) = src (strided) cast to TD: S kept in fp32 is cast to x's dtype, as the reference does.
template <typename TS, typename TD>
__global__ void cast_kernel(const TS* src, int64_t rows, int64_t cols, int64_t sr, int64_t sc, TD* dst) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_f32<TD>(to_f32(src[(i / cols) * sr + (i % cols) * sc]));
  }
}

int elementwise_blocks(int64_t total) { return static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 4096)); }

// c (M×N) = a (M×K) · b (K×N) (+ bias); with splits > 1, c is `splits` contiguous fp32 slices.
template <typename T, typename TC>
void gemm(const View& a, const View& b, const View& c, const Matrix* bias, cudaStream_t stream, int64_t splits = 1,
          int64_t k_per_split = 0) {
  const int64_t M = a.rows, N = b.cols, K = a.cols;
  if (M == 0 || N == 0) return;
  const int64_t grid_y = ceil_div(N, BN);
  if (grid_y > kMaxGridYZ || splits > kMaxGridYZ) {
    invalid("GEMM too large for one launch: N=" + std::to_string(N) + " (at most " +
            std::to_string(kMaxGridYZ * BN) + ")");
  }
  GemmArgs p{a.data, a.sr, a.sc, b.data, b.sr, b.sc, c.data, M * N, c.sr, c.sc,
             bias ? bias->data : nullptr, bias ? bias->stride_col : 0, M, N, K,
             splits > 1 ? k_per_split : std::max<int64_t>(K, 1)};
  dim3 grid(static_cast<unsigned>(ceil_div(M, BM)), static_cast<unsigned>(grid_y), static_cast<unsigned>(splits));
  gemm_kernel<T, TC><<<grid, THREADS, 0, stream>>>(p);
  CERSA_CHECK_LAUNCH("gemm_kernel");
}

// S is cast only when it is kept in fp32 beside 16-bit activations (check_s allows nothing else).
template <typename TD>
void cast_into(const Matrix& src, void* dst, cudaStream_t stream) {
  const int64_t total = src.rows * src.cols;
  if (total == 0) return;
  cast_kernel<float, TD><<<elementwise_blocks(total), 256, 0, stream>>>(
      static_cast<const float*>(src.data), src.rows, src.cols, src.stride_row, src.stride_col, static_cast<TD*>(dst));
  CERSA_CHECK_LAUNCH("cast_kernel");
}

// Carves the caller's workspace into 256-byte aligned pieces; with a null base it only counts bytes.
struct Workspace {
  char* base;
  size_t used = 0;
  void* take(size_t bytes) {
    void* p = base ? base + used : nullptr;
    used += (bytes + 255) / 256 * 256;
    return p;
  }
};

size_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

// Number of T-slices for dS = gᵀh: enough blocks to fill the GPU twice, at least 256 rows each.
int64_t ds_splits(int64_t T, int64_t k, int64_t* rows_per_split) {
  int device = 0, sms = 0;
  CERSA_CUDA_CHECK(cudaGetDevice(&device));
  CERSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tiles = ceil_div(k, BM) * ceil_div(k, BN);
  const int64_t rows = std::max<int64_t>(T, 1);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(2 * sms / tiles, ceil_div(rows, kMinRowsPerSplit)));
  *rows_per_split = ceil_div(ceil_div(rows, splits), BK) * BK;  // whole BK steps per slice
  return ceil_div(rows, *rows_per_split);
}

struct FwdShapes {
  int64_t T, n, m, k;
  DType dt;
};

void check_s(const Matrix& S, int64_t k, DType dt) {
  check_matrix("S", S, k, k, S.dtype);
  if (S.dtype != dt && S.dtype != DType::f32) {
    invalid(std::string("S must be ") + dtype_name(dt) + " (x's dtype) or float32, got " + dtype_name(S.dtype));
  }
}

FwdShapes check_fwd(const Matrix& x, const Matrix& V, const Matrix& S, const Matrix& U) {
  const FwdShapes s{x.rows, x.cols, U.rows, V.cols, x.dtype};
  check_matrix("V", V, s.n, s.k, s.dt);
  check_matrix("U", U, s.m, s.k, s.dt);
  check_s(S, s.k, s.dt);
  return s;
}

struct FwdPlan {
  void* s_cast;  // S in x's dtype, when S is kept in fp32
  void* us;      // U·S (m×k)
};

FwdPlan plan_fwd(const FwdShapes& s, DType s_dtype, Workspace& ws) {
  FwdPlan p{};
  if (s_dtype != s.dt) p.s_cast = ws.take(s.k * s.k * dtype_size(s.dt));
  p.us = ws.take(s.m * s.k * dtype_size(s.dt));
  return p;
}

struct BwdPlan {
  void* g;         // dy·U (T×k)
  void* s_cast;    // S in dy's dtype, when needed
  void* svt;       // S·Vᵀ (k×n), when dx is needed
  void* partials;  // split-T fp32 slices of dS
  int64_t splits, rows_per_split;
};

BwdPlan plan_bwd(const FwdShapes& s, DType s_dtype, bool need_dx, Workspace& ws) {
  BwdPlan p{};
  p.splits = ds_splits(s.T, s.k, &p.rows_per_split);
  p.g = ws.take(s.T * s.k * dtype_size(s.dt));
  if (need_dx && s_dtype != s.dt) p.s_cast = ws.take(s.k * s.k * dtype_size(s.dt));
  if (need_dx) p.svt = ws.take(s.k * s.n * dtype_size(s.dt));
  if (p.splits > 1) p.partials = ws.take(p.splits * s.k * s.k * sizeof(float));
  return p;
}

FwdShapes check_bwd(const Matrix& dy, const Matrix& h, const Matrix& V, const Matrix& S, const Matrix& U) {
  const FwdShapes s{dy.rows, V.rows, dy.cols, V.cols, dy.dtype};
  check_matrix("h", h, s.T, s.k, s.dt);
  check_matrix("U", U, s.m, s.k, s.dt);
  check_matrix("V", V, s.n, s.k, s.dt);
  check_s(S, s.k, s.dt);
  return s;
}

void check_workspace(size_t given, size_t needed) {
  if (given < needed) {
    invalid("workspace too small: need " + std::to_string(needed) + " bytes, got " + std::to_string(given));
  }
}

}  // namespace

size_t lowrank_fwd_workspace_bytes(const Matrix& x, const Matrix& V, const Matrix& S, const Matrix& U) {
  Workspace ws{nullptr};
  plan_fwd(check_fwd(x, V, S, U), S.dtype, ws);
  return ws.used;
}

void lowrank_fwd(const Matrix& x, const Matrix& V, const Matrix& S, const Matrix& U, const Matrix* bias,
                 const Matrix& y, const Matrix& h, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const FwdShapes s = check_fwd(x, V, S, U);
  if (bias) check_matrix("bias", *bias, 1, s.m, s.dt);
  check_matrix("y", y, s.T, s.m, s.dt);
  check_matrix("h", h, s.T, s.k, s.dt);
  const size_t need = lowrank_fwd_workspace_bytes(x, V, S, U);
  check_workspace(workspace_bytes, need);
  check_device_matrix("x", x);
  check_device_matrix("V", V);
  check_device_matrix("S", S);
  check_device_matrix("U", U);
  check_device_matrix("y", y);
  check_device_matrix("h", h);
  if (bias) check_device_matrix("bias", *bias);
  if (need > 0) check_device_pointer("workspace", workspace);

  dispatch(s.dt, [&](auto tag) {
    using T = decltype(tag);
    Workspace ws{static_cast<char*>(workspace)};
    const FwdPlan plan = plan_fwd(s, S.dtype, ws);
    View s_mat = view(S);
    if (plan.s_cast) {
      cast_into<T>(S, plan.s_cast, stream);
      s_mat = contiguous(plan.s_cast, s.k, s.k);
    }
    const View us = contiguous(plan.us, s.m, s.k);
    gemm<T, T>(view(U), s_mat, us, nullptr, stream);
    gemm<T, T>(view(x), view(V), view(h), nullptr, stream);
    gemm<T, T>(view(h), transposed(us), view(y), bias, stream);
  });
}

size_t lowrank_bwd_workspace_bytes(const Matrix& dy, const Matrix& h, const Matrix& V, const Matrix& S,
                                   const Matrix& U, bool need_dx) {
  Workspace ws{nullptr};
  plan_bwd(check_bwd(dy, h, V, S, U), S.dtype, need_dx, ws);
  return ws.used;
}

void lowrank_bwd(const Matrix& dy, const Matrix& h, const Matrix& V, const Matrix& S, const Matrix& U,
                 const Matrix* dx, const Matrix& dS, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const FwdShapes s = check_bwd(dy, h, V, S, U);
  if (dx) check_matrix("dx", *dx, s.T, s.n, s.dt);
  check_matrix("dS", dS, s.k, s.k, S.dtype);
  const size_t need = lowrank_bwd_workspace_bytes(dy, h, V, S, U, dx != nullptr);
  check_workspace(workspace_bytes, need);
  check_device_matrix("dy", dy);
  check_device_matrix("h", h);
  check_device_matrix("V", V);
  check_device_matrix("S", S);
  check_device_matrix("U", U);
  check_device_matrix("dS", dS);
  if (dx) check_device_matrix("dx", *dx);
  if (need > 0) check_device_pointer("workspace", workspace);

  dispatch(s.dt, [&](auto tag) {
    using T = decltype(tag);
    Workspace ws{static_cast<char*>(workspace)};
    const BwdPlan plan = plan_bwd(s, S.dtype, dx != nullptr, ws);
    const View g = contiguous(plan.g, s.T, s.k);
    gemm<T, T>(view(dy), view(U), g, nullptr, stream);

    // dS = gᵀ·h in S's dtype; the reduction over T is split so that small k still fills the GPU.
    auto ds = [&](auto out_tag) {
      using TC = decltype(out_tag);
      if (plan.splits == 1) {
        gemm<T, TC>(transposed(g), view(h), view(dS), nullptr, stream);
        return;
      }
      gemm<T, float>(transposed(g), view(h), contiguous(plan.partials, s.k, s.k), nullptr, stream, plan.splits,
                     plan.rows_per_split);
      const int64_t total = s.k * s.k;
      sum_splits_kernel<TC><<<elementwise_blocks(total), 256, 0, stream>>>(
          static_cast<const float*>(plan.partials), plan.splits, s.k, s.k, static_cast<TC*>(dS.data), dS.stride_row,
          dS.stride_col);
      CERSA_CHECK_LAUNCH("sum_splits_kernel");
    };
    if (S.dtype == DType::f32) {
      ds(float{});
    } else {
      ds(T{});
    }

    if (dx) {
      View s_mat = view(S);
      if (plan.s_cast) {
        cast_into<T>(S, plan.s_cast, stream);
        s_mat = contiguous(plan.s_cast, s.k, s.k);
      }
      const View svt = contiguous(plan.svt, s.k, s.n);
      gemm<T, T>(s_mat, transposed(view(V)), svt, nullptr, stream);
      gemm<T, T>(g, svt, view(*dx), nullptr, stream);
    }
  });
}

}  // namespace cersa
