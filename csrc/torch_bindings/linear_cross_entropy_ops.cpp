// Cross-entropy of a linear head (an LM's lm_head) without the [tokens, vocab] logits: the rows are taken a
// chunk at a time (about 8M logits, 32 MB in fp32), and each chunk's loss and gradients are computed before the
// next chunk's logits overwrite it. The usual path keeps the whole logits tensor, its log-softmax and their
// gradients (4 x 100 MB for SmolLM2 at 512 tokens); here one chunk exists at a time. The gradients are
// computed in the forward pass (when asked for) and scaled in backward: with respect to the hidden states,
// and, for a trained head (PEFT's modules_to_save=["lm_head"]), with respect to its weight and bias, summed
// over the chunks in float32.
//
// Built from ATen ops only, so one implementation serves CPU and CUDA (registered for both keys). It is
// numerically the path of a Hugging Face causal LM: logits in the input dtype (bf16 under autocast), loss
// in float32 (float64 for float64 input), mean over the labels that are not ignore_index.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace qlora::ops {
namespace {

// Whether t's current CUDA stream is capturing a graph (torch.cuda.graph, torch.compile's "reduce-overhead"):
// the label check's host sync is not allowed there.
bool capturing(const at::Tensor& t) {
#ifdef QLORA_WITH_CUDA
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
#else
  (void)t;
  return false;
#endif
}

constexpr int64_t kChunkLogits = int64_t(1) << 23;
// With the head's gradient, each chunk also writes a [vocab, hidden_size] partial product and adds it into the
// float32 sum: about 12 bytes of memory traffic per weight element for 2 * rows flops per weight element. At
// 1024 rows or more per chunk that traffic stays below the GEMM's time on a GPU (H100: ~240 flop per byte).
constexpr int64_t kMinHeadGradRows = 1024;

void check_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& labels, int64_t chunk_rows) {
  const at::ScalarType t = hidden.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "hidden must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be 2-D [tokens, hidden_size], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1),
                    "weight must be [vocab, hidden_size] with hidden_size = ", hidden.size(1), ", got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight must have at least one row (vocab > 0)");
  TORCH_CHECK_TYPE(weight.scalar_type() == t, "weight must have hidden's dtype ", t, ", got ",
                   weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "weight must be on hidden's device ", hidden.device(), ", got ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [vocab] = [",
                      weight.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == t, "bias must have hidden's dtype ", t, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), "bias must be on hidden's device ", hidden.device(), ", got ",
                bias->device());
  }
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must be 1-D [tokens] = [",
                    hidden.size(0), "], got shape ", labels.sizes());
  TORCH_CHECK(labels.device() == hidden.device(), "labels must be on hidden's device ", hidden.device(), ", got ",
              labels.device());
  TORCH_CHECK_VALUE(chunk_rows >= 0, "chunk_rows must be >= 0 (0: automatic), got ", chunk_rows);
}

