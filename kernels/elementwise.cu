// Element-wise kernels, f32, each the op of lmtrain_cpu::ops::elementwise of the same name:
//   add:              out[i] = a[i] + b[i]                 Bytes 12n, FLOPs n
//   add_inplace:      dst[i] += src[i]                     Bytes 12n, FLOPs n
//   tanh_fwd:         out[i] = tanh(inp[i])                Bytes 8n, one tanh per element
//   tanh_bwd:         dinp[i] += (1 - out[i]^2) dout[i]    Bytes 16n, FLOPs 3n
//   zero_padded_rows: x[r, :] = 0 where valid[r] == 0      Bytes <= 4 rows*cols + rows
#include "common.cuh"

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) out[i] = a[i] + b[i];
}

extern "C" __global__ void add_inplace_f32(float* dst, const float* src, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) dst[i] += src[i];
}

extern "C" __global__ void tanh_fwd_f32(float* out, const float* inp, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) out[i] = tanhf(inp[i]);
}

extern "C" __global__ void tanh_bwd_f32(float* dinp, const float* out, const float* dout, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    const float y = out[i];
    dinp[i] += (1.f - y * y) * dout[i];
  }
}

extern "C" __global__ void zero_padded_rows_f32(float* x, const unsigned char* valid, uint64_t rows, uint64_t cols) {
  const uint64_t n = rows * cols;
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    if (!valid[i / cols]) x[i] = 0.f;
}
