// common.cuh: shared helpers for lmtrain's CUDA kernels.
//
// Every kernels/*.cu file includes this header first. Under nvcc it pulls in the CUDA
// headers; with `-DCUEMU` (host compiler) it pulls in the emulator, so the same source
// runs on the CPU in CI. Kernel entry points are `extern "C"` and named <op>_<dtype>;
// build.rs derives the emulator's kernel registry from those declarations.
#pragma once

#ifdef CUEMU
#include "emu/cuemu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <stdint.h>

// Dynamic shared memory. `extern __shared__` arrays have no host equivalent, so kernels
// declare them through this macro; the emulator hands out a per-launch buffer. 128-byte
// alignment: wmma tiles need 32-byte aligned shared-memory pointers.
#ifdef CUEMU
#define DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(::cuemu::dynamic_smem())
#else
#define DYN_SMEM(T, name)                                          \
  extern __shared__ __align__(128) unsigned char name##_bytes_[];   \
  T* name = reinterpret_cast<T*>(name##_bytes_)
#endif

namespace lm {

typedef __nv_bfloat16 bf16;

// Loads and stores in the storage type, arithmetic in f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// SplitMix64 finaliser, bit for bit lmtrain_backend::mix64.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// lmtrain_backend::Dropout::factor: the multiplier of element `index` (0 when dropped,
// 1 / (1 - p) when kept), so the CPU and the GPU drop the same elements.
__device__ __forceinline__ float dropout_factor(float p, uint64_t seed, uint64_t index) {
  const float r = float(mix64(seed ^ (index * 0x9E3779B97F4A7C15ull)) >> 40) * (1.f / 16777216.f);
  return r < p ? 0.f : 1.f / (1.f - p);
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024) in a fixed order:
// lanes by xor-butterfly, then warp partials by warp 0. Every thread gets the result.
// `scratch` holds 33 floats of shared memory; contains barriers (call from uniform code).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? scratch[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? scratch[lane] : -INFINITY;
    w = warp_max(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// Grid-stride loop bounds for element-wise kernels over `n` elements.
__device__ __forceinline__ uint64_t global_thread() { return uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ uint64_t grid_threads() { return uint64_t(gridDim.x) * blockDim.x; }

// e^x in the precision of the storage type: the fast hardware exponential (a few ulp; fine
// for bf16 results) for bf16, the correctly rounded-ish libm expf for f32 results (tested to 1e-5).
template <class T> __device__ __forceinline__ float exp_for(float x) { return __expf(x); }
template <> __device__ __forceinline__ float exp_for<float>(float x) { return expf(x); }

// tanh with a hardware instruction on sm_75+; the portable path is the libm function.
__device__ __forceinline__ float fast_tanh(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return tanhf(x);
#endif
}

}  // namespace lm
