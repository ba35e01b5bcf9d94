// Glue between the device-generic chunk loop and the raw-pointer CUDA kernel:
// the only file that needs the CUDA build of torch (for the current stream).
// Built only when setup.py finds a CUDA torch.

#include <ATen/cuda/CUDAContext.h>

#include "../row_pass.h"

namespace sparsepo_lite {

void row_pass_cuda_current_stream(const RowPassParams<float>& p) {
  row_pass_cuda(p, at::cuda::getCurrentCUDAStream().stream());
}

void row_pass_cuda_current_stream(const RowPassParams<double>& p) {
  row_pass_cuda(p, at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace sparsepo_lite
