// route.cu: the dsmoe::route kernel, one kernel for every DeepSeek routing variant.
//
//   x [T,H] (TX), w_gate [E,H] (TW), bias [E] fp32 or null  ->  weights [T,K] fp32, ids [T,K] int32
//
// Grid (ceil(T/TPC), S), CTAs of 8 warps. A CTA takes TPC consecutive tokens (TPC = 1 for small T
// so that more CTAs run, 8 for large T so that each W_gate row read from L2 serves 8 tokens) and,
// when S > 1 (decode: few token blocks), the S-th slice of the experts so that all SMs read W_gate.
//   phase 1  logits[t,e] = x[t]·w[e] in fp32: warp w takes experts lo+w, lo+w+8, ...; lanes stride H
//            with 16-byte loads of W when H allows.
//   (S > 1)  logits go to logits_ws; the last CTA of the token block (threadfence + counter) loads
//            them into shared memory and alone goes on.
//   phase 2  one warp per token: scores (softmax or sigmoid), choice = scores + bias,
//            group limit (group max or sum of top-2; other groups -> -inf), top-K by repeated
//            warp argmax (descending, ties to the lower id), gather the unbiased scores,
//            normalize (w /= sum + 1e-20) and scale.
//
// Shared memory (dynamic, 2·TPC·E floats):
//   +---------------------------+---------------------------+
//   | scores [TPC][E] fp32      | choice [TPC][E] fp32      |
//   +---------------------------+---------------------------+
// Workspace (S > 1 only): logits_ws [T,E] fp32 | counters [ceil(T/TPC)] u32, zeroed before the
// first launch and left zeroed by every launch.
// Taken experts are marked NaN in `choice` (never > and never == anything), masked groups -inf.
#include "dsmoe_common.cuh"

