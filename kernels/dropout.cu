// Inverted dropout on activations, in place (also its own backward):
//   x[i] *= factor(i),  factor = 0 with probability p, else 1 / (1 - p)
// with the counter-based hash of lmtrain_backend::Dropout::factor on the element index i, so
// the mask equals lmtrain_cpu::ops::dropout_inplace's. Bytes per call 2*n*E; one hash per element.
#include "common.cuh"

template <class T>
__device__ void dropout_inplace(T* x, uint64_t n, float p, uint64_t seed) {
  for (uint64_t i = lm::global_thread(); i < n; i += lm::grid_threads())
    x[i] = lm::from_f32<T>(lm::to_f32(x[i]) * lm::dropout_factor(p, seed, i));
}

extern "C" __global__ void dropout_f32(float* x, uint64_t n, float p, uint64_t seed) { dropout_inplace(x, n, p, seed); }
extern "C" __global__ void dropout_bf16(lm::bf16* x, uint64_t n, float p, uint64_t seed) {
  dropout_inplace(x, n, p, seed);
}
