// Fused AdamW step (torch.optim.AdamW semantics) over n parameters:
//   g = grad * grad_scale                       (gradient-clipping factor, 1 = none)
//   p -= lr * weight_decay * p                  (decoupled decay, before the moments)
//   m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step) computed once
// per step on the host in f64, as torch does with Python floats.
#include "common.cuh"

namespace {

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

}  // namespace

extern "C" __global__ void adamw_f32(float* params, const float* grads, float* m, float* v, uint64_t n, float lr,
                                     float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                                     float step_size, float bc2_sqrt) {
  const AdamStep step{lr, beta1, beta2, eps, weight_decay, grad_scale, step_size, bc2_sqrt};
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    float p = params[i], mi = m[i], vi = v[i];
    step.apply(p, grads[i], mi, vi);
    params[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

// Mixed precision: f32 master weights and moments, bf16 gradients; also refreshes the
// bf16 copy of the weights that the forward pass reads.
extern "C" __global__ void adamw_bf16(float* master, lm::bf16* params, const lm::bf16* grads, float* m, float* v,
                                      uint64_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                                      float grad_scale, float step_size, float bc2_sqrt) {
  const AdamStep step{lr, beta1, beta2, eps, weight_decay, grad_scale, step_size, bc2_sqrt};
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) {
    float p = master[i], mi = m[i], vi = v[i];
    step.apply(p, __bfloat162float(grads[i]), mi, vi);
    master[i] = p;
    params[i] = __float2bfloat16_rn(p);
    m[i] = mi;
    v[i] = vi;
  }
}
