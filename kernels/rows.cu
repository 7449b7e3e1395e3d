// Row gathers of the masked-LM head, the ops of lmtrain_cpu::ops::rows, in f32 and in bf16
// storage (E = bytes per element; the sum in f32, rounded once):
//   gather_rows:      out[s, :] = x[rows[s], :]            Bytes 2E n*cols + 4n
//   scatter_add_rows: dx[rows[s], :] += dsel[s, :]          Bytes 3E n*cols + 4n (rows distinct:
//                     no two threads touch one element, no atomics)
#include "common.cuh"

namespace {

template <class T>
__device__ void gather_rows(T* out, const T* x, const int* rows, uint64_t n, uint64_t cols) {
  const uint64_t total = n * cols;
  for (uint64_t i = lm::global_thread(); i < total; i += lm::grid_threads())
    out[i] = x[uint64_t(rows[i / cols]) * cols + i % cols];
}

template <class T>
__device__ void scatter_add_rows(T* dx, const T* dsel, const int* rows, uint64_t n, uint64_t cols) {
  const uint64_t total = n * cols;
  for (uint64_t i = lm::global_thread(); i < total; i += lm::grid_threads()) {
    T& d = dx[uint64_t(rows[i / cols]) * cols + i % cols];
    d = lm::from_f32<T>(lm::to_f32(d) + lm::to_f32(dsel[i]));
  }
}

}  // namespace

extern "C" __global__ void gather_rows_f32(float* out, const float* x, const int* rows, uint64_t n, uint64_t cols) {
  gather_rows(out, x, rows, n, cols);
}

extern "C" __global__ void gather_rows_bf16(lm::bf16* out, const lm::bf16* x, const int* rows, uint64_t n,
                                            uint64_t cols) {
  gather_rows(out, x, rows, n, cols);
}

extern "C" __global__ void scatter_add_rows_f32(float* dx, const float* dsel, const int* rows, uint64_t n,
                                                uint64_t cols) {
  scatter_add_rows(dx, dsel, rows, n, cols);
}

extern "C" __global__ void scatter_add_rows_bf16(lm::bf16* dx, const lm::bf16* dsel, const int* rows, uint64_t n,
                                                 uint64_t cols) {
  scatter_add_rows(dx, dsel, rows, n, cols);
}
