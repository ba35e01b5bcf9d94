// C entry points (for ctypes) into csrc/cuda/row_pass.cu compiled against the CPU emulation in
// cuda_runtime.h beside this file: the real kernel body, launched on std::threads.
#include "../../csrc/row_pass.h"

namespace {

template <typename T>
void run(T* logits, T* ref_logits, int64_t rows, int64_t vocab, const int64_t* labels, const T* a,
         const T* b, int ref_kind, const int64_t* topk_ids, const T* topk_logp, int64_t k,
         const int64_t* tail_ids, const T* tail_logp, int64_t m, T* scratch, T* logp, T* ref_logp, T* kl,
         int write_grad) {
  sparsepo_lite::RowPassParams<T> p{};
  p.logits = logits;
  p.ref_logits = ref_logits;
  p.rows = rows;
  p.vocab = vocab;
  p.labels = labels;
  p.logp_weight = a;
  p.kl_weight = b;
  p.ref_kind = ref_kind;
  p.topk_ids = topk_ids;
  p.topk_logp = topk_logp;
  p.k = k;
  p.tail_ids = tail_ids;
  p.tail_logp = tail_logp;
  p.m = m;
  p.topk_scratch = scratch;
  p.logp = logp;
  p.ref_logp = ref_logp;
  p.kl = kl;
  p.write_grad = write_grad != 0;
  sparsepo_lite::row_pass_cuda(p, nullptr);
}

}  // namespace

#define ENTRY(NAME, T)                                                                          \
  extern "C" void NAME(T* logits, T* ref_logits, int64_t rows, int64_t vocab,                  \
                       const int64_t* labels, const T* a, const T* b, int ref_kind,            \
                       const int64_t* topk_ids, const T* topk_logp, int64_t k,                 \
                       const int64_t* tail_ids, const T* tail_logp, int64_t m, T* scratch,      \
                       T* logp, T* ref_logp, T* kl, int write_grad) {                           \
    run<T>(logits, ref_logits, rows, vocab, labels, a, b, ref_kind, topk_ids, topk_logp, k,    \
           tail_ids, tail_logp, m, scratch, logp, ref_logp, kl, write_grad);                   \
  }

ENTRY(row_pass_emu_f32, float)
ENTRY(row_pass_emu_f64, double)
