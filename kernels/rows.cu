// Row gathers of the masked-LM head, f32, the ops of lmtrain_cpu::ops::rows:
//   gather_rows:      out[s, :] = x[rows[s], :]            Bytes 8 n*cols + 4n
//   scatter_add_rows: dx[rows[s], :] += dsel[s, :]          Bytes 12 n*cols + 4n (rows distinct:
//                     no two threads touch one element, no atomics)
#include "common.cuh"

extern "C" __global__ void gather_rows_f32(float* out, const float* x, const int* rows, uint64_t n, uint64_t cols) {
  const uint64_t total = n * cols;
  for (uint64_t i = lm::global_thread(); i < total; i += lm::grid_threads())
    out[i] = x[uint64_t(rows[i / cols]) * cols + i % cols];
}

extern "C" __global__ void scatter_add_rows_f32(float* dx, const float* dsel, const int* rows, uint64_t n,
                                                uint64_t cols) {
  const uint64_t total = n * cols;
  for (uint64_t i = lm::global_thread(); i < total; i += lm::grid_threads())
    dx[uint64_t(rows[i / cols]) * cols + i % cols] += dsel[i];
}
