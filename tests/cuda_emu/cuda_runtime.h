// A CPU stand-in for the few CUDA runtime features csrc/cuda/row_pass.cu uses, so that its kernel
// runs, unchanged, in tests on machines without a GPU (tests/test_row_pass_cuda_emulated.py puts
// this folder first on the include path instead of the real <cuda_runtime.h>).
//
// Each thread block runs as blockDim.x std::threads, blocks one after another. __syncthreads is a
// block-wide barrier; a warp shuffle goes through a per-block exchange buffer between two warp
// barriers, so only the 32 threads of that warp take part (as with a full-mask __shfl_xor_sync);
// __shared__ arrays become statics, shared by the block's threads. Slow, and exact: it checks the
// kernel's indexing, strides, reductions and barriers, not its speed or CUDA's memory model.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define SPARSEPO_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

namespace cuda_emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 thread_idx;
inline thread_local Dim3 block_idx;
inline Dim3 block_dim;

struct Block {
  explicit Block(unsigned threads) : all(threads), exchange(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;
};

inline Block* current = nullptr;

// body() is the kernel call with its arguments bound; threads must be a multiple of 32.
template <class F>
void launch(unsigned grid, unsigned threads, F&& body) {
  block_dim.x = threads;
  for (unsigned b = 0; b < grid; ++b) {
    Block block(threads);
    current = &block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&body, t, b] {
        thread_idx.x = t;
        block_idx.x = b;
        body();
      });
    }
    for (auto& th : pool) th.join();
  }
  current = nullptr;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)

inline void __syncthreads() { cuda_emu::current->all.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned /*mask: the whole warp*/, T v, int lane_mask) {
  const unsigned t = threadIdx.x;
  auto& warp = *cuda_emu::current->warps[t / 32];
  cuda_emu::current->exchange[t] = static_cast<double>(v);  // exact for float and double
  warp.arrive_and_wait();
  const double other = cuda_emu::current->exchange[t ^ static_cast<unsigned>(lane_mask)];
  warp.arrive_and_wait();  // nobody overwrites the buffer before the whole warp has read it
  return static_cast<T>(other);
}
