// LayerNorm over the last dimension of a row-major [rows, cols] tensor.
//
// Forward saves the per-row mean and reciprocal standard deviation (f32) for the
// backward pass. One warp owns one row; rows of any length (not only multiples of 32)
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
// dweight += sum_rows dout * norm,  dbias += sum_rows dout   (f32 accumulators)
// Each block sums its rows' dweight/dbias in shared memory (2*cols floats of dynamic
// shared memory), then adds them to global memory once per block.
template <class T>
__device__ void layernorm_backward(T* __restrict__ dinp, float* __restrict__ dweight, float* __restrict__ dbias,
                                   const T* __restrict__ dout, const T* __restrict__ inp,
                                   const T* __restrict__ weight, const float* __restrict__ mean,
                                   const float* __restrict__ rstd, int rows, int cols) {
  DYN_SMEM(float, acc);
  float* acc_dw = acc;
  float* acc_db = acc + cols;
  for (int i = threadIdx.x; i < 2 * cols; i += blockDim.x) acc[i] = 0.f;
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
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
      const float g = lm::to_f32(dy[i]);
      const float n = (lm::to_f32(x[i]) - m) * s;
      const float dn = g * lm::to_f32(weight[i]);
      dx[i] = lm::from_f32<T>(lm::to_f32(dx[i]) + (dn - mean_dn - n * mean_dn_n) * s);
      atomicAdd(&acc_dw[i], g * n);
      atomicAdd(&acc_db[i], g);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    atomicAdd(&dweight[i], acc_dw[i]);
    atomicAdd(&dbias[i], acc_db[i]);
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

extern "C" __global__ void layernorm_bwd_f32(float* dinp, float* dweight, float* dbias, const float* dout,
                                             const float* inp, const float* weight, const float* mean,
                                             const float* rstd, int rows, int cols) {
  layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols);
}

extern "C" __global__ void layernorm_bwd_bf16(lm::bf16* dinp, float* dweight, float* dbias, const lm::bf16* dout,
                                              const lm::bf16* inp, const lm::bf16* weight, const float* mean,
                                              const float* rstd, int rows, int cols) {
  layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols);
}
