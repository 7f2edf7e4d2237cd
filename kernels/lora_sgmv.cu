// Segmented LoRA kernels (SGMV; BGMV when every segment is one token): y[row] += (x[row] · A_s) · B_s.
//
// A batch's rows that use adapter s form segment s: `rows[seg_indptr[s] : seg_indptr[s+1]]` lists them
// (rows with no adapter are in no segment, or in a segment of rank 0, and are never written). Each
// segment brings its own weight pointer and rank, so mixed ranks share one launch with no padding.
//
// shrink: vp[p, i, j]  = sum_{k in split p} x[rows[i], k] · At_s[j, k]    At_s: [rank_s, h_in] (A^T)
// expand: y[rows[i], o] += sum_j (sum_p vp[p, i, j]) · B_s[j, o]           B_s:  [rank_s, h_out]
// vp is float32 [splits, num_listed_rows, ldv] (i indexes `rows`, not the batch). Every split writes its own
// partial sums, every element j < rank_s of each listed row exactly once: no zeroing, no atomics, and a
// skewed segment mix cannot deadlock (no grid-wide synchronisation).
//
// Both are memory-bound whenever segments are short (decode): weights are read once per TOK-token tile
// with 16-byte loads (8 half-precision values), accumulation is float32. Callers guarantee h_in, h_out,
// ldx, ldy, the column offset of y and every weight pointer are multiples of 8 elements (16 bytes).
// Compiled by CuPy (NVRTC) at run time; `nvcc -DLORAPLEX_INSTANTIATE` compiles every instance for the
// build checks.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace loraplex {

constexpr int kWarps = 4;     // threads per block: kWarps * 32
constexpr int kVec = 8;       // half-precision values per 16-byte load
constexpr int kRows = 4;      // rank rows one pass of the shrink computes (x is loaded once for all of them)
constexpr int kMaxRank = 128; // the largest rank the expand kernel stages (--max-lora-rank)

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __half from_float(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 from_float(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }

// Eight half-precision values from one 16-byte load, as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float (&out)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = to_float(h[e]);
}

// This block's tokens: positions [first, first + count) of `rows`, in segment blockIdx.x's tile blockIdx.z.
// count is 0 when the segment is shorter than the tile's start (the block then has nothing to do).
template <int TOK>
struct TokenTile {
  int first;
  int count;
  __device__ __forceinline__ explicit TokenTile(const int* __restrict__ seg_indptr) {
    const int end = seg_indptr[blockIdx.x + 1];
    first = seg_indptr[blockIdx.x] + static_cast<int>(blockIdx.z) * TOK;
    count = first < end ? min(TOK, end - first) : 0;
  }
};

}  // namespace loraplex

// grid: (segments, splits of h_in, ceil(longest segment / TOK)); block: kWarps * 32 threads.
// Every thread of the block walks the split's K range 8 values at a time; one pass covers kRows rank rows,
// so each x load feeds kRows * TOK multiply-adds; the block's warps meet in shared memory.
template <typename T, int TOK>
__global__ void __launch_bounds__(loraplex::kWarps * 32) lora_shrink(
    const T* __restrict__ x, int ldx, const int* __restrict__ rows, const int* __restrict__ seg_indptr,
    const long long* __restrict__ a_ptrs, const int* __restrict__ ranks, float* __restrict__ vp, int ldv,
    int n_rows, int h_in) {
  using namespace loraplex;
  const TokenTile<TOK> tile(seg_indptr);
  const int ntok = tile.count;
  const int rank = ranks[blockIdx.x];
  if (ntok == 0 || rank == 0) return;  // uniform per block
  const int span = ((h_in + static_cast<int>(gridDim.y) * kVec - 1) / (static_cast<int>(gridDim.y) * kVec)) * kVec;
  const int kb = static_cast<int>(blockIdx.y) * span;
  const int ke = min(h_in, kb + span);
  const T* __restrict__ at = reinterpret_cast<const T*>(a_ptrs[blockIdx.x]);
  const T* xr[TOK];
#pragma unroll
  for (int t = 0; t < TOK; ++t) xr[t] = x + static_cast<long long>(rows[tile.first + min(t, ntok - 1)]) * ldx;
  float* __restrict__ out = vp + (static_cast<long long>(blockIdx.y) * n_rows + tile.first) * ldv;

  __shared__ float red[kWarps][kRows][TOK];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int j0 = 0; j0 < rank; j0 += kRows) {
    float acc[kRows][TOK];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int t = 0; t < TOK; ++t) acc[r][t] = 0.f;
    for (int k = kb + static_cast<int>(threadIdx.x) * kVec; k < ke; k += blockDim.x * kVec) {
      float xv[TOK][kVec];
#pragma unroll
      for (int t = 0; t < TOK; ++t) load8(xr[t] + k, xv[t]);  // tokens past ntok repeat the last: never stored
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (j0 + r < rank) {  // uniform per block
          float av[kVec];
          load8(at + static_cast<long long>(j0 + r) * h_in + k, av);
#pragma unroll
          for (int t = 0; t < TOK; ++t)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[r][t] = fmaf(av[e], xv[t][e], acc[r][t]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        float s = acc[r][t];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (lane == 0) red[warp][r][t] = s;
      }
    __syncthreads();
    if (threadIdx.x < kRows * TOK) {
      const int r = threadIdx.x / TOK;
      const int t = threadIdx.x - r * TOK;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w][r][t];
      if (t < ntok && j0 + r < rank) out[static_cast<long long>(t) * ldv + j0 + r] = s;
    }
    __syncthreads();  // red is reused by the next pass
  }
}

