// Interface between the torch binding (merge_attention.cpp) and the CUDA kernel (merge_attention_kernel.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace usp {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shapes: out/block_out [batch, seq, heads, dim] (dim contiguous), lse/block_lse [batch, heads, seq]; strides in
// elements, for the (batch, seq, heads) dims of the outputs and the (batch, heads, seq) dims of the LSEs.
struct MergeGeometry {
  int64_t rows;  // batch * seq * heads
  int64_t seq, heads, dim;
  int64_t out_stride[3];
  int64_t block_stride[3];
  int64_t lse_stride[3];
  int64_t block_lse_stride[3];
};

cudaError_t launch_merge_attention(int out_dtype, void* out, float* lse, int block_dtype, const void* block_out,
                                   const float* block_lse, const MergeGeometry& geometry, cudaStream_t stream);

}  // namespace usp
