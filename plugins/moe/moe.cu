// moe.cu: the dsmoe::moe kernels (token alignment, grouped SwiGLU GEMM, grouped down GEMM, combine).
//
//   x [T,H], weights [T,K] fp32, ids [T,K] int32, w13 [E,2I,H] (gate rows, then up rows),
//   w2 [E,H,I]  ->  y [T,H] in x's dtype.   P = T·K (token, slot) pairs, pair id = t·K + k.
//
// Launch path (numbered as in plugins/moe/launch.py; 1 validates and plans, 2 carves the workspace):
//   3. moe_align          one CTA: per-expert counts, offsets padded to BM rows, block -> expert,
//                         sorted_pair (pair ids grouped by expert, -1 in padding rows)
//   4. moe_gemm1_*        grid (MB, ceil(I / (BN/2))): act[row] = silu(x·w13[e][:I]ᵀ) ⊙ x·w13[e][I:]ᵀ
//                         (gate and up tiles of the same output columns sit in one CTA, so SwiGLU
//                         is fused into the epilogue and only act [rows, I] reaches memory)
//   5. moe_gemm2_*        grid (MB, ceil(H / BN)): out = weight[pair] · act[row]·w2[e]ᵀ (fp32),
//                         stored per pair (reduce) or atomically added into y32[t] (atomic,
//                         zeroed by the launcher first)
//   6. moe_combine_* / moe_cast_*   y[t] = Σ_k out[t·K+k] in fp32 (reduce) or y = y32 (atomic)
//
// Workspace (one byte buffer, each region 256-byte aligned; MB = max row blocks, see launch.py):
//   +-----------------+------------------+----------------------+--------------------+------------------+
//   | offsets [E+1]   | block_expert [MB]| sorted_pair [MB·BM]  | act [MB·BM, I]     | out [P,H] fp32   |
//   | int32 (padded)  | int32, -1 unused | int32, -1 = padding  | x dtype            | or y32 [T,H] fp32|
//   +-----------------+------------------+----------------------+--------------------+------------------+
//
// Tile configurations (tensor cores, mma.sync m16n8k16, bf16/fp16 in, fp32 accumulate):
//   dec  BM 16, BN 64,  BK 64, 4 warps (1x4), 4 stages: decode, T·K small. An expert with <= 16
//        pairs is one row block, so each weight byte is read once; the grid splits 2I (or H) into
//        64-row tiles so that all SMs stream weights.
//   pre  BM 64, BN 128, BK 32, 4 warps (2x2), 3 stages: prefill.
// The SIMT kernels (moe_simt_*) cover fp32 and shapes with H or I not a multiple of 8.
#include "dsmoe_common.cuh"

namespace dsmoe {

struct __align__(8) float2_ { float x, y; };

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned long long a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (unsigned)a;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T> struct Mma;
template <> struct Mma<bf16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<f16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ---------------------------------------------------------------- 3. alignment (one CTA)
__device__ __forceinline__ void align_body(const int* __restrict__ ids, int P, int E, int BM,
                                           int MB, int* __restrict__ offsets,
                                           int* __restrict__ block_expert,
                                           int* __restrict__ sorted_pair) {
  extern __shared__ int sh[];
  int* cnt = sh;      // [E]   counts, then scatter cursors
  int* off = sh + E;  // [E+1] padded offsets
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int e = tid; e < E; e += nt) cnt[e] = 0;
  for (int p = tid; p < MB * BM; p += nt) sorted_pair[p] = -1;
  __syncthreads();
  for (int i = tid; i < P; i += nt) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);  // ids outside [0,E) contribute nothing
  }
  __syncthreads();
  if (tid == 0) {
    off[0] = 0;
    for (int e = 0; e < E; ++e) off[e + 1] = off[e] + (cnt[e] + BM - 1) / BM * BM;
  }
  __syncthreads();
  for (int e = tid; e <= E; e += nt) offsets[e] = off[e];
  for (int e = tid; e < E; e += nt) cnt[e] = off[e];
  for (int b = tid; b < MB; b += nt) {
    const int r = b * BM;
    int lo = 0, hi = E + 1;  // upper_bound(off, r) - 1
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (off[mid] <= r) lo = mid + 1; else hi = mid;
    }
    block_expert[b] = r < off[E] ? lo - 1 : -1;
  }
  __syncthreads();
  for (int i = tid; i < P; i += nt) {
    const int e = ids[i];
    if (e >= 0 && e < E) sorted_pair[atomicAdd(&cnt[e], 1)] = i;
  }
}

