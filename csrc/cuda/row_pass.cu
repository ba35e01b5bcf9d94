// CUDA row pass of chunked_token_stats: one thread block per token row.
// Same contract and arithmetic as cpu/row_pass_cpu.cpp (see row_pass.h):
// a block-wide max, one exp per logit written back in place, sums in double,
// then the gradient factor g written over the logits. Needs only the CUDA
// headers, so `nvcc -c` checks it on machines without a GPU or CUDA torch.

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

template <typename T>
__device__ void row_exact(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  T* zr = P.ref_logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y], zry = zr[y];  // read before any thread overwrites the row
  const T m = block_max(local_max(z, V), sh_t);
  const T mr = block_max(local_max(zr, V), sh_t);
  double s = 0.0, sr = 0.0, t = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const T zv = z[v], zrv = zr[v];
    const T e = dev_exp(zv - m), er = dev_exp(zrv - mr);
    s += e;
    sr += er;
    t += static_cast<double>(er) * (static_cast<double>(zrv) - zv);
    if (P.write_grad) {
      z[v] = e;
      zr[v] = er;
    }
  }
  s = block_sum(s, sh_d);
  sr = block_sum(sr, sh_d);
  t = block_sum(t, sh_d);
  const double lse = m + log(s), lser = mr + log(sr);
  if (threadIdx.x == 0) {
    P.logp[i] = static_cast<T>(zy - lse);
    P.ref_logp[i] = static_cast<T>(zry - lser);
    P.kl[i] = static_cast<T>(t / sr + lse - lser);
  }
  if (P.write_grad) {
    const T cp = static_cast<T>((b - a) / s), cq = static_cast<T>(-b / sr);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) z[v] = cp * z[v] + cq * zr[v];
    __syncthreads();
    if (threadIdx.x == 0) z[y] += static_cast<T>(a);
  }
}

template <typename T>
__device__ void row_topk(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab, K = P.k;
  T* z = P.logits + i * V;
  const int64_t* ids = P.topk_ids + i * K;
  const T* lq = P.topk_logp + i * K;
  T* z_top = P.topk_scratch + i * K;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i], b = P.kl_weight[i];
  const T zy = z[y];
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) z_top[j] = z[ids[j]];
  const T m = block_max(local_max(z, V), sh_t);  // syncs: z_top complete, z unwritten
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const T e = dev_exp(z[v] - m);
    s += e;
    if (P.write_grad) z[v] = e;
  }
  s = block_sum(s, sh_d);
  const double lse = m + log(s);
  double s_top = 0.0, q_top = 0.0, kl = 0.0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    s_top += dev_exp(z_top[j] - m);
    const double q = exp(static_cast<double>(lq[j]));
    if (q > 0.0) {
      q_top += q;
      kl += q * (static_cast<double>(lq[j]) - (static_cast<double>(z_top[j]) - lse));
    }
  }
  s_top = block_sum(s_top, sh_d);
  q_top = block_sum(q_top, sh_d);
  kl = block_sum(kl, sh_d);
  const double tail = fmax(s - s_top, 0.0);
  const double r = (K == V) ? 0.0 : fmax(0.0, 1.0 - q_top);
  if (r > 0.0) kl += r * (log(r) - (log(fmax(tail, DBL_MIN)) - log(s)));
  if (threadIdx.x == 0) {
    P.logp[i] = static_cast<T>(zy - lse);
    P.kl[i] = static_cast<T>(kl);
  }
  if (P.write_grad) {
    const double c1 = (-a + b * (q_top + r)) / s;
    const double c2 = (r > 0.0 && tail > 0.0) ? b * r / tail : 0.0;
    const T cv = static_cast<T>(c1 - c2);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) z[v] *= cv;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const double q = exp(static_cast<double>(lq[j]));
      z[ids[j]] = static_cast<T>(c1 * dev_exp(z_top[j] - m) - b * q);
    }
    __syncthreads();
    if (threadIdx.x == 0) z[y] += static_cast<T>(a);
  }
}

template <typename T>
__device__ void row_label(const RowPassParams<T>& P, int64_t i, T* sh_t, double* sh_d) {
  const int64_t V = P.vocab;
  T* z = P.logits + i * V;
  const int64_t y = P.labels[i];
  const double a = P.logp_weight[i];
  const T zy = z[y];
  const T m = block_max(local_max(z, V), sh_t);
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const T e = dev_exp(z[v] - m);
    s += e;
    if (P.write_grad) z[v] = e;
  }
  s = block_sum(s, sh_d);
  if (threadIdx.x == 0) P.logp[i] = static_cast<T>(zy - (m + log(s)));
  if (P.write_grad) {
    const T c = static_cast<T>(-a / s);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) z[v] *= c;
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
