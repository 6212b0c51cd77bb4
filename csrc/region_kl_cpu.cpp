// CPU row kernel of fastvl.ops.region_kl_loss: KL(p || softmax(x)) per row and its gradient
// (softmax(x) * sum p - p) * scale, without materialising log_softmax. One task per row (rows split
// across threads with at::parallel_for, OpenMP in torch's CPU builds); each row (<= 128 KiB at 32k fp32
// classes) is swept while it sits in cache: max, then the sums, then the gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "fastvl_ext.h"

#include "loss_math.h"

namespace {

using fastvl::exp_nonpositive;
using fastvl::log_positive;

constexpr int64_t kBlock = 512;

// One selected row: returns KL(p || softmax(x)) and, if grad_row, writes (softmax(x) * sum p - p) * scale
// (grad_row may be x). Cloned for AVX2 and the baseline ISA, chosen at load time: torch's extension flags
// target only the baseline.
template <typename scalar_t, typename target_t>
__attribute__((target_clones("avx2", "default"))) float region_kl_row(const scalar_t* x, const target_t* p,
                                                                       scalar_t* grad_row, int64_t classes,
                                                                       float row_scale) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t c = 0; c < classes; ++c) row_max = std::max(row_max, static_cast<float>(x[c]));
  // SIMD float sums over blocks of kBlock classes, blocks added in double: rows of up to 32k classes, and
  // the parity rule is relative to eager's pairwise sums.
  double sum_exp = 0.0, sum_p = 0.0, sum_p_x = 0.0, sum_p_log_p = 0.0;
  for (int64_t start = 0; start < classes; start += kBlock) {
    const int64_t stop = std::min(classes, start + kBlock);
    float block_exp = 0.f, block_p = 0.f, block_p_x = 0.f, block_p_log_p = 0.f;
#pragma omp simd reduction(+ : block_exp, block_p, block_p_x, block_p_log_p)
    for (int64_t c = start; c < stop; ++c) {
      const float shifted = static_cast<float>(x[c]) - row_max;
      const float pc = static_cast<float>(p[c]);
      block_exp += exp_nonpositive(shifted);
      block_p += pc;
      block_p_x += pc * shifted;
      block_p_log_p += pc * log_positive(pc);  // 0 log 0 = 0: log_positive(0) is finite
    }
    sum_exp += block_exp;
    sum_p += block_p;
    sum_p_x += block_p_x;
    sum_p_log_p += block_p_log_p;
  }
  const double log_sum_exp = std::log(sum_exp);
  if (grad_row) {
    const float log_norm = row_max + static_cast<float>(log_sum_exp);
    const float total_p = static_cast<float>(sum_p);
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) {
      const float softmax = exp_nonpositive(static_cast<float>(x[c]) - log_norm);
      grad_row[c] = static_cast<scalar_t>((softmax * total_p - static_cast<float>(p[c])) * row_scale);
    }
  }
  // -sum p log softmax(x) = -sum p (x - m) + sum p * log s
  return static_cast<float>(sum_p_log_p - sum_p_x + sum_p * log_sum_exp);
}

template <typename scalar_t, typename target_t>
void region_kl_rows_kernel(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& selected,
                           const at::Tensor& scale, at::Tensor& loss, at::Tensor* grad) {
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const int64_t logits_stride = logits.stride(0), target_stride = targets.stride(0);
  const int64_t scale_stride = scale.numel() == 1 ? 0 : 1;
  const scalar_t* logits_data = logits.data_ptr<scalar_t>();
  const target_t* target_data = targets.data_ptr<target_t>();
  const bool* selected_data = selected.data_ptr<bool>();
  const float* scale_data = scale.data_ptr<float>();
  float* loss_data = loss.data_ptr<float>();
  scalar_t* grad_data = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t grad_stride = grad ? grad->stride(0) : 0;

  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* grad_row = grad ? grad_data + row * grad_stride : nullptr;
      if (!selected_data[row]) {
        loss_data[row] = 0.f;
        if (grad_row) std::fill(grad_row, grad_row + classes, scalar_t(0));
        continue;
      }
      loss_data[row] = region_kl_row(logits_data + row * logits_stride, target_data + row * target_stride, grad_row,
                                     classes, scale_data[row * scale_stride]);
    }
  });
}

// logits [N, C] (fp32/fp16/bf16, unit class stride); targets [N, C] (fp32 or logits' dtype); selected
// bool [N]; scale fp32 [1] or [N] (gradient factor per row); grad: None, or [N, C] in logits' dtype
// (may be logits itself: each element is read before it is overwritten). Returns the per-row loss, fp32 [N].
at::Tensor region_kl_rows(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& selected,
                          const at::Tensor& scale, std::optional<at::Tensor> grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "region_kl_rows: logits must be [N, C], unit class stride");
  TORCH_CHECK(targets.sizes() == logits.sizes() && targets.stride(1) == 1,
              "region_kl_rows: targets must be [N, C] like logits, unit class stride");
  TORCH_CHECK(targets.scalar_type() == logits.scalar_type() || targets.scalar_type() == at::kFloat,
              "region_kl_rows: targets must be float32 or logits' dtype");
  TORCH_CHECK(selected.dim() == 1 && selected.size(0) == logits.size(0) && selected.scalar_type() == at::kBool &&
                  selected.is_contiguous(), "region_kl_rows: selected must be contiguous bool [N]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == logits.size(0)), "region_kl_rows: scale must be fp32 [1] or [N]");
  if (grad) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->stride(1) == 1 && grad->scalar_type() == logits.scalar_type(),
                "region_kl_rows: grad must be [N, C] in logits' dtype, unit class stride");
  }
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor* grad_ptr = grad ? &grad.value() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_kl_rows", [&] {
    if (targets.scalar_type() == at::kFloat) {
      region_kl_rows_kernel<scalar_t, float>(logits, targets, selected, scale, loss, grad_ptr);
    } else {
      region_kl_rows_kernel<scalar_t, scalar_t>(logits, targets, selected, scale, loss, grad_ptr);
    }
  });
  return loss;
}

FASTVL_REGISTER_OP("region_kl_rows", [](pybind11::module_& m) {
  m.def("region_kl_rows", &region_kl_rows, "Per-row KL(targets || softmax(logits)) and its scaled gradient",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("selected"), pybind11::arg("scale"),
        pybind11::arg("grad") = pybind11::none());
});

}  // namespace