// Returns (mean loss, d/d(hidden), d/d(weight), d/d(bias)) of the mean loss. d/d(hidden) is in hidden's dtype
// (float32 for float16 hidden, below), [0, hidden_size] unless compute_grad; d/d(weight) and d/d(bias) are in
// the loss's dtype (float32, float64 for float64 input), [0, hidden_size] and [0] unless compute_head_grad
// (and, for the bias, one is given).
//
// float16: (softmax - onehot) / count is below float16's range for a large vocabulary and batch (3e-5 / 4096
// flushes to zero), where the usual path's GEMMs see it multiplied by a GradScaler's scale first; here the
// scale comes only in backward. So for float16 the GEMM inputs are (softmax - onehot) itself (|x| <= 1; the
// products stay below 2 max|W|), the gradients are kept in float32 and divided by count there, and the
// head's gradient is taken in float32 (its per-token sums could exceed float16's range).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, bool compute_grad, int64_t chunk_rows,
    bool compute_head_grad) {
  check_args(hidden, weight, bias, labels, chunk_rows);
  const int64_t tokens = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor valid = labels.ne(ignore_index);
  // Out-of-range labels would index past the logits row: refuse them (one host sync per call; skipped while a
  // CUDA graph is captured, where gather's own device-side bounds check remains).
  if (!capturing(labels)) {
    const bool bad = valid.logical_and(labels.lt(0).logical_or(labels.ge(vocab))).any().item<bool>();
    TORCH_CHECK_VALUE(!bad, "labels must be in [0, vocab = ", vocab, ") or ignore_index (", ignore_index, ")");
  }
  const at::Tensor safe_labels = labels.masked_fill(valid.logical_not(), 0);
  const at::Tensor valid_f = valid.to(acc);
  const at::Tensor count = valid_f.sum();
  // Every valid row's gradient is scaled by 1/count in float32, before the cast to the input dtype (as the
  // usual path does); with no valid label the loss is NaN (0/0, as torch's mean cross-entropy) and the
  // gradient zero.
  const bool fp16 = hidden.scalar_type() == at::kHalf;
  const at::Tensor inv_count = count.clamp_min(1).reciprocal();
  const at::Tensor row_scale = fp16 ? valid_f : valid_f * inv_count;
  at::Tensor loss_sum = at::zeros({}, hidden.options().dtype(acc));
  const auto grad_options = fp16 ? hidden.options().dtype(acc) : hidden.options();
  at::Tensor grad = compute_grad ? at::empty(hidden.sizes(), grad_options)
                                 : at::empty({0, hidden.size(1)}, grad_options);
  const auto acc_options = hidden.options().dtype(acc);
  at::Tensor grad_weight = compute_head_grad ? at::zeros({vocab, hidden.size(1)}, acc_options)
                                             : at::empty({0, hidden.size(1)}, acc_options);
  at::Tensor grad_bias = compute_head_grad && bias.has_value() ? at::zeros({vocab}, acc_options)
                                                               : at::empty({0}, acc_options);
  // A 16-bit head's gradient: each chunk's product in the input dtype (the usual path's GEMM, accumulating in
  // float32 inside), rounded once per chunk into this buffer and summed in float32.
  at::Tensor partial;
  if (compute_head_grad && hidden.scalar_type() != acc && !fp16) {
    partial = at::empty({vocab, hidden.size(1)}, hidden.options());
  }
  const at::Tensor weight_t = weight.t();
  int64_t rows = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kChunkLogits / vocab);
  if (compute_head_grad && chunk_rows == 0) rows = std::max(rows, kMinHeadGradRows);
  for (int64_t r0 = 0; r0 < tokens; r0 += rows) {
    const int64_t n = std::min(rows, tokens - r0);
    const at::Tensor h = hidden.narrow(0, r0, n);
    at::Tensor logits = bias.has_value() ? at::addmm(*bias, h, weight_t) : at::mm(h, weight_t);
    if (logits.scalar_type() != acc) logits = logits.to(acc);
    const at::Tensor label = safe_labels.narrow(0, r0, n).unsqueeze(1);
    const at::Tensor scale = row_scale.narrow(0, r0, n).unsqueeze(1);
    const at::Tensor row_max = at::amax(logits, {1}, /*keepdim=*/true);
    const at::Tensor target = logits.gather(1, label);
    logits.sub_(row_max).exp_();  // in place: the chunk becomes exp(logit - max)
    const at::Tensor sum_exp = logits.sum(1, /*keepdim=*/true);
    // -log softmax[label] = log(sum exp(logit - max)) + max - logit[label]
    loss_sum.add_((sum_exp.log().add_(row_max).sub_(target)).mul_(valid_f.narrow(0, r0, n).unsqueeze(1)).sum());
    if (compute_grad || compute_head_grad) {
      // d loss / d logits = (softmax - onehot(label)) / count (float16: without the 1/count), zero on
      // ignored rows
      logits.mul_(scale / sum_exp);
      logits.scatter_add_(1, label, scale.neg());
      const at::Tensor grad_logits = logits.to(hidden.scalar_type());  // (no copy when already that dtype)
      if (compute_grad) {
        at::Tensor grad_rows = grad.narrow(0, r0, n);  // contiguous rows: the GEMM writes them in place
        if (fp16) {
          grad_rows.copy_(at::mm(grad_logits, weight));
        } else {
          at::mm_out(grad_rows, grad_logits, weight);
        }
      }
      if (compute_head_grad) {
        if (partial.defined()) {
          at::mm_out(partial, grad_logits.t(), h);
          grad_weight.add_(partial);
        } else {
          grad_weight.addmm_(logits.t(), fp16 ? h.to(acc) : h);
        }
        if (bias.has_value()) grad_bias.add_(logits.sum(0));
      }
    }
  }
  if (fp16) {   // the 1/count left out above, in float32
    if (compute_grad) grad.mul_(inv_count);
    if (compute_head_grad) {
      grad_weight.mul_(inv_count);
      grad_bias.mul_(inv_count);
    }
  }
  return {loss_sum / count, grad, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // Mean cross-entropy of softmax(hidden @ weight^T + bias) against labels, rows whose label is ignore_index
  // left out, without materializing the logits; with compute_grad, also its gradient with respect to hidden
  // (in hidden's dtype, float32 for float16; [0, hidden_size] otherwise), and with compute_head_grad those with
  // respect to weight and bias (in the loss's dtype; [0, hidden_size] and [0] otherwise). hidden
  // [tokens, hidden_size] float32/float64/float16/bfloat16, weight [vocab, hidden_size] and bias [vocab] of the
  // same dtype, labels [tokens] int64; chunk_rows 0 picks the chunk size (rows per chunk) itself.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
        "bool compute_grad, int chunk_rows=0, bool compute_head_grad=False) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }
TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }

}  // namespace qlora::ops