// grid: (segments, ceil(h_out / (kWarps * 32 * 8)), ceil(longest segment / TOK)); each thread owns 8
// consecutive output columns (16-byte loads of B, 16-byte read-modify-write of y): one writer per element.
template <typename T, int TOK>
__global__ void __launch_bounds__(loraplex::kWarps * 32) lora_expand(
    const float* __restrict__ vp, int ldv, long long split_stride, int splits, const int* __restrict__ rows,
    const int* __restrict__ seg_indptr, const long long* __restrict__ b_ptrs, const int* __restrict__ ranks,
    T* __restrict__ y, int ldy, int h_out) {
  using namespace loraplex;
  const TokenTile<TOK> tile(seg_indptr);
  const int ntok = tile.count;
  const int rank = min(ranks[blockIdx.x], kMaxRank);
  if (ntok == 0 || rank == 0) return;  // uniform per block: rows of rank 0 stay bit-identical
  const T* __restrict__ b = reinterpret_cast<const T*>(b_ptrs[blockIdx.x]);

  __shared__ float vs[TOK][kMaxRank];
  for (int i = threadIdx.x; i < TOK * rank; i += blockDim.x) {
    const int t = i / rank;
    const int j = i - t * rank;
    float s = 0.f;
    if (t < ntok) {
      const float* p = vp + static_cast<long long>(tile.first + t) * ldv + j;
      for (int q = 0; q < splits; ++q) s += p[q * split_stride];
    }
    vs[t][j] = s;
  }
  __syncthreads();

  const int o = (static_cast<int>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (o >= h_out) return;
  float acc[TOK][kVec];
#pragma unroll
  for (int t = 0; t < TOK; ++t)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[t][e] = 0.f;
  for (int j = 0; j < rank; ++j) {
    float bv[kVec];
    load8(b + static_cast<long long>(j) * h_out + o, bv);
#pragma unroll
    for (int t = 0; t < TOK; ++t)
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[t][e] = fmaf(vs[t][j], bv[e], acc[t][e]);
  }
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < ntok) {
      T* p = y + static_cast<long long>(rows[tile.first + t]) * ldy + o;
      uint4 raw = *reinterpret_cast<const uint4*>(p);
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) h[e] = from_float(to_float(h[e]) + acc[t][e], T());
      *reinterpret_cast<uint4*>(p) = raw;
    }
  }
}

#ifdef LORAPLEX_INSTANTIATE
#define LORAPLEX_INSTANCES(T, TOK)                                                                           \
  template __global__ void lora_shrink<T, TOK>(const T*, int, const int*, const int*, const long long*,     \
                                               const int*, float*, int, int, int);                          \
  template __global__ void lora_expand<T, TOK>(const float*, int, long long, int, const int*, const int*,   \
                                               const long long*, const int*, T*, int, int);
LORAPLEX_INSTANCES(__half, 1)
LORAPLEX_INSTANCES(__half, 8)
LORAPLEX_INSTANCES(__nv_bfloat16, 1)
LORAPLEX_INSTANCES(__nv_bfloat16, 8)
#endif
