// CUDA row kernel of fastvl.ops.region_kl_loss, a second GPU implementation to hold the Triton kernel
// against: one thread block per row computes KL(p || softmax(x)) and writes the gradient
// (softmax(x) * sum p - p) * scale. Three sweeps over the row (max; the sums; the gradient), the last two
// served from L2 (a 1601-class row is 6.4 KiB). Unselected rows only get a zero gradient.
// Only the CUDA runtime and device-agnostic torch headers: the caller passes its current stream (and has
// made the tensors' device current), so this file builds against any torch whose CUDA version matches.
#include <ATen/Dispatch.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cmath>

#include "fastvl_ext.h"

namespace {

constexpr int kThreads = 256;

template <typename Op>
__device__ float block_reduce(float value, Op op, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = shared[0];
  for (int w = 1; w < kThreads / 32; ++w) value = op(value, shared[w]);
  return value;
}

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};

template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kThreads) region_kl_rows_kernel(
    const scalar_t* __restrict__ logits, const target_t* __restrict__ targets, const bool* __restrict__ selected,
    const float* __restrict__ scale, int64_t scale_stride, float* __restrict__ loss, scalar_t* grad,
    int64_t classes, int64_t logits_stride, int64_t target_stride, int64_t grad_stride) {
  __shared__ float shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  scalar_t* grad_row = grad ? grad + row * grad_stride : nullptr;
  if (!selected[row]) {
    if (threadIdx.x == 0) loss[row] = 0.f;
    if (grad_row) {
      for (int64_t c = threadIdx.x; c < classes; c += kThreads) grad_row[c] = scalar_t(0);
    }
    return;
  }
  const scalar_t* x = logits + row * logits_stride;
  const target_t* p = targets + row * target_stride;

  float local_max = -INFINITY;
  for (int64_t c = threadIdx.x; c < classes; c += kThreads) local_max = fmaxf(local_max, static_cast<float>(x[c]));
  const float row_max = block_reduce(local_max, Max(), shared);

  float sum_exp = 0.f, sum_p = 0.f, sum_p_x = 0.f, sum_p_log_p = 0.f;
  for (int64_t c = threadIdx.x; c < classes; c += kThreads) {
    const float shifted = static_cast<float>(x[c]) - row_max;
    const float pc = static_cast<float>(p[c]);
    sum_exp += __expf(shifted);
    sum_p += pc;
    sum_p_x += pc * shifted;
    sum_p_log_p += pc > 0.f ? pc * __logf(pc) : 0.f;
  }
  sum_exp = block_reduce(sum_exp, Sum(), shared);
  sum_p = block_reduce(sum_p, Sum(), shared);
  sum_p_x = block_reduce(sum_p_x, Sum(), shared);
  sum_p_log_p = block_reduce(sum_p_log_p, Sum(), shared);
  const float log_sum_exp = logf(sum_exp);
  if (threadIdx.x == 0) loss[row] = sum_p_log_p - sum_p_x + sum_p * log_sum_exp;
  if (!grad_row) return;

  const float row_scale = scale[row * scale_stride];
  const float log_norm = row_max + log_sum_exp;
  for (int64_t c = threadIdx.x; c < classes; c += kThreads) {
    const float softmax = __expf(static_cast<float>(x[c]) - log_norm);
    grad_row[c] = static_cast<scalar_t>((softmax * sum_p - static_cast<float>(p[c])) * row_scale);
  }
}

// Same contract as the CPU region_kl_rows (csrc/region_kl_cpu.cpp), for CUDA tensors on the current
// device; ``stream`` is torch.cuda.current_stream().cuda_stream.
at::Tensor region_kl_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& selected,
                               const at::Tensor& scale, std::optional<at::Tensor> grad, int64_t stream_handle) {
  TORCH_CHECK(logits.is_cuda() && targets.is_cuda() && selected.is_cuda() && scale.is_cuda(),
              "region_kl_rows_cuda: every tensor must be on CUDA");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "region_kl_rows_cuda: logits must be [N, C], unit class stride");
  TORCH_CHECK(targets.sizes() == logits.sizes() && targets.stride(1) == 1,
              "region_kl_rows_cuda: targets must be [N, C] like logits, unit class stride");
  TORCH_CHECK(targets.scalar_type() == logits.scalar_type() || targets.scalar_type() == at::kFloat,
              "region_kl_rows_cuda: targets must be float32 or logits' dtype");
  TORCH_CHECK(selected.dim() == 1 && selected.size(0) == logits.size(0) && selected.scalar_type() == at::kBool &&
                  selected.is_contiguous(), "region_kl_rows_cuda: selected must be contiguous bool [N]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == logits.size(0)),
              "region_kl_rows_cuda: scale must be fp32 [1] or [N]");
  if (grad) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->stride(1) == 1 && grad->scalar_type() == logits.scalar_type(),
                "region_kl_rows_cuda: grad must be [N, C] in logits' dtype, unit class stride");
  }
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  const int64_t rows = logits.size(0);
  if (rows == 0) return loss;
  const int64_t scale_stride = scale.numel() == 1 ? 0 : 1;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_kl_rows_cuda", [&] {
    scalar_t* grad_data = grad ? grad->data_ptr<scalar_t>() : nullptr;
    const int64_t grad_stride = grad ? grad->stride(0) : 0;
    if (targets.scalar_type() == at::kFloat) {
      region_kl_rows_kernel<scalar_t, float><<<rows, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), targets.data_ptr<float>(), selected.data_ptr<bool>(), scale.data_ptr<float>(),
          scale_stride, loss.data_ptr<float>(), grad_data, logits.size(1), logits.stride(0), targets.stride(0),
          grad_stride);
    } else {
      region_kl_rows_kernel<scalar_t, scalar_t><<<rows, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), targets.data_ptr<scalar_t>(), selected.data_ptr<bool>(),
          scale.data_ptr<float>(), scale_stride, loss.data_ptr<float>(), grad_data, logits.size(1), logits.stride(0),
          targets.stride(0), grad_stride);
    }
  });
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "region_kl_rows_cuda: launch failed: ", cudaGetErrorString(status));
  return loss;
}

FASTVL_REGISTER_OP("region_kl_rows_cuda", [](pybind11::module_& m) {
  m.def("region_kl_rows_cuda", &region_kl_rows_cuda,
        "Per-row KL(targets || softmax(logits)) and its scaled gradient, on CUDA", pybind11::arg("logits"),
        pybind11::arg("targets"), pybind11::arg("selected"), pybind11::arg("scale"),
        pybind11::arg("grad") = pybind11::none(), pybind11::arg("stream") = 0);
});

}  // namespace
