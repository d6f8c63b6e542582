// Fused out/LSE merge (the online-softmax update of ring attention), one pass over the output.
//
// For each row (b, s, h): lse' = logaddexp(lse, block_lse), w = exp(block_lse - lse'),
// out = out + w * (block_out - out), all in float32 registers, rounded once to out's dtype. Rows where both sides
// are -inf (no keys yet) keep `out`. The PyTorch fallback in usp/merge.py does the same in 4 element-wise
// kernels and float32 temporaries; this one reads out and block_out once and writes out once.
//
// No torch headers here (they dominate build time); merge_attention.cpp does the checks and the dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "merge_attention.h"

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int kWarpsPerBlock = 8;

// One warp per row; lanes stride over head_dim (contiguous), so each warp access is coalesced.
template <typename Out, typename Block>
__global__ void merge_attention_kernel(Out* __restrict__ out, float* __restrict__ lse,
                                       const Block* __restrict__ block_out, const float* __restrict__ block_lse,
                                       usp::MergeGeometry g) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= g.rows) return;
  const int64_t h = row % g.heads;
  const int64_t rest = row / g.heads;
  const int64_t s = rest % g.seq;
  const int64_t b = rest / g.seq;
  float* lse_at = lse + b * g.lse_stride[0] + h * g.lse_stride[1] + s * g.lse_stride[2];
  const float old_lse = *lse_at;
  const float new_block_lse = block_lse[b * g.block_lse_stride[0] + h * g.block_lse_stride[1] + s * g.block_lse_stride[2]];
  __syncwarp();  // every lane has read the old LSE before lane 0 overwrites it
  const float hi = fmaxf(old_lse, new_block_lse);
  float merged_lse, weight;
  if (hi == -INFINITY) {  // no keys on either side yet
    merged_lse = -INFINITY;
    weight = 0.0f;
  } else {
    merged_lse = hi + log1pf(expf(fminf(old_lse, new_block_lse) - hi));
    weight = expf(new_block_lse - merged_lse);
  }
  Out* o = out + b * g.out_stride[0] + s * g.out_stride[1] + h * g.out_stride[2];
  const Block* x = block_out + b * g.block_stride[0] + s * g.block_stride[1] + h * g.block_stride[2];
  for (int64_t i = lane; i < g.dim; i += 32) {
    const float acc = to_float(o[i]);
    o[i] = from_float<Out>(acc + weight * (to_float(x[i]) - acc));
  }
  if (lane == 0) *lse_at = merged_lse;
}

template <typename Out, typename Block>
cudaError_t launch(void* out, float* lse, const void* block_out, const float* block_lse, const usp::MergeGeometry& g,
                   cudaStream_t stream) {
  const int threads = 32 * kWarpsPerBlock;
  const int64_t blocks = (g.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  merge_attention_kernel<Out, Block><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<Out*>(out), lse, static_cast<const Block*>(block_out), block_lse, g);
  return cudaGetLastError();
}

template <typename Out>
cudaError_t launch_for_block(int block_dtype, void* out, float* lse, const void* block_out, const float* block_lse,
                             const usp::MergeGeometry& g, cudaStream_t stream) {
  switch (block_dtype) {
    case usp::kFloat32: return launch<Out, float>(out, lse, block_out, block_lse, g, stream);
    case usp::kFloat16: return launch<Out, __half>(out, lse, block_out, block_lse, g, stream);
    case usp::kBFloat16: return launch<Out, __nv_bfloat16>(out, lse, block_out, block_lse, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

namespace usp {

cudaError_t launch_merge_attention(int out_dtype, void* out, float* lse, int block_dtype, const void* block_out,
                                   const float* block_lse, const MergeGeometry& geometry, cudaStream_t stream) {
  if (geometry.rows == 0) return cudaSuccess;
  if (geometry.rows > static_cast<int64_t>(0x7fffffff) / 32 * kWarpsPerBlock) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case kFloat32: return launch_for_block<float>(block_dtype, out, lse, block_out, block_lse, geometry, stream);
    case kFloat16: return launch_for_block<__half>(block_dtype, out, lse, block_out, block_lse, geometry, stream);
    case kBFloat16: return launch_for_block<__nv_bfloat16>(block_dtype, out, lse, block_out, block_lse, geometry, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace usp
