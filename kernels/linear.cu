// add_bias: c[r, j] += bias[j] (rows x cols; Bytes 2E rows*cols, FLOPs rows*cols; E = bytes per
// element), the epilogue of a product when cuBLAS runs without one (lmtrain_cpu::ops::add_bias);
// in bf16 the sum is formed in f32 and rounded once.
//
// Parameter-gradient reductions over rows, deterministic (no float atomics): a fixed split
// of the rows into segments, each summed in row order by one thread per column, then the
// segments summed in order.
//
//   bias_grad_partial: partials[seg, c] = sum_{r in seg} dout[r, c]   (rows_per_seg rows per seg)
//   column_sum:        dst[c] += sum_seg partials[seg * stride + c]   (ACCUMULATES; the sum in f32,
//                      a bf16 dst rounded once, so a parameter gradient stored in bf16 sees one
//                      rounding per call whatever the number of rows)
// bias_backward = both. Bytes per call: rows*cols*E read + nseg*cols*4 written and read back;
// FLOPs rows*cols.
#include "common.cuh"

namespace {

template <class T>
__device__ void add_bias(T* c, const T* bias, uint64_t rows, uint64_t cols) {
  const uint64_t n = rows * cols;
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    c[i] = lm::from_f32<T>(lm::to_f32(c[i]) + lm::to_f32(bias[i % cols]));
}

template <class T>
__device__ void column_sum(T* dst, const float* partials, int nseg, int stride, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float acc = 0.f;
  for (int s = 0; s < nseg; ++s) acc += partials[size_t(s) * stride + c];
  dst[c] = lm::from_f32<T>(lm::to_f32(dst[c]) + acc);
}

template <class T>
__device__ void bias_grad_partial(float* __restrict__ partials, const T* __restrict__ dout, int rows, int cols,
                                  int rows_per_seg) {
  const int c = blockIdx.y * blockDim.x + threadIdx.x, seg = blockIdx.x;
  if (c >= cols) return;
  const int r0 = seg * rows_per_seg, r1 = min(rows, r0 + rows_per_seg);
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += lm::to_f32(dout[size_t(r) * cols + c]);
  partials[size_t(seg) * cols + c] = acc;
}

}  // namespace

extern "C" __global__ void bias_grad_partial_f32(float* partials, const float* dout, int rows, int cols,
                                                 int rows_per_seg) {
  bias_grad_partial(partials, dout, rows, cols, rows_per_seg);
}

extern "C" __global__ void bias_grad_partial_bf16(float* partials, const lm::bf16* dout, int rows, int cols,
                                                  int rows_per_seg) {
  bias_grad_partial(partials, dout, rows, cols, rows_per_seg);
}

extern "C" __global__ void column_sum_f32(float* dst, const float* partials, int nseg, int stride, int n) {
  column_sum(dst, partials, nseg, stride, n);
}

extern "C" __global__ void column_sum_bf16(lm::bf16* dst, const float* partials, int nseg, int stride, int n) {
  column_sum(dst, partials, nseg, stride, n);
}

extern "C" __global__ void add_bias_f32(float* c, const float* bias, uint64_t rows, uint64_t cols) {
  add_bias(c, bias, rows, cols);
}

extern "C" __global__ void add_bias_bf16(lm::bf16* c, const lm::bf16* bias, uint64_t rows, uint64_t cols) {
  add_bias(c, bias, rows, cols);
}
