// Torch binding of the fused merge: registers torch.ops.usp_csrc.merge_attention_ (CUDA only).
// Built lazily by usp/_csrc.py with torch.utils.cpp_extension; see merge_attention_kernel.cu for the math.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "merge_attention.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return usp::kFloat32;
    case at::kHalf: return usp::kFloat16;
    case at::kBFloat16: return usp::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void merge_attention_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_out,
                      const at::Tensor& block_lse) {
  TORCH_CHECK(out.dim() == 4 && block_out.dim() == 4, "out and block_out must be [batch, seq, heads, dim]");
  TORCH_CHECK(lse.dim() == 3 && block_lse.dim() == 3, "lse and block_lse must be [batch, heads, seq]");
  TORCH_CHECK(out.sizes() == block_out.sizes(), "out ", out.sizes(), " and block_out ", block_out.sizes(),
              " must have one shape");
  const int64_t batch = out.size(0), seq = out.size(1), heads = out.size(2), dim = out.size(3);
  for (const at::Tensor* t : {&lse, &block_lse}) {
    TORCH_CHECK(t->size(0) == batch && t->size(1) == heads && t->size(2) == seq, "LSE shape ", t->sizes(),
                " does not match out ", out.sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "LSEs must be float32");
  }
  TORCH_CHECK(out.stride(3) == 1 && block_out.stride(3) == 1, "head_dim must be contiguous");
  for (const at::Tensor* t : {&lse, &block_out, &block_lse}) {
    TORCH_CHECK(t->device() == out.device(), "all tensors must be on one CUDA device");
  }
  TORCH_CHECK(out.is_cuda(), "merge_attention_ runs on CUDA tensors");
  usp::MergeGeometry g{};
  g.rows = batch * seq * heads;
  g.seq = seq;
  g.heads = heads;
  g.dim = dim;
  for (int i = 0; i < 3; ++i) {  // outputs: (batch, seq, heads); LSEs: (batch, heads, seq)
    g.out_stride[i] = out.stride(i);
    g.block_stride[i] = block_out.stride(i);
    g.lse_stride[i] = lse.stride(i);
    g.block_lse_stride[i] = block_lse.stride(i);
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t status = usp::launch_merge_attention(
      dtype_code(out, "out"), out.data_ptr(), lse.data_ptr<float>(), dtype_code(block_out, "block_out"),
      block_out.data_ptr(), block_lse.data_ptr<float>(), g, c10::cuda::getCurrentCUDAStream(out.get_device()).stream());
  TORCH_CHECK(status == cudaSuccess, "merge_attention_ kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace

TORCH_LIBRARY(usp_csrc, m) {
  m.def("merge_attention_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, Tensor block_lse) -> ()");
}

TORCH_LIBRARY_IMPL(usp_csrc, CUDA, m) { m.impl("merge_attention_", &merge_attention_); }