// ---------------------------------------------------------------- 4./5. tensor-core grouped GEMM
// C[row, n] = Σ_k A[row, k] · B[e][n, k]  (B rows are output columns, k contiguous: the "col"
// operand of mma.sync). GATED: A rows gathered from x by token, B = w13[e], epilogue SwiGLU ->
// act. Otherwise A = act (sorted rows), B = w2[e], epilogue · routing weight -> out / y32.
template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool GATED, bool ATOMIC>
__device__ __forceinline__ void gemm_tc_body(
    const T* __restrict__ A, const T* __restrict__ W, const int* __restrict__ sorted_pair,
    const int* __restrict__ block_expert, const float* __restrict__ route_w, T* __restrict__ act,
    float* __restrict__ out, int topk, int H, int I) {
  constexpr int WARPS_N = BN / WN, NT = (BM / WM) * WARPS_N * 32;
  constexpr int LDS = BK + 8;  // padded row: ldmatrix rows fall in distinct banks
  constexpr int CPR = BK / 8, A_CH = BM * CPR, B_CH = BN * CPR;
  constexpr int A_IT = (A_CH + NT - 1) / NT, B_IT = (B_CH + NT - 1) / NT;
  constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(WN % 16 == 0 && WM % 16 == 0 && BK % 16 == 0, "tile shape");
  __shared__ __align__(128) T As[STAGES][BM * LDS];
  __shared__ __align__(128) T Bs[STAGES][BN * LDS];

  const int e = block_expert[blockIdx.x];
  if (e < 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int row0 = blockIdx.x * BM;
  const int Kd = GATED ? H : I;              // reduction length
  const int Nrows = GATED ? 2 * I : H;       // rows of B per expert
  const T* Be = W + (long long)e * Nrows * Kd;

  // Per-thread copy assignments, fixed for every k tile.
  const T* a_src[A_IT]; int a_sm[A_IT]; bool a_ok[A_IT];
#pragma unroll
  for (int i = 0; i < A_IT; ++i) {
    const int c = tid + i * NT, r = c / CPR;
    a_sm[i] = c < A_CH ? r * LDS + (c % CPR) * 8 : -1;
    const int p = row0 + (c < A_CH ? r : 0);
    const int pair = sorted_pair[p];
    a_ok[i] = c < A_CH && pair >= 0;
    const long long arow = GATED ? (pair >= 0 ? pair / topk : 0) : p;
    a_src[i] = A + arow * Kd + (c % CPR) * 8;
  }
  const T* b_src[B_IT]; int b_sm[B_IT]; bool b_ok[B_IT];
#pragma unroll
  for (int i = 0; i < B_IT; ++i) {
    const int c = tid + i * NT, s = c / CPR;
    b_sm[i] = c < B_CH ? s * LDS + (c % CPR) * 8 : -1;
    int grow, valid;
    if (GATED) {  // smem rows of warp column wn: WN/2 gate rows, then the WN/2 up rows
      const int r = s % WN, col = blockIdx.y * (BN / 2) + (s / WN) * (WN / 2) + r % (WN / 2);
      valid = col < I;
      grow = (r / (WN / 2)) * I + col;
    } else {
      grow = blockIdx.y * BN + s;
      valid = grow < H;
    }
    b_ok[i] = c < B_CH && valid;
    b_src[i] = Be + (long long)(valid ? grow : 0) * Kd + (c % CPR) * 8;
  }
  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < A_IT; ++i) {
      if (a_sm[i] < 0) continue;
      const bool ok = a_ok[i] && k0 + (a_sm[i] % LDS) < Kd;
      cp_async16(smem_u32(&As[stage][a_sm[i]]), ok ? a_src[i] + k0 : A, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < B_IT; ++i) {
      if (b_sm[i] < 0) continue;
      const bool ok = b_ok[i] && k0 + (b_sm[i] % LDS) < Kd;
      cp_async16(smem_u32(&Bs[stage][b_sm[i]]), ok ? b_src[i] + k0 : W, ok ? 16 : 0);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

  // Multistage cp.async pipeline: STAGES-1 tiles in flight while one is multiplied.
  const int nk = (Kd + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pf = kt + STAGES - 1;
    if (pf < nk) load_tile(pf % STAGES, pf);
    cp_async_commit();
    const T* as = As[kt % STAGES];
    const T* bs = Bs[kt % STAGES];
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], smem_u32(as + (wm * WM + mi * 16 + (lane & 15)) * LDS + kk * 16 +
                                     (lane >> 4) * 8));
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        unsigned r[4];
        ldmatrix_x4(r, smem_u32(bs + (wn * WN + nj * 16 + (lane & 7) + (lane >> 4) * 8) * LDS +
                                kk * 16 + ((lane >> 3) & 1) * 8));
        bf[2 * nj][0] = r[0]; bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2]; bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator (mi, ni, j): row wm·WM + mi·16 + lane/4 + 8·(j/2),
  //                                   col wn·WN + ni·8 + 2·(lane%4) + j%2.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = row0 + wm * WM + mi * 16 + (lane >> 2) + h * 8;
      if (GATED) {
#pragma unroll
        for (int ni = 0; ni < NI / 2; ++ni) {
          const int col = blockIdx.y * (BN / 2) + wn * (WN / 2) + ni * 8 + (lane & 3) * 2;
          if (col >= I) continue;
          const float* g = &acc[mi][ni][2 * h];
          const float* u = &acc[mi][ni + NI / 2][2 * h];
          act[(long long)p * I + col] = from_float<T>(silu(g[0]) * u[0]);
          act[(long long)p * I + col + 1] = from_float<T>(silu(g[1]) * u[1]);
        }
      } else {
        const int pair = sorted_pair[p];
        if (pair < 0) continue;
        const float rw = route_w[pair];
        const long long orow = ATOMIC ? pair / topk : pair;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int col = blockIdx.y * BN + wn * WN + ni * 8 + (lane & 3) * 2;
          if (col >= H) continue;
          const float v0 = acc[mi][ni][2 * h] * rw, v1 = acc[mi][ni][2 * h + 1] * rw;
          if (ATOMIC) {
            atomicAdd(out + orow * H + col, v0);
            atomicAdd(out + orow * H + col + 1, v1);
          } else {
            float2_ v; v.x = v0; v.y = v1;
            *reinterpret_cast<float2_*>(out + orow * H + col) = v;
          }
        }
      }
    }
}

