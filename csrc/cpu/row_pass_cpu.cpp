// CPU row pass of chunked_token_stats: one task per token row, parallel over
// rows with ATen's OpenMP thread pool. See row_pass.h for the contract.
//
// Each row takes two sweeps over the vocabulary: a max, then one exp per
// logit whose result (the unnormalised probability) is written back in place,
// so the gradient sweep needs no second exp. Sums run in double: the top-k
// tail mass is a difference of two such sums and must not cancel in float.

#include "../row_pass.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>

namespace sparsepo_lite {
namespace {

template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t v = 0; v < n; ++v) m = std::max(m, x[v]);
  return m;
}

// exp(x - m) written back into x (when `store`), returning the sum in double.
template <typename T>
double exp_shift_sum(T* x, int64_t n, T m, bool store) {
  double s = 0.0;
  if (store) {
    for (int64_t v = 0; v < n; ++v) {
      const T e = std::exp(x[v] - m);
      x[v] = e;
      s += e;
    }
  } else {
    for (int64_t v = 0; v < n; ++v) s += std::exp(x[v] - m);
  }
  return s;
}

template <typename T>
void row_exact(const RowPassParams<T>& P, int64_t i) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  T* zr = P.ref_logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y], zry = zr[y];
  const T m = row_max(z, V), mr = row_max(zr, V);

  // One sweep: both partition functions and t = sum_v e'_v (z'_v - z_v), so
  // that KL = t / s' + lse - lse'. Both lse are double, so the difference
  // does not cancel when the two distributions are close.
  double s = 0.0, sr = 0.0, t = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const T e = std::exp(z[v] - m);
    const T er = std::exp(zr[v] - mr);
    s += e;
    sr += er;
    t += static_cast<double>(er) * (static_cast<double>(zr[v]) - z[v]);
    if (P.write_grad) {
      z[v] = e;
      zr[v] = er;
    }
  }
  const double lse = m + std::log(s), lser = mr + std::log(sr);
  P.logp[i] = static_cast<T>(zy - lse);
  P.ref_logp[i] = static_cast<T>(zry - lser);
  P.kl[i] = static_cast<T>(t / sr + lse - lser);

  if (P.write_grad) {
    // g = -a p + b (p - q)
    const T cp = static_cast<T>((b - a) / s), cq = static_cast<T>(-b / sr);
    for (int64_t v = 0; v < V; ++v) z[v] = cp * z[v] + cq * zr[v];
    z[y] += static_cast<T>(a);
  }
}

template <typename T>
void row_topk(const RowPassParams<T>& P, int64_t i) {
  const int64_t V = P.vocab, K = P.k, M = P.m;
  T* z = P.logits + i * V;
  const int64_t* ids = P.topk_ids + i * K;
  const T* lq = P.topk_logp + i * K;
  T* z_top = P.topk_scratch + i * (K + M);  // policy logits of the top-k ids
  T* z_smp = z_top + K;                      // ... and of the tail samples
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y];
  for (int64_t j = 0; j < K; ++j) z_top[j] = z[ids[j]];
  for (int64_t j = 0; j < M; ++j) z_smp[j] = z[P.tail_ids[i * M + j]];
  const T m = row_max(z, V);
  const double s = exp_shift_sum(z, V, m, P.write_grad);
  const double lse = m + std::log(s);

  // exp(z - m) of the top-k ids uses the same expression as the full sweep,
  // so the tail sum s - s_top cancels only identical terms.
  double s_top = 0.0, q_top = 0.0, kl = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    s_top += std::exp(z_top[j] - m);
    const double q = std::exp(static_cast<double>(lq[j]));
    if (q > 0.0) {  // q = 0 contributes nothing (and lq = -inf would give NaN)
      q_top += q;
      kl += q * (static_cast<double>(lq[j]) - (static_cast<double>(z_top[j]) - lse));
    }
  }
  // Tail bucket: the reference's missing mass r against the policy's mass
  // outside the top-k. An empty tail (k == V) has r = 0 by definition.
  const double tail = std::max(s - s_top, 0.0);
  const double r = (K == V) ? 0.0 : std::max(0.0, 1.0 - q_top);
  if (r > 0.0) kl += r * (std::log(r) - (std::log(std::max(tail, DBL_MIN)) - std::log(s)));
  // Sampled tail: r KL(q~ || p~) estimated as r mean_j[(rho_j - 1) - log rho_j], with
  // log rho_j = log(p(v_j) / s_tail) - log(q(v_j) / r); c = r mean_j(rho_j - 1) enters the gradient.
  double c = 0.0;
  const bool sampled = M > 0 && r > 0.0 && tail > 0.0;
  if (sampled) {
    const double log_tail = std::log(tail), log_r = std::log(r);
    double est = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      const double log_rho = (static_cast<double>(z_smp[j]) - m) - log_tail + log_r -
                             static_cast<double>(P.tail_logp[i * M + j]);
      const double rho = std::exp(log_rho);
      est += (rho - 1.0) - log_rho;
      c += rho - 1.0;
    }
    kl += r * est / M;
    c *= r / M;
  }
  P.logp[i] = static_cast<T>(zy - lse);
  P.kl[i] = static_cast<T>(kl);

  if (P.write_grad) {
    // dKL/dz_v = (Q + r) p_v - q_v                       for v in the top-k,
    //          = (Q + r) p_v - (r + c) e_v / tail          otherwise  (e_v = exp(z_v - m)),
    //            + (r / m)(rho_j - 1) for each sample v_j = v.
    const double c1 = (-a + b * (q_top + r)) / s;
    const double c2 = (r > 0.0 && tail > 0.0) ? b * (r + c) / tail : 0.0;
    const T cv = static_cast<T>(c1 - c2);
    for (int64_t v = 0; v < V; ++v) z[v] *= cv;
    // Assign (not add) the top-k entries so that a tiny tail cannot cancel them.
    for (int64_t j = 0; j < K; ++j) {
      const double q = std::exp(static_cast<double>(lq[j]));
      z[ids[j]] = static_cast<T>(c1 * std::exp(z_top[j] - m) - b * q);
    }
    if (sampled) {
      const double log_tail = std::log(tail), log_r = std::log(r);
      for (int64_t j = 0; j < M; ++j) {
        const double log_rho = (static_cast<double>(z_smp[j]) - m) - log_tail + log_r -
                               static_cast<double>(P.tail_logp[i * M + j]);
        z[P.tail_ids[i * M + j]] += static_cast<T>(b * r * (std::exp(log_rho) - 1.0) / M);
      }
    }
    z[y] += static_cast<T>(a);
  }
}

template <typename T>
void row_label(const RowPassParams<T>& P, int64_t i) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i];
  const T zy = z[y];
  const T m = row_max(z, V);
  const double s = exp_shift_sum(z, V, m, P.write_grad);
  P.logp[i] = static_cast<T>(zy - (m + std::log(s)));
  if (P.write_grad) {
    const T c = static_cast<T>(-a / s);
    for (int64_t v = 0; v < V; ++v) z[v] *= c;
    z[y] += static_cast<T>(a);
  }
}

template <typename T>
void row_pass_impl(const RowPassParams<T>& P) {
  at::parallel_for(0, P.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      switch (P.ref_kind) {
        case kRefExact: row_exact(P, i); break;
        case kRefTopK: row_topk(P, i); break;
        default: row_label(P, i); break;
      }
    }
  });
}

}  // namespace

void row_pass_cpu(const RowPassParams<float>& p) { row_pass_impl(p); }
void row_pass_cpu(const RowPassParams<double>& p) { row_pass_impl(p); }

}  // namespace sparsepo_lite
