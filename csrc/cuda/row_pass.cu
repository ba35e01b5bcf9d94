// CUDA row pass of chunked_token_stats: one thread block per token row.
// Same contract as cpu/row_pass_cpu.cpp (see row_pass.h); the arithmetic differs in how the
// vocabulary is swept, because here every sweep is a trip to HBM (a row of V = 128k fp32 logits
// is 512 KB and a chunk's rows do not stay in L2):
//   exact / label: ONE read sweep with an online max and sum per thread (the running sum is
//     rescaled when the running max grows), merged across the block; then one read-write sweep
//     that recomputes exp and writes g in place. 2 reads + 1 write per logit instead of the
//     3 reads + 2 writes of max / exp-and-store / g sweeps.
//   top-k: a max sweep, a sum sweep with the block's max, then the g sweep. The tail mass
//     s - s_top must cancel only identical terms (both exp(z - m) with the same m), which an
//     online sum with per-thread shifts would not give when the top-k hold almost all the mass.
// Sums in double, exps in T. Needs only the CUDA headers, so `nvcc -c` checks it on machines
// without a GPU or CUDA torch, and tests/cuda_emu runs it on CPU threads.

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../row_pass.h"

namespace sparsepo_lite {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

template <typename T>
__device__ T block_max(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const T out = shared[0];
  __syncthreads();  // `shared` is reused by the next reduction
  return out;
}

__device__ double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const double out = shared[0];
  __syncthreads();
  return out;
}

template <typename T>
__device__ T local_max(const T* x, int64_t n) {
  T m = -INFINITY;
  for (int64_t v = threadIdx.x; v < n; v += blockDim.x) m = fmax(m, x[v]);
  return m;
}

// Start of a running max: the lowest finite value, so that exp(x - m) is 0 (not NaN) for a -inf
// logit and a thread that saw no logits merges in with weight 0.
template <typename T>
__device__ __forceinline__ T lowest();
template <>
__device__ __forceinline__ float lowest<float>() { return -FLT_MAX; }
template <>
__device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }

// Running (max, sum of exp(x - max)) of one thread's logits.
template <typename T>
struct Online {
  T m;
  double s;
  __device__ Online() : m(lowest<T>()), s(0.0) {}
  __device__ __forceinline__ void push(T x) {
    if (x > m) {
      s = s * dev_exp(m - x) + 1.0;
      m = x;
    } else {
      s += dev_exp(x - m);
    }
  }
};

// Block-wide max of the threads' running maxima; `s` and the other sums given (all relative to
// this thread's max) are rescaled to it and summed over the block.
template <typename T>
__device__ T block_merge(T m, double* s, double* t, T* sh_t, double* sh_d) {
  const T mb = block_max(m, sh_t);
  const double f = exp(static_cast<double>(m) - static_cast<double>(mb));
  *s = block_sum(*s * f, sh_d);
  if (t != nullptr) *t = block_sum(*t * f, sh_d);
  return mb;
}

template <typename T>
__device__ void row_exact(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  const T* zr = P.ref_logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y], zry = zr[y];  // read before any thread overwrites the row
  // One sweep: both partition functions and t = sum_v e'_v (z'_v - z_v), so that
  // KL = t / s' + lse - lse' with both lse in double (no cancellation for close distributions).
  Online<T> pol;
  T mr = lowest<T>();
  double sr = 0.0, t = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const T zv = z[v], zrv = zr[v];
    pol.push(zv);
    if (zrv > mr) {
      const double f = dev_exp(mr - zrv);
      sr = sr * f + 1.0;
      t = t * f + (static_cast<double>(zrv) - zv);
      mr = zrv;
    } else {
      const T er = dev_exp(zrv - mr);
      sr += er;
      t += static_cast<double>(er) * (static_cast<double>(zrv) - zv);
    }
  }
  double s = pol.s;
  const T m = block_merge(pol.m, &s, static_cast<double*>(nullptr), sh_t, sh_d);
  mr = block_merge(mr, &sr, &t, sh_t, sh_d);
  const double lse = m + log(s), lser = mr + log(sr);
  if (threadIdx.x == 0) {
    P.logp[i] = static_cast<T>(zy - lse);
    P.ref_logp[i] = static_cast<T>(zry - lser);
    P.kl[i] = static_cast<T>(t / sr + lse - lser);
  }
  if (P.write_grad) {
    // g = -a p + b (p - q)
    const T cp = static_cast<T>((b - a) / s), cq = static_cast<T>(-b / sr);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      z[v] = cp * dev_exp(z[v] - m) + cq * dev_exp(zr[v] - mr);
    }
    __syncthreads();
    if (threadIdx.x == 0) z[y] += static_cast<T>(a);
  }
}