// ---------------------------------------------------------------- SIMT grouped GEMM (fp32, any shape)
// 16x16 threads; a CTA owns one 16-row block (BM = 16) and 16 output columns.
template <typename T, bool GATED, bool ATOMIC>
__device__ __forceinline__ void gemm_simt_body(
    const T* __restrict__ A, const T* __restrict__ W, const int* __restrict__ sorted_pair,
    const int* __restrict__ block_expert, const float* __restrict__ route_w, T* __restrict__ act,
    float* __restrict__ out, int topk, int H, int I) {
  __shared__ float As[16][17], Bg[16][17], Bu[16][17];
  const int e = block_expert[blockIdx.x];
  if (e < 0) return;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int Kd = GATED ? H : I, Nout = GATED ? I : H, Nrows = GATED ? 2 * I : H;
  const int p = blockIdx.x * 16 + ty;
  const int pair = sorted_pair[p];
  const T* arow = A + (GATED ? (long long)(pair >= 0 ? pair / topk : 0) : (long long)p) * Kd;
  const int brow = blockIdx.y * 16 + ty;  // output column this thread loads
  const T* Be = W + (long long)e * Nrows * Kd;
  const int n = blockIdx.y * 16 + tx;     // output column this thread computes
  float g = 0.f, u = 0.f;
  for (int k0 = 0; k0 < Kd; k0 += 16) {
    const int k = k0 + tx;
    As[ty][tx] = (pair >= 0 && k < Kd) ? to_float(arow[k]) : 0.f;
    Bg[ty][tx] = (brow < Nout && k < Kd) ? to_float(Be[(long long)brow * Kd + k]) : 0.f;
    if (GATED) Bu[ty][tx] = (brow < Nout && k < Kd) ? to_float(Be[(long long)(I + brow) * Kd + k]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      g += As[ty][kk] * Bg[tx][kk];
      if (GATED) u += As[ty][kk] * Bu[tx][kk];
    }
    __syncthreads();
  }
  if (n >= Nout) return;
  if (GATED) {
    act[(long long)p * I + n] = from_float<T>(silu(g) * u);
  } else if (pair >= 0) {
    const float v = g * route_w[pair];
    if (ATOMIC) atomicAdd(out + (long long)(pair / topk) * H + n, v);
    else out[(long long)pair * H + n] = v;
  }
}

