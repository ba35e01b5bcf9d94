// sparsepo_lite::token_stats: chunked lm_head + log-softmax + label log-prob +
// KL to a reference, with the gradient factor G = g W formed in the forward.
//
// The chunk loop is device-generic ATen (GEMMs through at::mm); only the row
// pass between the GEMMs is per device (cpu/row_pass_cpu.cpp, cuda/row_pass.cu).
// Memory: two [chunk, V] buffers at most, plus the [N, H] gradient factor.
// GEMMs: 1 per chunk (+1 with an exact reference), +1 when a gradient is needed.
// Python wrappers (sparsepo_lite/token_stats.py) add the autograd formula and
// the fake implementation.

#include <c10/core/DeviceGuard.h>
#include <sstream>
#include <string>
#include <torch/extension.h>

#include "row_pass.h"

namespace sparsepo_lite {

#ifdef WITH_CUDA
// cuda/row_pass_cuda.cpp: launches on the current CUDA stream.
void row_pass_cuda_current_stream(const RowPassParams<float>& p);
void row_pass_cuda_current_stream(const RowPassParams<double>& p);
#endif

namespace {

using at::Tensor;

std::pair<int64_t, int64_t> value_range(const Tensor& t) {
  auto mm = at::aminmax(t);
  auto both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kLong).cpu();
  return {both[0].item<int64_t>(), both[1].item<int64_t>()};
}

void check_range(const Tensor& t, int64_t hi, const char* name, const char* bound) {
  if (t.numel() == 0) return;
  auto [lo, top] = value_range(t);
  TORCH_CHECK_VALUE(lo >= 0 && top < hi, name, " must lie in [0, ", bound, ") with ",
                    bound, " = ", hi, "; got values in [", lo, ", ", top, "]");
}

// Where the first flagged token sits, for an error message: its row of the [N, ...] inputs, its
// sequence (seq_ids: the batch row it came from) and how many tokens are flagged. bad: [N] bool.
std::string first_at(const Tensor& bad, const Tensor& seq_ids) {
  const int64_t row = bad.nonzero()[0][0].item<int64_t>();
  const int64_t count = bad.sum().item<int64_t>();
  std::ostringstream s;
  s << " (first at token " << row << " of sequence " << seq_ids[row].item<int64_t>() << "; "
    << count << (count > 1 ? " tokens" : " token") << " in all)";
  return s.str();
}

void check_topk(const Tensor& ids, const Tensor& logp, const Tensor& seq_ids, int64_t V) {
  check_range(ids, V, "topk ids", "V");
  if (ids.numel() == 0) return;
  const int64_t K = ids.size(1);
  TORCH_CHECK_VALUE(K <= V, "top-k reference has k = ", K, " ids per token but V = ", V);
  if (K > 1) {
    auto sorted = std::get<0>(ids.sort(1));
    auto dup = (sorted.narrow(1, 1, K - 1) == sorted.narrow(1, 0, K - 1)).any(1);
    TORCH_CHECK_VALUE(!dup.any().item<bool>(), "topk ids must be distinct within each token",
                      first_at(dup, seq_ids));
  }
  const Tensor nan = logp.isnan().any(1);
  TORCH_CHECK_VALUE(!nan.any().item<bool>(), "topk log-probs contain NaN", first_at(nan, seq_ids));
  // 16-bit storage rounds log-probs near 0 but never above it by much. One mask decides and
  // locates: a separate double comparison could fail where the mask, in logp's dtype, is empty.
  const Tensor above = (logp > kLogProbSlack).any(1);
  TORCH_CHECK_VALUE(!above.any().item<bool>(),
                    "topk log-probs must be log-probabilities (<= 0); found ",
                    logp.max().item<double>(), first_at(above, seq_ids));
  // k probabilities of one distribution: their sum is at most 1 (up to 16-bit rounding)
  const Tensor mass = at::logsumexp(logp.to(at::kFloat), {1}) > kTopKLogMassSlack;
  TORCH_CHECK_VALUE(!mass.any().item<bool>(),
                    "topk log-probs hold more than probability 1 for a token", first_at(mass, seq_ids));
}

// The reference's log-prob of each label: finite (the label is a token of the data, which the
// reference gives probability > 0) and a log-probability.
void check_label(const Tensor& label_logp, const Tensor& seq_ids) {
  const Tensor bad = at::isfinite(label_logp).logical_not() | (label_logp > kLogProbSlack);
  TORCH_CHECK_VALUE(!bad.any().item<bool>(),
                    "reference label log-probs must be finite log-probabilities (<= 0)",
                    first_at(bad, seq_ids));
}

// Tail samples: ids in [0, V) outside their token's top-k (they are draws from the reference's
// tail), finite log-probabilities.
void check_tail(const Tensor& ids, const Tensor& tail_ids, const Tensor& tail_logp,
                const Tensor& seq_ids, int64_t V) {
  check_range(tail_ids, V, "tail ids", "V");
  if (tail_ids.numel() == 0) return;
  const Tensor sorted = std::get<0>(ids.to(at::kLong).sort(1));
  const Tensor t = tail_ids.to(at::kLong);
  const Tensor pos = at::searchsorted(sorted, t).clamp_max(sorted.size(1) - 1);
  const Tensor hit = (sorted.gather(1, pos) == t).any(1);
  TORCH_CHECK_VALUE(!hit.any().item<bool>(),
                    "tail ids must lie outside the top-k ids of their token (they are samples of "
                    "the reference's tail)",
                    first_at(hit, seq_ids));
  const Tensor inf = at::isfinite(tail_logp).logical_not().any(1);
  TORCH_CHECK_VALUE(!inf.any().item<bool>(),
                    "tail log-probs must be finite (a sampled token has reference probability > 0)",
                    first_at(inf, seq_ids));
  const Tensor above = (tail_logp > kLogProbSlack).any(1);
  TORCH_CHECK_VALUE(!above.any().item<bool>(),
                    "tail log-probs must be log-probabilities (<= 0); found ",
                    tail_logp.max().item<double>(), first_at(above, seq_ids));
}

// out[n, V] (acc dtype) = h[n, H] @ W[V, H]^T; the GEMM runs in h's dtype.
void project(Tensor& out, const Tensor& h, const Tensor& W) {
  if (h.scalar_type() == out.scalar_type()) {
    at::mm_out(out, h, W.t());
  } else {
    out.copy_(at::mm(h, W.t()));
  }
}

template <typename T>
void run_row_pass(const RowPassParams<T>& p, const Tensor& like) {
  if (like.is_cuda()) {
#ifdef WITH_CUDA
    row_pass_cuda_current_stream(p);
#else
    TORCH_CHECK(false, "sparsepo_lite._C was built without CUDA");
#endif
  } else {
    row_pass_cpu(p);
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> token_stats(
    const Tensor& hidden, const Tensor& weight, const Tensor& labels, const Tensor& seq_ids,
    int64_t num_seqs, const Tensor& logp_weight, const Tensor& kl_weight, int64_t ref_kind,
    const std::optional<Tensor>& ref_hidden, const std::optional<Tensor>& ref_weight,
    const std::optional<Tensor>& topk_ids, const std::optional<Tensor>& topk_logp,
    const std::optional<Tensor>& tail_ids, const std::optional<Tensor>& tail_logp,
    const std::optional<Tensor>& ref_label_logp, int64_t chunk_size, bool need_grad) {
  const c10::OptionalDeviceGuard device_guard(hidden.device());
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
                    "hidden [N, H] and weight [V, H] disagree: ", hidden.sizes(), " vs ",
                    weight.sizes());
  TORCH_CHECK_TYPE(hidden.scalar_type() == weight.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK_VALUE(ref_kind >= kRefNone && ref_kind <= kRefExact, "unknown ref_kind ", ref_kind);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK_VALUE(labels.numel() == N && seq_ids.numel() == N && logp_weight.numel() == N &&
                        kl_weight.numel() == N,
                    "labels, seq_ids, logp_weight and kl_weight need N = ", N, " entries");
  check_range(labels, V, "labels", "V");
  check_range(seq_ids, num_seqs, "seq_ids", "num_seqs");
  const bool exact = ref_kind == kRefExact, topk = ref_kind == kRefTopK;
  if (exact) {
    TORCH_CHECK_VALUE(ref_hidden && ref_weight, "exact reference needs ref_hidden and ref_weight");
    TORCH_CHECK_VALUE(ref_hidden->dim() == 2 && ref_hidden->size(0) == N &&
                          ref_weight->dim() == 2 && ref_weight->size(0) == V &&
                          ref_weight->size(1) == ref_hidden->size(1),
                      "exact reference shapes: hidden ", ref_hidden->sizes(), ", weight ",
                      ref_weight->sizes(), " (need [N, H'] and [V, H'])");
  }
  if (topk) {
    TORCH_CHECK_VALUE(topk_ids && topk_logp, "top-k reference needs ids and log-probs");
    TORCH_CHECK_VALUE(topk_ids->dim() == 2 && topk_ids->size(0) == N &&
                          topk_logp->sizes() == topk_ids->sizes(),
                      "top-k ids ", topk_ids->sizes(), " and log-probs ", topk_logp->sizes(),
                      " must both be [N, k]");
    check_topk(*topk_ids, *topk_logp, seq_ids, V);
    TORCH_CHECK_VALUE(tail_ids.has_value() == tail_logp.has_value(),
                      "tail ids and tail log-probs come together");
    if (tail_ids) {
      TORCH_CHECK_VALUE(tail_ids->dim() == 2 && tail_ids->size(0) == N &&
                            tail_logp->sizes() == tail_ids->sizes(),
                        "tail ids ", tail_ids->sizes(), " and log-probs ", tail_logp->sizes(),
                        " must both be [N, m]");
      TORCH_CHECK_VALUE(tail_ids->size(1) == 0 || topk_ids->size(1) < V,
                        "a top-k reference with k = V has no tail to sample from (m must be 0)");
      check_tail(*topk_ids, *tail_ids, *tail_logp, seq_ids, V);
    }
  }
  if (ref_kind == kRefLabel || topk) {
    TORCH_CHECK_VALUE(ref_label_logp && ref_label_logp->numel() == N,
                      "reference label log-probs need N = ", N, " entries");
    if (N > 0) check_label(ref_label_logp->reshape({N}), seq_ids);
  }

  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto fopts = hidden.options().dtype(acc);
  const Tensor lab = labels.to(at::kLong).contiguous();
  const Tensor a = logp_weight.to(acc).contiguous();
  const Tensor b = kl_weight.to(acc).contiguous();
  Tensor logp = at::empty({N}, fopts);
  Tensor ref_logp = exact ? at::empty({N}, fopts)
                    : (ref_kind == kRefNone)
                        ? at::empty({0}, fopts)
                        : ref_label_logp->to(acc, false, /*copy=*/true).contiguous();
  Tensor kl = at::empty({(exact || topk) ? N : 0}, fopts);
  Tensor grad_factor = at::empty({need_grad ? N : 0, H}, hidden.options());

  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(chunk_size, N));
  // Exact reference: policy rows then reference rows of one [2n, V] buffer. When the reference
  // shares the policy's head (QLoRA: same base, adapter off) one GEMM over the stacked hidden
  // states streams the [V, H] head once per chunk instead of twice, at twice the rows.
  Tensor buf = at::empty({exact ? 2 * chunk : chunk, V}, fopts);
  const bool shared_head = exact && ref_weight->is_same(weight);
  Tensor tids, tlp, sids, slp, scratch;
  int64_t K = 0, M = 0;
  if (topk) {
    tids = topk_ids->to(at::kLong).contiguous();
    tlp = topk_logp->to(acc).contiguous();
    K = tids.size(1);
    if (tail_ids && tail_ids->size(1) > 0) {
      sids = tail_ids->to(at::kLong).contiguous();
      slp = tail_logp->to(acc).contiguous();
      M = sids.size(1);
    }
    scratch = at::empty({chunk, K + M}, fopts);
  }

  AT_DISPATCH_FLOATING_TYPES(acc, "token_stats", [&] {
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      Tensor z = buf.narrow(0, 0, n);
      Tensor zr;
      if (shared_head) {
        Tensor both = buf.narrow(0, 0, 2 * n);
        project(both, at::cat({hidden.narrow(0, start, n), ref_hidden->narrow(0, start, n)}), weight);
        zr = buf.narrow(0, n, n);
      } else {
        project(z, hidden.narrow(0, start, n), weight);
        if (exact) {
          zr = buf.narrow(0, n, n);
          project(zr, ref_hidden->narrow(0, start, n), *ref_weight);
        }
      }
      RowPassParams<scalar_t> p{};
      p.logits = z.data_ptr<scalar_t>();
      p.ref_logits = exact ? zr.data_ptr<scalar_t>() : nullptr;
      p.rows = n;
      p.vocab = V;
      p.labels = lab.data_ptr<int64_t>() + start;
      p.logp_weight = a.data_ptr<scalar_t>() + start;
      p.kl_weight = b.data_ptr<scalar_t>() + start;
      p.ref_kind = static_cast<int>(ref_kind);
      p.topk_ids = topk ? tids.data_ptr<int64_t>() + start * K : nullptr;
      p.topk_logp = topk ? tlp.data_ptr<scalar_t>() + start * K : nullptr;
      p.k = K;
      p.tail_ids = M ? sids.data_ptr<int64_t>() + start * M : nullptr;
      p.tail_logp = M ? slp.data_ptr<scalar_t>() + start * M : nullptr;
      p.m = M;
      p.topk_scratch = topk ? scratch.data_ptr<scalar_t>() : nullptr;
      p.logp = logp.data_ptr<scalar_t>() + start;
      p.ref_logp = exact ? ref_logp.data_ptr<scalar_t>() + start : nullptr;
      p.kl = (exact || topk) ? kl.data_ptr<scalar_t>() + start : nullptr;
      p.write_grad = need_grad;
      run_row_pass(p, z);
      if (need_grad) {
        Tensor gc = grad_factor.narrow(0, start, n);
        at::mm_out(gc, z.scalar_type() == weight.scalar_type() ? z : z.to(weight.scalar_type()),
                   weight);
      }
    }
  });

  Tensor contrib = a * logp;
  if (exact || topk) contrib.add_(b * kl);
  Tensor seq_sums = at::zeros({num_seqs}, fopts).index_add_(0, seq_ids.to(at::kLong), contrib);
  return {seq_sums, logp, ref_logp, kl, grad_factor};
}

TORCH_LIBRARY(sparsepo_lite, m) {
  m.def(
      "token_stats(Tensor hidden, Tensor weight, Tensor labels, Tensor seq_ids, int num_seqs, "
      "Tensor logp_weight, Tensor kl_weight, int ref_kind, Tensor? ref_hidden, "
      "Tensor? ref_weight, Tensor? topk_ids, Tensor? topk_logp, Tensor? tail_ids, Tensor? tail_logp, "
      "Tensor? ref_label_logp, "
      "int chunk_size, bool need_grad) -> "
      "(Tensor seq_sums, Tensor logp, Tensor ref_logp, Tensor kl, Tensor grad_factor)");
}

TORCH_LIBRARY_IMPL(sparsepo_lite, CPU, m) { m.impl("token_stats", &token_stats); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(sparsepo_lite, CUDA, m) { m.impl("token_stats", &token_stats); }
#endif

}  // namespace sparsepo_lite

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsepo_lite compiled ops (registered as torch.ops.sparsepo_lite.*)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
