// gemm.h: the CPU GEMM behind the fake cuBLAS and cuBLASLt libraries.
//
// BLAS conventions: column-major storage, C (m x n) = alpha op(A) op(B) + beta C, where
// op(A) is m x k and op(B) is k x n; leading dimensions in elements; strided batches.
// Inputs may be f32, f16 or bf16 (cudaDataType codes); products accumulate in f64, so
// the fake is a reference rather than a model of any GPU's summation order. With a
// TF32 compute type, f32 inputs are first rounded to TF32 (10 mantissa bits) as the
// tensor cores do, so tests see the precision a GPU would give them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fakeblas {

enum DataType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 14 };
enum Epilogue : int { kNone = 0, kRelu = 1, kGelu = 2 };

inline size_t type_size(int t) {
  switch (t) {
    case kF32: return 4;
    case kF64: return 8;
    case kF16: case kBF16: return 2;
    default: return 0;
  }
}
inline const char* type_name(int t) {
  switch (t) {
    case kF32: return "f32";
    case kF64: return "f64";
    case kF16: return "f16";
    case kBF16: return "bf16";
    default: return "unsupported";
  }
}

inline float round_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t b;
  memcpy(&b, &x, 4);
  b = (b + 0xFFFu + ((b >> 13) & 1u)) & ~0x1FFFu;  // round to nearest even at bit 13
  memcpy(&x, &b, 4);
  return x;
}

inline float load(const void* p, int t, size_t i) {
  switch (t) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF64: return float(static_cast<const double*>(p)[i]);
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}
inline void store(void* p, int t, size_t i, float v) {
  switch (t) {
    case kF32: static_cast<float*>(p)[i] = v; break;
    case kF64: static_cast<double*>(p)[i] = v; break;
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

// The tanh approximation, as cuBLASLt's GELU epilogue.
inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}

// One matrix operand: storage, element type, how elements are addressed.
struct Operand {
  const void* ptr = nullptr;
  int type = kF32;
  int64_t ld = 0;
  int64_t batch_stride = 0;
  bool transposed = false;  // op(X) = X^T
  bool row_order = false;   // cuBLASLt ORDER_ROW storage (cuBLAS is always column-major)
  // Offset of stored element (r, c) of the *stored* matrix.
  size_t at(int64_t r, int64_t c) const { return size_t(row_order ? r * ld + c : r + c * ld); }
};

struct Gemm {
  int64_t m = 0, n = 0, k = 0;
  int batch = 1;
  float alpha = 1.f, beta = 0.f;
  bool tf32 = false;
  Operand a, b, c;   // c: the input C (read when beta != 0)
  Operand d;         // output; for cuBLAS d == c
  const void* bias = nullptr;
  int bias_type = kF32;
  int64_t bias_batch_stride = 0;
  int epilogue = kNone;
};

inline void run(const Gemm& g) {
  const size_t ea = type_size(g.a.type), eb = type_size(g.b.type), ec = type_size(g.c.type), ed = type_size(g.d.type);
  std::vector<float> A(size_t(g.m * g.k)), B(size_t(g.k * g.n));
  for (int bi = 0; bi < g.batch; ++bi) {
    const char* pa = static_cast<const char*>(g.a.ptr) + bi * g.a.batch_stride * int64_t(ea);
    const char* pb = static_cast<const char*>(g.b.ptr) + bi * g.b.batch_stride * int64_t(eb);
    const char* pc = static_cast<const char*>(g.c.ptr) + bi * g.c.batch_stride * int64_t(ec);
    char* pd = static_cast<char*>(const_cast<void*>(g.d.ptr)) + bi * g.d.batch_stride * int64_t(ed);
    // Gather op(A) row-major (m x k) and op(B) column-major (k x n): unit-stride dot products.
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t l = 0; l < g.k; ++l) {
        float v = load(pa, g.a.type, g.a.transposed ? g.a.at(l, i) : g.a.at(i, l));
        A[size_t(i * g.k + l)] = g.tf32 ? round_tf32(v) : v;
      }
    for (int64_t j = 0; j < g.n; ++j)
      for (int64_t l = 0; l < g.k; ++l) {
        float v = load(pb, g.b.type, g.b.transposed ? g.b.at(j, l) : g.b.at(l, j));
        B[size_t(j * g.k + l)] = g.tf32 ? round_tf32(v) : v;
      }
    for (int64_t j = 0; j < g.n; ++j)
      for (int64_t i = 0; i < g.m; ++i) {
        double acc = 0;
        const float* ar = &A[size_t(i * g.k)];
        const float* bc = &B[size_t(j * g.k)];
        for (int64_t l = 0; l < g.k; ++l) acc += double(ar[l]) * double(bc[l]);
        float v = float(g.alpha * acc);
        if (g.beta != 0.f) v += g.beta * load(pc, g.c.type, g.c.at(i, j));  // beta == 0: C is not read (may be NaN)
        if (g.bias) v += load(g.bias, g.bias_type, size_t(bi * g.bias_batch_stride + i));
        if (g.epilogue == kRelu) v = v > 0.f ? v : 0.f;
        if (g.epilogue == kGelu) v = gelu_tanh(v);
        store(pd, g.d.type, g.d.at(i, j), v);
      }
  }
}

}  // namespace fakeblas
