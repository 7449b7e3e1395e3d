// The small element-wise and bookkeeping kernels of the op interface (crates/cuda CudaBackend),
// f32, each the op of lmtrain_cpu::ops of the same name:
//   add:              out[i] = a[i] + b[i]                 Bytes 12n, FLOPs n
//   add_inplace:      dst[i] += src[i]                     Bytes 12n, FLOPs n
//   add_bias:         c[r, j] += bias[j]  (rows x cols)    Bytes 8 rows*cols, FLOPs rows*cols
//   tanh_fwd:         out[i] = tanh(inp[i])                Bytes 8n, one tanh per element
//   tanh_bwd:         dinp[i] += (1 - out[i]^2) dout[i]    Bytes 16n, FLOPs 3n
//   zero_padded_rows: x[r, :] = 0 where valid[r] == 0      Bytes <= 4 rows*cols + rows
//   gather_rows:      out[s, :] = x[rows[s], :]            Bytes 8 n*cols + 4n
//   scatter_add_rows: dx[rows[s], :] += dsel[s, :]          Bytes 12 n*cols + 4n (rows distinct:
//                     no two threads touch one element, no atomics)
//   loss_accumulate:  loss[0] += double(float(total[0] / n_labels)) * weight  (one thread: the
//                     mean rounded to f32 first, as the CPU backend adds a model's reported loss)
//   grad_scale:       scale[1] = min(1, max_norm / (norm[0] * inv_accum + 1e-6)) * inv_accum
//                     (1 instead of the min when max_norm <= 0), scale[0] = the averaged norm: the one factor AdamW applies to
//                     the summed gradients, averaging and clipping folded together as
//                     lmtrain_backend::AdamWStep::grad_scale, left on the device (one thread).
#include "common.cuh"

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) out[i] = a[i] + b[i];
}

extern "C" __global__ void add_inplace_f32(float* dst, const float* src, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) dst[i] += src[i];
}

extern "C" __global__ void add_bias_f32(float* c, const float* bias, uint64_t rows, uint64_t cols) {
  const uint64_t n = rows * cols;
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) c[i] += bias[i % cols];
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

extern "C" __global__ void loss_accumulate_f32(double* loss, const double* total, double n_labels, double weight) {
  if (lm::global_thread() == 0) loss[0] += double(float(total[0] / n_labels)) * weight;
}

extern "C" __global__ void grad_scale_f32(float* scale, const float* norm, float inv_accum, float max_norm) {
  if (lm::global_thread() == 0) {
    const float avg = norm[0] * inv_accum;
    const float clip = max_norm > 0.f ? fminf(max_norm / (avg + 1e-6f), 1.f) : 1.f;
    scale[0] = avg;
    scale[1] = clip * inv_accum;
  }
}
