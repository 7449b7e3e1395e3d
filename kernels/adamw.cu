// Fused AdamW step (torch.optim.AdamW semantics) over n parameters:
//   g = grad * grad_scale                       (gradient-clipping factor, 1 = none)
//   p -= lr * weight_decay * p                  (decoupled decay, before the moments)
//   m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step) computed once
// per step on the host in f64, as torch does with Python floats. When `clip` is not null,
// grad_scale is multiplied by clip[1], the clipping factor grad_norm_final_f32 left on the
// device (gradient clipping folded into the update, no host round trip).
// adamw_bf16 keeps f32 master weights and moments and writes the bf16 working copy with
// stochastic rounding: the f32 value plus 16 random low bits (the counter-based hash of
// (seed, offset + i)), truncated, so E[bf16(p)] = p and small updates are not lost.
// Bytes per parameter: f32 16 read + 12 written; bf16 14 read + 14 written. FLOPs ~ 15.
//
// Global gradient norm, deterministic two-stage reduction: grad_norm_partial_<T> (a grid that
// depends only on n) squares and sums in f64, thread-strided then a fixed tree per block;
// grad_norm_final_f32 sums the block partials in a fixed tree and writes
//   out[0] = sqrt(sum g^2),  out[1] = max_norm > 0 ? min(1, max_norm / (out[0] + 1e-6)) : 1
// (torch.nn.utils.clip_grad_norm_, as lmtrain_optim::clip_scale). Bytes n*E read; FLOPs 2n.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

struct AdamStep {
  float lr, beta1, beta2, eps, weight_decay, grad_scale, step_size, bc2_sqrt;

  // Updates one parameter and its moments in place.
  __device__ void apply(float& p, float g, float& m, float& v) const {
    g *= grad_scale;
    p *= 1.f - lr * weight_decay;
    m += (g - m) * (1.f - beta1);  // torch's lerp form of beta1 m + (1 - beta1) g
    v = v * beta2 + (1.f - beta2) * g * g;
    p -= step_size * (m / (sqrtf(v) / bc2_sqrt + eps));
  }
};

// Round to bf16 stochastically: add 16 random bits below the kept mantissa, then truncate.
__device__ __forceinline__ lm::bf16 stochastic_bf16(float x, uint64_t seed, uint64_t index) {
  if (!isfinite(x)) return __float2bfloat16_rn(x);
  const uint32_t r = uint32_t(lm::mix64(seed ^ (index * 0x9E3779B97F4A7C15ull)) >> 48);
  const uint32_t bits = (__float_as_uint(x) + r) & 0xFFFF0000u;
  const float y = __uint_as_float(bits);
  return isfinite(y) ? __float2bfloat16_rz(y) : __float2bfloat16_rz(x);  // no rounding up into inf
}

template <class T>
__device__ void norm_partial(double* partials, const T* g, uint64_t n) {
  __shared__ double part[kThreads];
  double acc = 0.0;
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    const double x = lm::to_f32(g[i]);
    acc += x * x;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = part[0];
}

}  // namespace

extern "C" __global__ __launch_bounds__(kThreads) void grad_norm_partial_f32(double* partials, const float* g,
                                                                             uint64_t n) {
  norm_partial(partials, g, n);
}

extern "C" __global__ __launch_bounds__(kThreads) void grad_norm_partial_bf16(double* partials, const lm::bf16* g,
                                                                              uint64_t n) {
  norm_partial(partials, g, n);
}

extern "C" __global__ __launch_bounds__(kThreads) void grad_norm_final_f32(float* out, const double* partials,
                                                                           int nblocks, float max_norm) {
  __shared__ double part[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nblocks; i += kThreads) acc += partials[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float norm = float(sqrt(part[0]));
    out[0] = norm;
    out[1] = max_norm > 0.f ? fminf(max_norm / (norm + 1e-6f), 1.f) : 1.f;
  }
}

extern "C" __global__ void adamw_f32(float* params, const float* grads, float* m, float* v, const float* clip,
                                     uint64_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                                     float grad_scale, float step_size, float bc2_sqrt) {
  const AdamStep step{lr, beta1, beta2, eps, weight_decay, clip ? grad_scale * clip[1] : grad_scale, step_size,
                      bc2_sqrt};
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    float p = params[i], mi = m[i], vi = v[i];
    step.apply(p, grads[i], mi, vi);
    params[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

// Mixed precision: f32 master weights and moments, bf16 gradients; also refreshes the
// bf16 copy of the weights that the forward pass reads (stochastic rounding, see above).
extern "C" __global__ void adamw_bf16(float* master, lm::bf16* params, const lm::bf16* grads, float* m, float* v,
                                      const float* clip, uint64_t n, uint64_t offset, uint64_t seed, float lr,
                                      float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                                      float step_size, float bc2_sqrt) {
  const AdamStep step{lr, beta1, beta2, eps, weight_decay, clip ? grad_scale * clip[1] : grad_scale, step_size,
                      bc2_sqrt};
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    float p = master[i], mi = m[i], vi = v[i];
    step.apply(p, __bfloat162float(grads[i]), mi, vi);
    master[i] = p;
    params[i] = stochastic_bf16(p, seed, offset + i);
    m[i] = mi;
    v[i] = vi;
  }
}

// grad_scale: scale[1] = min(1, max_norm / (norm[0] * inv_accum + 1e-6)) * inv_accum (1 instead
// of the min when max_norm <= 0), scale[0] = the averaged norm: the one factor AdamW applies to
// the summed gradients, averaging and clipping folded together as
// lmtrain_backend::AdamWStep::grad_scale, left on the device (one thread).
extern "C" __global__ void grad_scale_f32(float* scale, const float* norm, float inv_accum, float max_norm) {
  if (lm::global_thread() == 0) {
    const float avg = norm[0] * inv_accum;
    const float clip = max_norm > 0.f ? fminf(max_norm / (avg + 1e-6f), 1.f) : 1.f;
    scale[0] = avg;
    scale[1] = clip * inv_accum;
  }
}
