// LayerNorm over the last dimension of a row-major [rows, cols] tensor.
//
// out = (x - mean) * rstd * weight + bias, biased variance as torch. Forward saves the per-row
// mean and reciprocal standard deviation (f32) for the backward pass. Bytes per forward call:
// rows*cols*E read + written, 8*rows; FLOPs ~ 7*rows*cols. One warp owns one row; rows of any length (not only multiples of 32)
// are handled by the strided lane loops.
#include "common.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;

template <class T>
__device__ void layernorm_forward(T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                  const T* __restrict__ inp, const T* __restrict__ weight,
                                  const T* __restrict__ bias, int rows, int cols, float eps) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together: no barrier follows
  const T* x = inp + size_t(row) * cols;
  // Two passes (mean, then centred squares) instead of E[x^2]-E[x]^2, which cancels
  // catastrophically when |mean| >> std.
  float sum = 0.f;
  for (int i = lane; i < cols; i += 32) sum += lm::to_f32(x[i]);
  const float m = lm::warp_sum(sum) / cols;
  float sq = 0.f;
  for (int i = lane; i < cols; i += 32) {
    const float d = lm::to_f32(x[i]) - m;
    sq += d * d;
  }
  const float s = rsqrtf(lm::warp_sum(sq) / cols + eps);
  T* y = out + size_t(row) * cols;
  for (int i = lane; i < cols; i += 32) {
    const float n = (lm::to_f32(x[i]) - m) * s;
    y[i] = lm::from_f32<T>(n * lm::to_f32(weight[i]) + lm::to_f32(bias[i]));
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)),  dnorm = dout * weight
// dweight += sum_rows dout * norm,  dbias += sum_rows dout   (f32)
// Deterministic, without float atomics: block `seg` owns rows [seg * rows_per_seg, ...); its
// warps write dinp row by row, then one thread per column sums the segment's rows in order into
// partials[seg, 0, c] (dweight) and partials[seg, 1, c] (dbias); column_sum_f32 (linear.cu)
// then adds the segments in order. Bytes: 3*rows*cols*E read twice (the second read mostly
// from L2), rows*cols*E read-modify-written, 2*nseg*cols*4 written; FLOPs ~ 12*rows*cols.
template <class T>
__device__ void layernorm_backward(T* __restrict__ dinp, float* __restrict__ partials, const T* __restrict__ dout,
                                   const T* __restrict__ inp, const T* __restrict__ weight,
                                   const float* __restrict__ mean, const float* __restrict__ rstd, int rows,
                                   int cols, int rows_per_seg) {
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const int r0 = blockIdx.x * rows_per_seg, r1 = min(rows, r0 + rows_per_seg);
  for (int row = r0 + int(threadIdx.x) / 32; row < r1; row += warps) {
    const T* x = inp + size_t(row) * cols;
    const T* dy = dout + size_t(row) * cols;
    const float m = mean[row], s = rstd[row];
    float sum_dn = 0.f, sum_dn_n = 0.f;
    for (int i = lane; i < cols; i += 32) {
      const float n = (lm::to_f32(x[i]) - m) * s;
      const float dn = lm::to_f32(dy[i]) * lm::to_f32(weight[i]);
      sum_dn += dn;
      sum_dn_n += dn * n;
    }
    const float mean_dn = lm::warp_sum(sum_dn) / cols;
    const float mean_dn_n = lm::warp_sum(sum_dn_n) / cols;
    T* dx = dinp + size_t(row) * cols;
    for (int i = lane; i < cols; i += 32) {
      const float n = (lm::to_f32(x[i]) - m) * s;
      const float dn = lm::to_f32(dy[i]) * lm::to_f32(weight[i]);
      dx[i] = lm::from_f32<T>(lm::to_f32(dx[i]) + (dn - mean_dn - n * mean_dn_n) * s);
    }
  }
  float* pw = partials + size_t(blockIdx.x) * 2 * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc_w = 0.f, acc_b = 0.f;
    for (int row = r0; row < r1; ++row) {
      const float g = lm::to_f32(dout[size_t(row) * cols + c]);
      acc_w += g * (lm::to_f32(inp[size_t(row) * cols + c]) - mean[row]) * rstd[row];
      acc_b += g;
    }
    pw[c] = acc_w;
    pw[cols + c] = acc_b;
  }
}

