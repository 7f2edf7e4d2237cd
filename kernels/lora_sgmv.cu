// Segmented LoRA kernels (SGMV; BGMV when every segment is one token): y[row] += (x[row] · A_s) · B_s.
//
// A batch's rows that use adapter s form segment s: `rows[seg_indptr[s] : seg_indptr[s+1]]` lists them
// (rows with no adapter are in no segment and are never touched). Each segment brings its own weight
// pointers and rank, so mixed ranks share one launch with no padding at all.
//
// shrink: v[i, j]  = sum_k x[rows[i], k] · At_s[j, k]      At_s: [rank_s, h_in]  (A transposed)
// expand: y[rows[i], o] += sum_j v[i, j] · B_s[j, o]        B_s:  [rank_s, h_out] (scaling folded in)
// v is float32 [num_listed_rows, ldv], zeroed by the caller; i indexes `rows`, not the batch.
//
// Both are memory-bound whenever segments are short (decode): every weight byte is read once per
// TOK-token tile, x tiles are staged in shared memory, accumulation is float32.
// Compiled by CuPy (NVRTC) at run time; `nvcc -DLORAPLEX_INSTANTIATE` compiles every instance for the
// build checks.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace loraplex {

constexpr int kWarps = 8;          // threads per block: kWarps * 32
constexpr int kChunk = 1024;       // x elements per token staged in shared memory by one shrink block
constexpr int kMaxRank = 128;      // the largest rank the expand kernel stages (--max-lora-rank)

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __half from_float(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 from_float(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }

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

// grid: (segments, ceil(h_in / kChunk), ceil(longest segment / TOK)); block: kWarps * 32 threads.
// Split-K over grid.y: partial sums meet in v through atomicAdd (no grid-wide synchronisation, so a
// skewed segment mix cannot deadlock).
template <typename T, int TOK>
__global__ void __launch_bounds__(loraplex::kWarps * 32) lora_shrink(
    const T* __restrict__ x, int ldx, const int* __restrict__ rows, const int* __restrict__ seg_indptr,
    const long long* __restrict__ a_ptrs, const int* __restrict__ ranks, float* __restrict__ v, int ldv,
    int h_in) {
  using namespace loraplex;
  const int seg = blockIdx.x;
  const TokenTile<TOK> tile(seg_indptr);
  const int tok0 = tile.first;
  const int ntok = tile.count;
  const int k0 = static_cast<int>(blockIdx.y) * kChunk;
  if (ntok == 0 || k0 >= h_in) return;  // uniform per block
  const int klen = min(kChunk, h_in - k0);
  const int rank = ranks[seg];
  const T* __restrict__ at = reinterpret_cast<const T*>(a_ptrs[seg]);

  __shared__ float xs[TOK][kChunk];
  for (int i = threadIdx.x; i < TOK * kChunk; i += blockDim.x) {
    const int t = i / kChunk;
    const int k = i - t * kChunk;
    xs[t][k] = (t < ntok && k < klen) ? to_float(x[static_cast<long long>(rows[tok0 + t]) * ldx + k0 + k]) : 0.f;
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int j = warp; j < rank; j += kWarps) {
    const T* __restrict__ arow = at + static_cast<long long>(j) * h_in + k0;
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = 0.f;
    for (int k = lane; k < klen; k += 32) {  // consecutive lanes read consecutive weights: coalesced
      const float a = to_float(arow[k]);
#pragma unroll
      for (int t = 0; t < TOK; ++t) acc[t] = fmaf(a, xs[t][k], acc[t]);
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      float s = acc[t];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0 && t < ntok) atomicAdd(&v[static_cast<long long>(tok0 + t) * ldv + j], s);
    }
  }
}

// grid: (segments, ceil(h_out / (kWarps * 32)), ceil(longest segment / TOK)); one thread per output
// column, so B's rows are read coalesced and every y element has exactly one writer (no atomics).
template <typename T, int TOK>
__global__ void __launch_bounds__(loraplex::kWarps * 32) lora_expand(
    const float* __restrict__ v, int ldv, const int* __restrict__ rows, const int* __restrict__ seg_indptr,
    const long long* __restrict__ b_ptrs, const int* __restrict__ ranks, T* __restrict__ y, int ldy,
    int h_out) {
  using namespace loraplex;
  const int seg = blockIdx.x;
  const TokenTile<TOK> tile(seg_indptr);
  const int tok0 = tile.first;
  const int ntok = tile.count;
  if (ntok == 0) return;  // uniform per block
  const int rank = min(ranks[seg], kMaxRank);
  const T* __restrict__ b = reinterpret_cast<const T*>(b_ptrs[seg]);

  __shared__ float vs[TOK][kMaxRank];
  for (int i = threadIdx.x; i < TOK * rank; i += blockDim.x) {
    const int t = i / rank;
    const int j = i - t * rank;
    vs[t][j] = t < ntok ? v[static_cast<long long>(tok0 + t) * ldv + j] : 0.f;
  }
  __syncthreads();

  const int o = static_cast<int>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= h_out) return;
  float acc[TOK];
#pragma unroll
  for (int t = 0; t < TOK; ++t) acc[t] = 0.f;
  for (int j = 0; j < rank; ++j) {
    const float bj = to_float(b[static_cast<long long>(j) * h_out + o]);
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = fmaf(vs[t][j], bj, acc[t]);
  }
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < ntok) {
      T* p = y + static_cast<long long>(rows[tok0 + t]) * ldy + o;
      *p = from_float(to_float(*p) + acc[t], T());
    }
  }
}

#ifdef LORAPLEX_INSTANTIATE
#define LORAPLEX_INSTANCES(T, TOK)                                                                          \
  template __global__ void lora_shrink<T, TOK>(const T*, int, const int*, const int*, const long long*,    \
                                               const int*, float*, int, int);                              \
  template __global__ void lora_expand<T, TOK>(const float*, int, const int*, const int*, const long long*, \
                                               const int*, T*, int, int);
LORAPLEX_INSTANCES(__half, 1)
LORAPLEX_INSTANCES(__half, 8)
LORAPLEX_INSTANCES(__nv_bfloat16, 1)
LORAPLEX_INSTANCES(__nv_bfloat16, 8)
#endif
