// CERSA low-rank op (docs/methods.md §1) on tensor cores; mirrors cersa_kernels/triton/lowrank.py.
// Every product in the op is a skinny GEMM, so one tiled kernel serves them all: it takes any
// strides (transposes are free views, x may have a row stride), accumulates in fp32, adds the bias
// in its epilogue, and can split the reduction dimension over blocks into fp32 partials.
//   forward:  US = U·S (m×k, once per call), h = x·V (saved), y = h·USᵀ + b
//   backward: g = dy·U (once), dS = gᵀ·h (split over T), SVt = S·Vᵀ, dx = g·SVt (only if needed)
// bf16/fp16 run 128×128 output tiles (8 warps) on WMMA 16×16×16 tiles with fp32 accumulators; fp32
// runs 64×64 tiles of exact FMAs (tf32 tensor cores would miss the fp32 tolerance of the tests).
// Operand tiles stream through a STAGES-deep cp.async pipeline in 16-byte copies (cp.async.cg:
// global -> shared, bypassing L1 and the registers); a chunk that is ragged (past M, N or the
// slice's K end) or unaligned (no unit stride, a stride or base not on 16 bytes) is loaded element
// by element instead, with zeros outside the matrix.
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace cersa {
namespace {

using namespace nvcuda;

// Tile shapes per input type. Shared memory rows are padded by PAD elements (16 bytes): every row
// start and every WMMA tile start stays 32-byte aligned, every 16-byte chunk 16-byte aligned, and
// consecutive rows fall on staggered banks.
template <typename T>
struct Tile {  // bf16 / fp16: 8 warps in a 2×4 grid, each a 64×32 block of 4×2 WMMA tiles
  static constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, STAGES = 3, PAD = 8, MIN_BLOCKS = 1;
};
template <>
struct Tile<float> {  // fp32: 4 warps, each thread a 4×8 block of FMAs
  static constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128, STAGES = 3, PAD = 4, MIN_BLOCKS = 2;
};
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

// Shared memory layout of one pipeline stage. An operand tile is stored with the dimension that is
// contiguous in global memory innermost, so that 16-byte chunks copy straight across:
//   A row (k contiguous): [BM][BK + PAD]     A col (m contiguous): [BK][BM + PAD]
//   B row (n contiguous): [BK][BN + PAD]     B col (k contiguous): [BN][BK + PAD]
template <typename T>
struct Layout {
  using TL = Tile<T>;
  static constexpr int kA = std::max(TL::BM * (TL::BK + TL::PAD), TL::BK * (TL::BM + TL::PAD));
  static constexpr int kB = std::max(TL::BK * (TL::BN + TL::PAD), TL::BN * (TL::BK + TL::PAD));
  static constexpr int kStage = kA + kB;  // elements
  static constexpr size_t kPipelineBytes = sizeof(T) * TL::STAGES * static_cast<size_t>(kStage);
  static constexpr size_t kCBytes = sizeof(float) * TL::BM * static_cast<size_t>(TL::BN + PAD_C);
  static constexpr size_t kBytes = kPipelineBytes > kCBytes ? kPipelineBytes : kCBytes;
  static_assert((kA * sizeof(T)) % 32 == 0 && (kStage * sizeof(T)) % 32 == 0, "stage buffers 32-byte aligned");
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One operand of the GEMM as the loader sees it: element (o, i) of the logical OUTER × INNER tile
// space at g[o·s_outer + i·s_inner], valid for o < outer_end and i < inner_end.
template <typename T>
struct Source {
  const T* g;
  int64_t s_outer, s_inner, outer_end, inner_end;
  bool vec;  // s_inner == 1, s_outer and the base on 16 bytes: chunks may be copied whole
};

template <typename T>
__device__ Source<T> source(const T* g, int64_t s_outer, int64_t s_inner, int64_t outer_end, int64_t inner_end) {
  const bool vec = s_inner == 1 && (s_outer * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(g) % 16 == 0;
  return {g, s_outer, s_inner, outer_end, inner_end, vec};
}

// Stages the OUTER × INNER tile at (outer0, inner0) into dst (row length INNER + PAD): whole
// 16-byte chunks by cp.async, ragged or unaligned chunks element by element (zeros outside).
// inner0 is a multiple of the tile, so an aligned source's chunks start on 16 bytes.
template <typename T, int OUTER, int INNER, int PAD, int THREADS>
__device__ __forceinline__ void stage_tile(T* dst, const Source<T>& src, int64_t outer0, int64_t inner0) {
  constexpr int V = 16 / sizeof(T);  // elements per chunk
  constexpr int kChunksPerRow = INNER / V;
  constexpr int kChunks = OUTER * kChunksPerRow;
  static_assert(INNER % V == 0 && ((INNER + PAD) * sizeof(T)) % 16 == 0, "chunks stay 16-byte aligned");
  static_assert(kChunks % THREADS == 0, "every thread copies the same number of chunks");
  // The fallback moves raw bits (all-zero bits are +0 in every type): no conversion, no registers
  // spent on T arithmetic.
  using Bits = std::conditional_t<sizeof(T) == 2, unsigned short, unsigned>;
  const Bits* g = reinterpret_cast<const Bits*>(src.g);
#pragma unroll
  for (int it = 0; it < kChunks / THREADS; ++it) {
    const int c = it * THREADS + threadIdx.x;
    const int o = c / kChunksPerRow, i = (c % kChunksPerRow) * V;
    const int64_t go = outer0 + o, gi = inner0 + i;
    T* d = dst + o * (INNER + PAD) + i;
    if (src.vec && go < src.outer_end && gi + V <= src.inner_end) {
      cp_async_16(d, src.g + go * src.s_outer + gi);
    } else {  // the rare path: kept rolled, so that it costs the pipeline no registers
      Bits* db = reinterpret_cast<Bits*>(d);
#pragma unroll 1
      for (int e = 0; e < V; ++e) {
        db[e] = (go < src.outer_end && gi + e < src.inner_end) ? g[go * src.s_outer + (gi + e) * src.s_inner] : Bits{0};
      }
    }
  }
}

// 16-bit inputs: 8 warps in a 2×4 grid, each owns a 64×32 block of 4×2 WMMA tiles.
template <typename T, bool A_ROW, bool B_ROW>
struct Accumulator {
  using TL = Tile<T>;
  static constexpr int FM = 4, FN = 2, LDA = A_ROW ? TL::BK + TL::PAD : TL::BM + TL::PAD,
                       LDB = B_ROW ? TL::BN + TL::PAD : TL::BK + TL::PAD;
  using ALayout = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  static_assert(TL::THREADS == 256 && 2 * 16 * FM == TL::BM && 4 * 16 * FN == TL::BN, "warp grid covers the tile");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];

  __device__ void init() {
    for (auto& row : acc)
      for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  }
  __device__ void step(const T* a, const T* b) {
    const int warp = threadIdx.x / 32, wm = (warp / 4) * 16 * FM, wn = (warp % 4) * 16 * FN;
#pragma unroll
    for (int kk = 0; kk < TL::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm + 16 * i;
        wmma::load_matrix_sync(fa[i], A_ROW ? a + m * LDA + kk : a + kk * LDA + m, LDA);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn + 16 * j;
        wmma::load_matrix_sync(fb[j], B_ROW ? b + kk * LDB + n : b + n * LDB + kk, LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(float* c) const {
    const int warp = threadIdx.x / 32, wm = (warp / 4) * 16 * FM, wn = (warp % 4) * 16 * FN;
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(c + (wm + 16 * i) * (TL::BN + PAD_C) + wn + 16 * j, acc[i][j], TL::BN + PAD_C,
                                wmma::mem_row_major);
  }
};

// fp32: plain FMAs; thread t owns rows t/8 + 16·i (i < 4) and columns t%8 + 8·j (j < 8).
template <bool A_ROW, bool B_ROW>
struct Accumulator<float, A_ROW, B_ROW> {
  using TL = Tile<float>;
  static constexpr int LDA = A_ROW ? TL::BK + TL::PAD : TL::BM + TL::PAD,
                       LDB = B_ROW ? TL::BN + TL::PAD : TL::BK + TL::PAD;
  static_assert(TL::THREADS == 128 && TL::BM == 64 && TL::BN == 64, "thread grid covers the tile");
  float acc[4][8];

  __device__ void init() {
    for (auto& row : acc)
      for (float& v : row) v = 0.0f;
  }
  __device__ void step(const float* a, const float* b) {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < TL::BK; ++kk) {
      float av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = tr + 16 * i;
        av[i] = A_ROW ? a[m * LDA + kk] : a[kk * LDA + m];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = tc + 8 * j;
        bv[j] = B_ROW ? b[kk * LDB + n] : b[n * LDB + kk];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ void store(float* c) const {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) c[(tr + 16 * i) * (TL::BN + PAD_C) + tc + 8 * j] = acc[i][j];
  }
};

// C[z] = A[:, Kz] · B[Kz, :] (+ bias) for the z-th slice Kz of the reduction; T inputs, TC output.
// A_ROW: A is staged k-innermost (its k stride is 1, or neither stride is); else m-innermost.
// B_ROW: B is staged n-innermost (its n stride is 1, or its k stride is not); else k-innermost.
template <typename T, typename TC, bool A_ROW, bool B_ROW>
__global__ void __launch_bounds__(Tile<T>::THREADS, Tile<T>::MIN_BLOCKS) gemm_kernel(GemmArgs p) {
  using TL = Tile<T>;
  using L = Layout<T>;
  constexpr int BM = TL::BM, BN = TL::BN, BK = TL::BK, STAGES = TL::STAGES, THREADS = TL::THREADS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  float* c_tile = reinterpret_cast<float*>(smem);  // reuses the pipeline after the main loop

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = min(p.K, k_begin + p.k_per_split);
  const int64_t steps = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  const Source<T> a_src = A_ROW ? source(A, p.sam, p.sak, p.M, k_end) : source(A, p.sak, p.sam, k_end, p.M);
  const Source<T> b_src = B_ROW ? source(B, p.sbk, p.sbn, k_end, p.N) : source(B, p.sbn, p.sbk, p.N, k_end);

  auto stage = [&](int64_t s, int64_t k0) {
    T* a = stages + (s % STAGES) * L::kStage;
    T* b = a + L::kA;
    if (A_ROW) {
      stage_tile<T, BM, BK, TL::PAD, THREADS>(a, a_src, m0, k0);
    } else {
      stage_tile<T, BK, BM, TL::PAD, THREADS>(a, a_src, k0, m0);
    }
    if (B_ROW) {
      stage_tile<T, BK, BN, TL::PAD, THREADS>(b, b_src, k0, n0);
    } else {
      stage_tile<T, BN, BK, TL::PAD, THREADS>(b, b_src, n0, k0);
    }
  };

  Accumulator<T, A_ROW, B_ROW> acc;
  acc.init();
  // Prologue: STAGES - 1 slices in flight (one commit group each, empty past the end).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) stage(s, k_begin + s * BK);
    cp_async_commit();
  }
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of slice `step` have landed ...
    __syncthreads();              // ... and everyone's; every warp is also done with slice step - 1
    const int64_t next = step + STAGES - 1;  // refills the buffer slice step - 1 used
    if (next < steps) stage(next, k_begin + next * BK);
    cp_async_commit();
    const T* a = stages + (step % STAGES) * L::kStage;
    acc.step(a, a + L::kA);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are free for the C tile
  acc.store(c_tile);
  __syncthreads();

  TC* C = static_cast<TC*>(p.c) + static_cast<int64_t>(blockIdx.z) * p.scs;
  const bool c_m_fast = p.scn != 1 && p.scm == 1;
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int r = c_m_fast ? i % BM : i / BN, c = c_m_fast ? i / BM : i % BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm < p.M && gn < p.N) {
      float v = c_tile[r * (BN + PAD_C) + c];
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

template <typename T, typename TC, bool A_ROW, bool B_ROW>
void launch_gemm(const GemmArgs& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = Layout<T>::kBytes;
  auto kernel = gemm_kernel<T, TC, A_ROW, B_ROW>;
  if (bytes > 48 * 1024) {  // beyond the default per-block limit: opt in (sm_80: 163 KB, sm_90: 227 KB)
    CERSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  kernel<<<grid, Tile<T>::THREADS, bytes, stream>>>(p);
  CERSA_CHECK_LAUNCH("gemm_kernel");
}

// c (M×N) = a (M×K) · b (K×N) (+ bias); with splits > 1, c is `splits` contiguous fp32 slices.
template <typename T, typename TC>
void gemm(const View& a, const View& b, const View& c, const Matrix* bias, cudaStream_t stream, int64_t splits = 1,
          int64_t k_per_split = 0) {
  using TL = Tile<T>;
  const int64_t M = a.rows, N = b.cols, K = a.cols;
  if (M == 0 || N == 0) return;
  const int64_t grid_y = ceil_div(N, TL::BN);
  if (grid_y > kMaxGridYZ || splits > kMaxGridYZ) {
    invalid("GEMM too large for one launch: N=" + std::to_string(N) + " (at most " +
            std::to_string(kMaxGridYZ * TL::BN) + ")");
  }
  GemmArgs p{a.data, a.sr, a.sc, b.data, b.sr, b.sc, c.data, M * N, c.sr, c.sc,
             bias ? bias->data : nullptr, bias ? bias->stride_col : 0, M, N, K,
             splits > 1 ? k_per_split : std::max<int64_t>(K, 1)};
  dim3 grid(static_cast<unsigned>(ceil_div(M, TL::BM)), static_cast<unsigned>(grid_y), static_cast<unsigned>(splits));
  // Stage each operand with its unit-stride dimension innermost (x row-major; gᵀ, Vᵀ, USᵀ column-major).
  const bool a_row = a.sc == 1 || a.sr != 1;
  const bool b_row = b.sc == 1 || b.sr != 1;
  if (a_row && b_row) launch_gemm<T, TC, true, true>(p, grid, stream);
  else if (a_row) launch_gemm<T, TC, true, false>(p, grid, stream);
  else if (b_row) launch_gemm<T, TC, false, true>(p, grid, stream);
  else launch_gemm<T, TC, false, false>(p, grid, stream);
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
template <typename Elem>
int64_t ds_splits(int64_t T, int64_t k, int64_t* rows_per_split) {
  constexpr int BM = Tile<Elem>::BM, BN = Tile<Elem>::BN, BK = Tile<Elem>::BK;
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
  p.splits = s.dt == DType::f32 ? ds_splits<float>(s.T, s.k, &p.rows_per_split)
                                 : ds_splits<__half>(s.T, s.k, &p.rows_per_split);  // bf16 tiles are fp16's
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
