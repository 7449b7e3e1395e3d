// Element-wise kernels, each the op of lmtrain_cpu::ops::elementwise of the same name, in f32
// and in bf16 storage (arithmetic in f32, one rounding to bf16 per stored result). E = bytes per
// element (4 or 2):
//   add:              out[i] = a[i] + b[i]                 Bytes 3En, FLOPs n
//   add_inplace:      dst[i] += src[i]                     Bytes 3En, FLOPs n
//   tanh_fwd:         out[i] = tanh(inp[i])                Bytes 2En, one tanh per element
//   tanh_bwd:         dinp[i] += (1 - out[i]^2) dout[i]    Bytes 4En, FLOPs 3n
//   zero_padded_rows: x[r, :] = 0 where valid[r] == 0      Bytes <= E rows*cols + rows
#include "common.cuh"

namespace {

template <class T>
__device__ void add(T* out, const T* a, const T* b, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    out[i] = lm::from_f32<T>(lm::to_f32(a[i]) + lm::to_f32(b[i]));
}

template <class T>
__device__ void add_inplace(T* dst, const T* src, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    dst[i] = lm::from_f32<T>(lm::to_f32(dst[i]) + lm::to_f32(src[i]));
}

template <class T>
__device__ void tanh_fwd(T* out, const T* inp, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) out[i] = lm::from_f32<T>(tanhf(lm::to_f32(inp[i])));
}

template <class T>
__device__ void tanh_bwd(T* dinp, const T* out, const T* dout, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    const float y = lm::to_f32(out[i]);
    dinp[i] = lm::from_f32<T>(lm::to_f32(dinp[i]) + (1.f - y * y) * lm::to_f32(dout[i]));
  }
}

template <class T>
__device__ void zero_padded_rows(T* x, const unsigned char* valid, uint64_t rows, uint64_t cols) {
  const uint64_t n = rows * cols;
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    if (!valid[i / cols]) x[i] = lm::from_f32<T>(0.f);
}

}  // namespace

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, uint64_t n) { add(out, a, b, n); }

extern "C" __global__ void add_bf16(lm::bf16* out, const lm::bf16* a, const lm::bf16* b, uint64_t n) { add(out, a, b, n); }

extern "C" __global__ void add_inplace_f32(float* dst, const float* src, uint64_t n) { add_inplace(dst, src, n); }

extern "C" __global__ void add_inplace_bf16(lm::bf16* dst, const lm::bf16* src, uint64_t n) { add_inplace(dst, src, n); }

extern "C" __global__ void tanh_fwd_f32(float* out, const float* inp, uint64_t n) { tanh_fwd(out, inp, n); }

extern "C" __global__ void tanh_fwd_bf16(lm::bf16* out, const lm::bf16* inp, uint64_t n) { tanh_fwd(out, inp, n); }

extern "C" __global__ void tanh_bwd_f32(float* dinp, const float* out, const float* dout, uint64_t n) {
  tanh_bwd(dinp, out, dout, n);
}

extern "C" __global__ void tanh_bwd_bf16(lm::bf16* dinp, const lm::bf16* out, const lm::bf16* dout, uint64_t n) {
  tanh_bwd(dinp, out, dout, n);
}

extern "C" __global__ void zero_padded_rows_f32(float* x, const unsigned char* valid, uint64_t rows, uint64_t cols) {
  zero_padded_rows(x, valid, rows, cols);
}

extern "C" __global__ void zero_padded_rows_bf16(lm::bf16* x, const unsigned char* valid, uint64_t rows, uint64_t cols) {
  zero_padded_rows(x, valid, rows, cols);
}