// Residual add fused with the LayerNorm forward: residual = a + b (stored in T), then
// out = LayerNorm(residual) of the stored values, saving mean and rstd. Bytes: 2 reads + 2
// writes of rows*cols*E (+ the residual read back twice, from L1/L2); FLOPs ~ 9*rows*cols.
template <class T>
__device__ void residual_layernorm_forward(T* __restrict__ residual, T* __restrict__ out, float* __restrict__ mean,
                                           float* __restrict__ rstd, const T* __restrict__ a,
                                           const T* __restrict__ b, const T* __restrict__ weight,
                                           const T* __restrict__ bias, int rows, int cols, float eps) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const size_t at = size_t(row) * cols;
  float sum = 0.f;
  for (int i = lane; i < cols; i += 32) {
    const T r = lm::from_f32<T>(lm::to_f32(a[at + i]) + lm::to_f32(b[at + i]));
    residual[at + i] = r;
    sum += lm::to_f32(r);
  }
  const float m = lm::warp_sum(sum) / cols;
  float sq = 0.f;
  for (int i = lane; i < cols; i += 32) {
    const float d = lm::to_f32(residual[at + i]) - m;
    sq += d * d;
  }
  const float s = rsqrtf(lm::warp_sum(sq) / cols + eps);
  for (int i = lane; i < cols; i += 32) {
    const float n = (lm::to_f32(residual[at + i]) - m) * s;
    out[at + i] = lm::from_f32<T>(n * lm::to_f32(weight[i]) + lm::to_f32(bias[i]));
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

}  // namespace

extern "C" __global__ void layernorm_fwd_f32(float* out, float* mean, float* rstd, const float* inp,
                                             const float* weight, const float* bias, int rows, int cols,
                                             float eps) {
  layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols, eps);
}

extern "C" __global__ void layernorm_fwd_bf16(lm::bf16* out, float* mean, float* rstd, const lm::bf16* inp,
                                              const lm::bf16* weight, const lm::bf16* bias, int rows, int cols,
                                              float eps) {
  layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols, eps);
}

extern "C" __global__ void layernorm_bwd_f32(float* dinp, float* partials, const float* dout, const float* inp,
                                             const float* weight, const float* mean, const float* rstd, int rows,
                                             int cols, int rows_per_seg) {
  layernorm_backward(dinp, partials, dout, inp, weight, mean, rstd, rows, cols, rows_per_seg);
}

extern "C" __global__ void layernorm_bwd_bf16(lm::bf16* dinp, float* partials, const lm::bf16* dout,
                                              const lm::bf16* inp, const lm::bf16* weight, const float* mean,
                                              const float* rstd, int rows, int cols, int rows_per_seg) {
  layernorm_backward(dinp, partials, dout, inp, weight, mean, rstd, rows, cols, rows_per_seg);
}

extern "C" __global__ void residual_layernorm_fwd_f32(float* residual, float* out, float* mean, float* rstd,
                                                      const float* a, const float* b, const float* weight,
                                                      const float* bias, int rows, int cols, float eps) {
  residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, rows, cols, eps);
}

extern "C" __global__ void residual_layernorm_fwd_bf16(lm::bf16* residual, lm::bf16* out, float* mean, float* rstd,
                                                       const lm::bf16* a, const lm::bf16* b, const lm::bf16* weight,
                                                       const lm::bf16* bias, int rows, int cols, float eps) {
  residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, rows, cols, eps);
}