// ---------------------------------------------------------------- 6. combine over K / cast
template <typename T>
__device__ __forceinline__ void combine_body(const float* __restrict__ out, const int* __restrict__ ids,
                                             T* __restrict__ y, int T_, int K, int H, int E) {
  const long long n = (long long)T_ * H;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long t = i / H, h = i % H;
    float s = 0.f;
    for (int k = 0; k < K; ++k) {
      const int e = ids[t * K + k];
      if (e >= 0 && e < E) s += out[(t * K + k) * H + h];
    }
    y[i] = from_float<T>(s);
  }
}

template <typename T>
__device__ __forceinline__ void cast_body(const float* __restrict__ y32, T* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = from_float<T>(y32[i]);
}

}  // namespace dsmoe

// ---------------------------------------------------------------- explicit instantiations (C names)
extern "C" __global__ void __launch_bounds__(1024)
moe_align(const int* ids, int P, int E, int BM, int MB, int* offsets, int* block_expert, int* sorted_pair) {
  dsmoe::align_body(ids, P, E, BM, MB, offsets, block_expert, sorted_pair);
}

#define DSMOE_GEMM_PASS A, W, sorted_pair, block_expert, route_w, act, out, topk, H, I

#define DSMOE_TC(NAME, T_, BM, BN, BK, WM, WN, ST, GATED, ATOMIC)                              \
  extern "C" __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32) NAME(              \
      const T_* A, const T_* W, const int* sorted_pair, const int* block_expert,               \
      const float* route_w, T_* act, float* out, int topk, int H, int I) {                     \
    dsmoe::gemm_tc_body<T_, BM, BN, BK, WM, WN, ST, GATED, ATOMIC>(DSMOE_GEMM_PASS);         \
  }
#define DSMOE_TC_CFG(CFG, DT, T_, BM, BN, BK, WM, WN, ST)                                      \
  DSMOE_TC(moe_gemm1_##DT##_##CFG, T_, BM, BN, BK, WM, WN, ST, true, false)                   \
  DSMOE_TC(moe_gemm2_##DT##_##CFG##_reduce, T_, BM, BN, BK, WM, WN, ST, false, false)         \
  DSMOE_TC(moe_gemm2_##DT##_##CFG##_atomic, T_, BM, BN, BK, WM, WN, ST, false, true)
#define DSMOE_TC_DT(DT, T_)                                   \
  DSMOE_TC_CFG(dec, DT, T_, 16, 64, 64, 16, 16, 4)            \
  DSMOE_TC_CFG(pre, DT, T_, 64, 128, 32, 32, 64, 3)

DSMOE_TC_DT(bf16, dsmoe::bf16)
DSMOE_TC_DT(f16, dsmoe::f16)

#define DSMOE_SIMT(NAME, T_, GATED, ATOMIC)                                                    \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                      \
      const T_* A, const T_* W, const int* sorted_pair, const int* block_expert,               \
      const float* route_w, T_* act, float* out, int topk, int H, int I) {                     \
    dsmoe::gemm_simt_body<T_, GATED, ATOMIC>(DSMOE_GEMM_PASS);                                 \
  }
#define DSMOE_DT(DT, T_)                                                                       \
  DSMOE_SIMT(moe_simt_gemm1_##DT, T_, true, false)                                             \
  DSMOE_SIMT(moe_simt_gemm2_##DT##_reduce, T_, false, false)                                   \
  DSMOE_SIMT(moe_simt_gemm2_##DT##_atomic, T_, false, true)                                    \
  extern "C" __global__ void __launch_bounds__(256)                                            \
  moe_combine_##DT(const float* out, const int* ids, T_* y, int T, int K, int H, int E) {      \
    dsmoe::combine_body<T_>(out, ids, y, T, K, H, E);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                            \
  moe_cast_##DT(const float* y32, T_* y, long long n) { dsmoe::cast_body<T_>(y32, y, n); }

DSMOE_DT(f32, float)
DSMOE_DT(bf16, dsmoe::bf16)
DSMOE_DT(f16, dsmoe::f16)