template <typename T>
__device__ void row_topk(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab, K = P.k, M = P.m;
  T* z = P.logits + i * V;
  const int64_t* ids = P.topk_ids + i * K;
  const T* lq = P.topk_logp + i * K;
  T* z_top = P.topk_scratch + i * (K + M);  // policy logits of the top-k ids, then of the samples
  T* z_smp = z_top + K;
  const int64_t* smp = M ? P.tail_ids + i * M : nullptr;
  const T* lq_smp = M ? P.tail_logp + i * M : nullptr;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y];
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) z_top[j] = z[ids[j]];
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) z_smp[j] = z[smp[j]];
  const T m = block_max(local_max(z, V), sh_t);  // syncs: z_top and z_smp complete
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += dev_exp(z[v] - m);
  s = block_sum(s, sh_d);
  const double lse = m + log(s);
  // exp(z - m) of the top-k ids uses the same expression as the full sweep, so the tail sum
  // s - s_top cancels only identical terms.
  double s_top = 0.0, q_top = 0.0, kl = 0.0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    s_top += dev_exp(z_top[j] - m);
    const double q = exp(static_cast<double>(lq[j]));
    if (q > 0.0) {  // q = 0 contributes nothing (and lq = -inf would give NaN)
      q_top += q;
      kl += q * (static_cast<double>(lq[j]) - (static_cast<double>(z_top[j]) - lse));
    }
  }
  s_top = block_sum(s_top, sh_d);
  q_top = block_sum(q_top, sh_d);
  kl = block_sum(kl, sh_d);
  // Tail bucket: the reference's missing mass r against the policy's mass outside the top-k.
  const double tail = fmax(s - s_top, 0.0);
  const double r = (K == V) ? 0.0 : fmax(0.0, 1.0 - q_top);
  if (r > 0.0) kl += r * (log(r) - (log(fmax(tail, DBL_MIN)) - log(s)));
  // Sampled tail: + r mean_j[(rho_j - 1) - log rho_j], log rho_j = log(p(v_j) / s_tail) - log(q(v_j) / r);
  // c = r mean_j(rho_j - 1) enters the gradient.
  const bool sampled = M > 0 && r > 0.0 && tail > 0.0;
  double c = 0.0;
  if (sampled) {
    const double log_tail = log(tail), log_r = log(r);
    double est = 0.0;
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      const double log_rho = (static_cast<double>(z_smp[j]) - m) - log_tail + log_r - static_cast<double>(lq_smp[j]);
      const double rho = exp(log_rho);
      est += (rho - 1.0) - log_rho;
      c += rho - 1.0;
    }
    est = block_sum(est, sh_d);
    c = block_sum(c, sh_d) * r / M;
    kl += r * est / M;
  }
  if (threadIdx.x == 0) {
    P.logp[i] = static_cast<T>(zy - lse);
    P.kl[i] = static_cast<T>(kl);
  }
  if (P.write_grad) {
    // dKL/dz_v = (Q + r) p_v - q_v for v in the top-k, (Q + r) p_v - (r + c) e_v / tail otherwise,
    // + (r / m)(rho_j - 1) at each sample v_j.
    const double c1 = (-a + b * (q_top + r)) / s;
    const double c2 = (r > 0.0 && tail > 0.0) ? b * (r + c) / tail : 0.0;
    const T cv = static_cast<T>(c1 - c2);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) z[v] = cv * dev_exp(z[v] - m);
    __syncthreads();
    // Assign (not add) the top-k entries so that a tiny tail cannot cancel them.
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const double q = exp(static_cast<double>(lq[j]));
      z[ids[j]] = static_cast<T>(c1 * dev_exp(z_top[j] - m) - b * q);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // One thread: samples may repeat an id (drawn with replacement), and m is small.
      if (sampled) {
        const double log_tail = log(tail), log_r = log(r);
        for (int64_t j = 0; j < M; ++j) {
          const double log_rho =
              (static_cast<double>(z_smp[j]) - m) - log_tail + log_r - static_cast<double>(lq_smp[j]);
          z[smp[j]] += static_cast<T>(b * r * (exp(log_rho) - 1.0) / M);
        }
      }
      z[y] += static_cast<T>(a);
    }
  }
}

template <typename T>
__device__ void row_label(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i];
  const T zy = z[y];
  Online<T> pol;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) pol.push(z[v]);
  double s = pol.s;
  const T m = block_merge(pol.m, &s, static_cast<double*>(nullptr), sh_t, sh_d);
  if (threadIdx.x == 0) P.logp[i] = static_cast<T>(zy - (m + log(s)));
  if (P.write_grad) {
    const T c = static_cast<T>(-a / s);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) z[v] = c * dev_exp(z[v] - m);
    __syncthreads();
    if (threadIdx.x == 0) z[y] += static_cast<T>(a);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_pass_kernel(const RowPassParams<T> P) {
  __shared__ T sh_t[kWarps];
  __shared__ double sh_d[kWarps];
  const int64_t i = blockIdx.x;
  switch (P.ref_kind) {
    case kRefExact: row_exact(P, i, sh_t, sh_d); break;
    case kRefTopK: row_topk(P, i, sh_t, sh_d); break;
    default: row_label(P, i, sh_t, sh_d); break;
  }
}

template <typename T>
void launch(const RowPassParams<T>& p, void* stream) {
  if (p.rows == 0) return;
#ifdef SPARSEPO_CUDA_EMULATION
  // tests/cuda_emu: the same kernel body on CPU threads, for tests on machines without a GPU.
  (void)stream;
  cuda_emu::launch(static_cast<unsigned>(p.rows), kThreads, [&p] { row_pass_kernel<T>(p); });
#else
  row_pass_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sparsepo_lite row pass launch failed: ") +
                             cudaGetErrorString(err));
  }
#endif
}

}  // namespace

void row_pass_cuda(const RowPassParams<float>& p, void* stream) { launch(p, stream); }
void row_pass_cuda(const RowPassParams<double>& p, void* stream) { launch(p, stream); }

}  // namespace sparsepo_lite
