// CPU row kernel of fastvl.ops.linear_cross_entropy: cross-entropy of one logits row against a hard
// label and its gradient (softmax(x) - onehot(label)) * scale. One task per row (at::parallel_for); each
// row is swept while it sits in cache: max, sum of exponentials, gradient. Ignored rows read nothing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "fastvl_ext.h"

#include "loss_math.h"

namespace {

using fastvl::exp_nonpositive;

constexpr int64_t kBlock = 512;

// One scored row: returns its cross-entropy against label and, if grad_row, writes
// (softmax(x) - onehot(label)) * scale (grad_row may be x). Cloned for AVX2 and the baseline ISA.
template <typename scalar_t>
__attribute__((target_clones("avx2", "default"))) float cross_entropy_row(const scalar_t* x, int64_t label,
                                                                           scalar_t* grad_row, int64_t classes,
                                                                           float row_scale) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t c = 0; c < classes; ++c) row_max = std::max(row_max, static_cast<float>(x[c]));
  // SIMD float sums over blocks of kBlock classes, blocks added in double (vocabularies of 64k).
  double sum_exp = 0.0;
  for (int64_t start = 0; start < classes; start += kBlock) {
    const int64_t stop = std::min(classes, start + kBlock);
    float block_exp = 0.f;
#pragma omp simd reduction(+ : block_exp)
    for (int64_t c = start; c < stop; ++c) block_exp += exp_nonpositive(static_cast<float>(x[c]) - row_max);
    sum_exp += block_exp;
  }
  const float log_sum_exp = static_cast<float>(std::log(sum_exp));
  const float label_logit = static_cast<float>(x[label]);  // read before grad may overwrite x
  if (grad_row) {
    const float log_norm = row_max + log_sum_exp;
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) {
      grad_row[c] = static_cast<scalar_t>(exp_nonpositive(static_cast<float>(x[c]) - log_norm) * row_scale);
    }
    grad_row[label] = static_cast<scalar_t>((exp_nonpositive(label_logit - log_norm) - 1.f) * row_scale);
  }
  return (row_max - label_logit) + log_sum_exp;
}

template <typename scalar_t>
void cross_entropy_rows_kernel(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                               const at::Tensor& scale, at::Tensor& loss, at::Tensor* grad) {
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const int64_t logits_stride = logits.stride(0);
  const int64_t scale_stride = scale.numel() == 1 ? 0 : 1;
  const scalar_t* logits_data = logits.data_ptr<scalar_t>();
  const int64_t* label_data = labels.data_ptr<int64_t>();
  const float* scale_data = scale.data_ptr<float>();
  float* loss_data = loss.data_ptr<float>();
  scalar_t* grad_data = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t grad_stride = grad ? grad->stride(0) : 0;

  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = label_data[row];
      scalar_t* grad_row = grad ? grad_data + row * grad_stride : nullptr;
      if (label == ignore_index) {
        loss_data[row] = 0.f;
        if (grad_row) std::fill(grad_row, grad_row + classes, scalar_t(0));
        continue;
      }
      loss_data[row] = cross_entropy_row(logits_data + row * logits_stride, label, grad_row, classes,
                                         scale_data[row * scale_stride]);
    }
  });
}

// logits [N, C] (fp32/fp16/bf16, unit class stride); labels int64 [N] in [0, C) or ignore_index; scale
// fp32 [1] or [N]; grad: None, or [N, C] in logits' dtype (may be logits itself). Returns fp32 [N] losses.
at::Tensor cross_entropy_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                              const at::Tensor& scale, std::optional<at::Tensor> grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "cross_entropy_rows: logits must be [N, C], unit class stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(), "cross_entropy_rows: labels must be contiguous int64 [N]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == logits.size(0)),
              "cross_entropy_rows: scale must be fp32 [1] or [N]");
  if (grad) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->stride(1) == 1 && grad->scalar_type() == logits.scalar_type(),
                "cross_entropy_rows: grad must be [N, C] in logits' dtype, unit class stride");
  }
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor* grad_ptr = grad ? &grad.value() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows", [&] {
    cross_entropy_rows_kernel<scalar_t>(logits, labels, ignore_index, scale, loss, grad_ptr);
  });
  return loss;
}

FASTVL_REGISTER_OP("cross_entropy_rows", [](pybind11::module_& m) {
  m.def("cross_entropy_rows", &cross_entropy_rows, "Per-row cross-entropy against hard labels and its scaled gradient",
        pybind11::arg("logits"), pybind11::arg("labels"), pybind11::arg("ignore_index"), pybind11::arg("scale"),
        pybind11::arg("grad") = pybind11::none());
});

}  // namespace
