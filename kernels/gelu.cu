// GELU forward and backward, element-wise over n values.
//   tanh form (HF "gelu_new", GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   erf form  (HF "gelu", BERT):      0.5 x (1 + erf(x / sqrt(2)))
// Backward ACCUMULATES: dinp += gelu'(inp) * dout.
#include "common.cuh"

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// kApprox: the hardware tanh (about 2^-11 relative error) is fine for bf16 storage
// (2^-8) but not for the f32 kernels, which keep tanhf.
template <bool kApprox>
struct GeluTanh {
  __device__ static float tanh_(float u) { return kApprox ? lm::fast_tanh(u) : tanhf(u); }
  __device__ static float f(float x) {
    const float t = tanh_(kSqrt2OverPi * (x + kCubic * x * x * x));
    return 0.5f * x * (1.f + t);
  }
  __device__ static float df(float x) {
    const float t = tanh_(kSqrt2OverPi * (x + kCubic * x * x * x));
    const float dt = kSqrt2OverPi * (1.f + 3.f * kCubic * x * x) * (1.f - t * t);
    return 0.5f * (1.f + t) + 0.5f * x * dt;
  }
};

struct GeluErf {
  __device__ static float f(float x) { return 0.5f * x * (1.f + erff(x * kInvSqrt2)); }
  __device__ static float df(float x) {
    return 0.5f * (1.f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  }
};

template <class G, class T>
__device__ void gelu_forward(T* __restrict__ out, const T* __restrict__ inp, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads()) out[i] = lm::from_f32<T>(G::f(lm::to_f32(inp[i])));
}

template <class G, class T>
__device__ void gelu_backward(T* __restrict__ dinp, const T* __restrict__ inp, const T* __restrict__ dout, uint64_t n) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    dinp[i] = lm::from_f32<T>(lm::to_f32(dinp[i]) + G::df(lm::to_f32(inp[i])) * lm::to_f32(dout[i]));
}

}  // namespace

extern "C" __global__ void gelu_tanh_fwd_f32(float* out, const float* inp, uint64_t n) { gelu_forward<GeluTanh<false>>(out, inp, n); }
extern "C" __global__ void gelu_tanh_fwd_bf16(lm::bf16* out, const lm::bf16* inp, uint64_t n) { gelu_forward<GeluTanh<true>>(out, inp, n); }
extern "C" __global__ void gelu_erf_fwd_f32(float* out, const float* inp, uint64_t n) { gelu_forward<GeluErf>(out, inp, n); }
extern "C" __global__ void gelu_erf_fwd_bf16(lm::bf16* out, const lm::bf16* inp, uint64_t n) { gelu_forward<GeluErf>(out, inp, n); }

extern "C" __global__ void gelu_tanh_bwd_f32(float* dinp, const float* inp, const float* dout, uint64_t n) {
  gelu_backward<GeluTanh<false>>(dinp, inp, dout, n);
}
extern "C" __global__ void gelu_tanh_bwd_bf16(lm::bf16* dinp, const lm::bf16* inp, const lm::bf16* dout, uint64_t n) {
  gelu_backward<GeluTanh<true>>(dinp, inp, dout, n);
}
extern "C" __global__ void gelu_erf_bwd_f32(float* dinp, const float* inp, const float* dout, uint64_t n) {
  gelu_backward<GeluErf>(dinp, inp, dout, n);
}
extern "C" __global__ void gelu_erf_bwd_bf16(lm::bf16* dinp, const lm::bf16* inp, const lm::bf16* dout, uint64_t n) {
  gelu_backward<GeluErf>(dinp, inp, dout, n);
}
