// The fused per-row pass of chunked_token_stats, shared by the CPU and CUDA
// implementations. Plain C++ with raw pointers only, so that the CUDA sources
// compile with nvcc alone (no torch headers) on machines without a GPU.
//
// For one chunk of `rows` tokens, `logits` holds z = W h  [rows, vocab] in the
// accumulation type T (float, or double for tests). Per row the pass computes
//   logp     = z[y] - logsumexp(z)
//   kl       = KL(q || p) against the reference distribution q (ref_kind >= 2); with a
//              top-k reference and m sampled tail tokens, the bucket KL plus the unbiased
//              tail correction r mean_j[(rho_j - 1) - log rho_j]
//   ref_logp = log q[y]                                        (ref_kind == 3)
// and, when write_grad is set, overwrites the row of `logits` with
//   g = a (onehot(y) - p) + b dKL/dz
// so that the caller's single GEMM g W gives d(a logp + b kl)/dh.
#pragma once

#include <cstdint>

namespace sparsepo_lite {

// How far stored reference log-probs may sit past what they must be, for 16-bit rounding: above 0
// (each log-prob), and above log 1 for the log of a token's top-k mass (bfloat16 rounds a flat
// top-k's equal log-probs all one way: up to 4% more mass). Mirrored in sparsepo_lite/ops/kinds.py
// (a test compares them).
constexpr double kLogProbSlack = 1e-2;
constexpr double kTopKLogMassSlack = 5e-2;

// Where the reference distribution comes from. Values are part of the op's
// schema (the `ref_kind` int argument): keep them in sync with
// RefKind in sparsepo_lite/ops/kinds.py (a test compares them).
enum RefKind : int {
  kRefNone = 0,   // no reference: logp only
  kRefLabel = 1,  // reference label log-probs only: no KL
  kRefTopK = 2,   // cached top-k log-probs + one tail bucket
  kRefExact = 3,  // reference logits from reference hidden states
};

template <typename T>
struct RowPassParams {
  T* logits;             // [rows, vocab] policy logits in, g out (if write_grad)
  T* ref_logits;         // [rows, vocab] reference logits (exact) or nullptr;
                         // may be overwritten (scratch)
  int64_t rows;
  int64_t vocab;
  const int64_t* labels;       // [rows] in [0, vocab)
  const T* logp_weight;        // [rows] a_t
  const T* kl_weight;          // [rows] b_t
  int ref_kind;
  const int64_t* topk_ids;     // [rows, k] distinct ids in [0, vocab) (top-k)
  const T* topk_logp;          // [rows, k] reference log-probs of those ids
  int64_t k;
  const int64_t* tail_ids;     // [rows, m] ids sampled from the reference's tail (outside the
                               // row's top-k; repeats allowed) or nullptr when m == 0
  const T* tail_logp;          // [rows, m] their reference log-probs log q(v)
  int64_t m;
  T* topk_scratch;             // [rows, k + m] workspace (top-k): the policy logits of the
                               // top-k ids, then of the tail samples
  T* logp;                     // [rows] out
  T* ref_logp;                 // [rows] out (exact only)
  T* kl;                       // [rows] out (top-k and exact)
  bool write_grad;
};

void row_pass_cpu(const RowPassParams<float>& p);
void row_pass_cpu(const RowPassParams<double>& p);

// Defined in cuda/row_pass.cu; `stream` is a cudaStream_t.
void row_pass_cuda(const RowPassParams<float>& p, void* stream);
void row_pass_cuda(const RowPassParams<double>& p, void* stream);

}  // namespace sparsepo_lite