namespace dsmoe {

enum { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1 };
enum { TOPK_GREEDY = 0, TOPK_GROUP_MAX = 1, TOPK_GROUP_TOP2 = 2 };
constexpr int ROUTE_WARPS = 8;

template <typename T, int N> struct __align__(sizeof(T) * N) Vec { T v[N]; };

// Dot products of TPC token rows with W_gate row `wr` (fp32 sums, lanes stride H).
// VEC: 16-byte loads of W (and the matching x elements); needs H % (16 / sizeof(TW)) == 0.
template <typename TX, typename TW, int TPC, bool VEC>
__device__ __forceinline__ void row_dots(const TX* const (&xr)[TPC], const TW* wr, int H, int lane,
                                         float (&acc)[TPC]) {
  constexpr int N = VEC ? 16 / sizeof(TW) : 1;
#pragma unroll 2
  for (int h = lane * N; h < H; h += 32 * N) {
    const Vec<TW, N> wv = *reinterpret_cast<const Vec<TW, N>*>(wr + h);
#pragma unroll
    for (int t = 0; t < TPC; ++t) {
      const Vec<TX, N> xv = *reinterpret_cast<const Vec<TX, N>*>(xr[t] + h);
#pragma unroll
      for (int j = 0; j < N; ++j) acc[t] += to_float(wv.v[j]) * to_float(xv.v[j]);
    }
  }
}

// logits_ws [T,E] fp32 and counters [ceil(T/TPC)] (zeroed) are used only when S > 1: CTA (b, s)
// computes experts [s·E/S, (s+1)·E/S) of token block b, and the last CTA of block b to finish
// (threadfence + counter) runs phase 2 for it, then resets the counter.
template <typename TX, typename TW, int TPC>
__device__ __forceinline__ void route_body(
    const TX* __restrict__ x, const TW* __restrict__ w, const float* __restrict__ bias,
    float* __restrict__ out_w, int* __restrict__ out_ids, float* logits_ws, unsigned* counters,
    int T, int H, int E, int K, int S, int vec, int scoring, int method, int G, int TG,
    int normalize, float scaling, int scale_always) {
  extern __shared__ float smem[];
  __shared__ int is_last;
  float* scores = smem;
  float* choice = smem + TPC * E;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t0 = blockIdx.x * TPC;

  // ---- phase 1: logits of this CTA's experts (rows past T are clamped and ignored) ----
  const TX* xr[TPC];
#pragma unroll
  for (int t = 0; t < TPC; ++t) xr[t] = x + (long long)min(t0 + t, T - 1) * H;
  const int per = (E + S - 1) / S, e_lo = blockIdx.y * per, e_hi = min(E, e_lo + per);
  for (int e = e_lo + warp; e < e_hi; e += ROUTE_WARPS) {
    const TW* wr = w + (long long)e * H;
    float acc[TPC];
#pragma unroll
    for (int t = 0; t < TPC; ++t) acc[t] = 0.f;
    if (vec) row_dots<TX, TW, TPC, true>(xr, wr, H, lane, acc);
    else row_dots<TX, TW, TPC, false>(xr, wr, H, lane, acc);
#pragma unroll
    for (int t = 0; t < TPC; ++t) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) {
        if (S == 1) scores[t * E + e] = v;
        else if (t0 + t < T) logits_ws[(long long)(t0 + t) * E + e] = v;
      }
    }
  }
  if (S > 1) {
    __threadfence();  // publish this CTA's logits before counting it
    __syncthreads();
    if (threadIdx.x == 0) {
      // Release/acquire by the thread that does the atomic (as cooperative groups' grid sync
      // does): the fence after the barrier covers the logits the other warps stored, and the
      // fence after the atomic orders the other CTAs' logits before this CTA's reads below.
      __threadfence();
      is_last = atomicAdd(&counters[blockIdx.x], 1u) == (unsigned)(S - 1);
      __threadfence();
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int i = threadIdx.x; i < TPC * E; i += blockDim.x) {
      const int t = i / E;
      float v = 0.f;
      if (t0 + t < T)
        asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(logits_ws + (long long)t0 * E + i) : "memory");
      scores[i] = v;
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // ready for the next launch
  }
  __syncthreads();

  // ---- phase 2: one warp per token ----
  for (int t = warp; t < TPC; t += ROUTE_WARPS) {
    if (t0 + t >= T) break;
    float* s = scores + t * E;
    float* c = choice + t * E;
    // 2a. scores and selection values
    if (scoring == SCORE_SOFTMAX) {
      float m = neg_inf();
      for (int e = lane; e < E; e += 32) m = fmaxf(m, s[e]);
      m = warp_max(m);
      float sum = 0.f;
      for (int e = lane; e < E; e += 32) { const float p = expf(s[e] - m); s[e] = p; sum += p; }
      const float inv = 1.f / warp_sum(sum);
      for (int e = lane; e < E; e += 32) s[e] *= inv;
    } else {
      for (int e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-s[e]));
    }
    for (int e = lane; e < E; e += 32) c[e] = s[e] + (bias ? bias[e] : 0.f);
    __syncwarp();
    // 2b. group limit: lane g scores group g (G <= 32), keep the best TG groups
    if (method != TOPK_GREEDY && G > 1) {
      const int gs = E / G;
      float gscore = neg_inf();
      if (lane < G) {
        float b1 = neg_inf(), b2 = neg_inf();
        for (int j = 0; j < gs; ++j) {
          const float v = c[lane * gs + j];
          if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
        }
        gscore = method == TOPK_GROUP_MAX ? b1 : b1 + b2;
      }
      unsigned keep = 0u;
      for (int r = 0; r < TG; ++r) {
        float v = lane < G ? gscore : neg_inf();
        int i = lane < G ? lane : 1 << 30;
        if ((keep >> lane) & 1u) { v = neg_inf(); i = 1 << 29; }
        warp_argmax(v, i);
        keep |= 1u << i;
      }
      for (int e = lane; e < E; e += 32)
        if (!((keep >> (e / gs)) & 1u)) c[e] = neg_inf();
      __syncwarp();
    }
    // 2c. top-K of choice; gather the unbiased scores
    float my_w = 0.f, wsum = 0.f;
    int my_id = 0;
    for (int k = 0; k < K; ++k) {
      float v = neg_inf();
      int i = 1 << 30;
      for (int e = lane; e < E; e += 32) {
        const float ce = c[e];
        if (ce > v || (ce == v && e < i)) { v = ce; i = e; }
      }
      warp_argmax(v, i);
      const float sv = s[i];
      wsum += sv;
      if (lane == k) { my_w = sv; my_id = i; }
      __syncwarp();
      if (lane == 0) c[i] = __int_as_float(0x7fffffff);  // taken: NaN never wins again
      __syncwarp();
    }
    // 2d. normalize, scale, store
    if (normalize) my_w = my_w / (wsum + 1e-20f);
    if (scale_always || !normalize) my_w *= scaling;
    if (lane < K) {
      out_w[(long long)(t0 + t) * K + lane] = my_w;
      out_ids[(long long)(t0 + t) * K + lane] = my_id;
    }
  }
}

}  // namespace dsmoe

// Explicit instantiations with stable C names: route_<x dtype>_<w dtype>_t<TPC>.
#define DSMOE_ROUTE_KERNEL(NAME, TX, TW, TPC)                                                   \
  extern "C" __global__ void __launch_bounds__(dsmoe::ROUTE_WARPS * 32) NAME(                  \
      const TX* x, const TW* w, const float* bias, float* out_w, int* out_ids, float* logits_ws, \
      unsigned* counters, int T, int H, int E, int K, int S, int vec, int scoring, int method,  \
      int G, int TG, int normalize, float scaling, int scale_always) {                          \
    dsmoe::route_body<TX, TW, TPC>(x, w, bias, out_w, out_ids, logits_ws, counters, T, H, E, K, \
                                   S, vec, scoring, method, G, TG, normalize, scaling,          \
                                   scale_always);                                              \
  }
#define DSMOE_ROUTE_TPC(X, TX, W, TW)                    \
  DSMOE_ROUTE_KERNEL(route_##X##_##W##_t1, TX, TW, 1)    \
  DSMOE_ROUTE_KERNEL(route_##X##_##W##_t8, TX, TW, 8)

// W_gate in x's dtype or in fp32 (the launcher casts any other combination to fp32).
DSMOE_ROUTE_TPC(f32, float, f32, float)
DSMOE_ROUTE_TPC(bf16, dsmoe::bf16, bf16, dsmoe::bf16)
DSMOE_ROUTE_TPC(bf16, dsmoe::bf16, f32, float)
DSMOE_ROUTE_TPC(f16, dsmoe::f16, f16, dsmoe::f16)
DSMOE_ROUTE_TPC(f16, dsmoe::f16, f32, float)
