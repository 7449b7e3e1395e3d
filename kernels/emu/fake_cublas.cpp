// fake_cublas.cpp: a libcublas.so for machines without a GPU (GEMM entry points only).
//
// Handles, streams and math modes are accepted; the GEMMs run on the CPU (gemm.h) over
// device pointers, which the fake libcuda makes host pointers. Arguments are validated
// like cuBLAS does (dimensions, leading dimensions, types) and a rejected call says why
// on stderr. Pointer mode must be host (alpha/beta are read from host memory).
#include "gemm.h"

#include <cstdarg>

namespace {

enum : int { kSuccess = 0, kNotInitialized = 1, kInvalidValue = 7, kNotSupported = 15 };
enum : int { kComputeF32 = 68, kComputeF32Pedantic = 69, kComputeF32FastF16 = 74, kComputeF32FastBF16 = 75, kComputeF32FastTF32 = 77 };
constexpr int kTF32TensorOpMath = 3;

struct Handle {
  void* stream = nullptr;
  int math_mode = 0;
};

int complain(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int complain(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("fakecublas: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return code;
}

int op_flag(int op, bool* transposed) {
  if (op == 0) *transposed = false;
  else if (op == 1) *transposed = true;
  else return complain(kNotSupported, "conjugate transposes are not supported (op %d)", op);
  return kSuccess;
}

// Shared by all GEMM entry points: validates, fills a fakeblas::Gemm and runs it.
int gemm(const char* fn, void* handle, int transa, int transb, int m, int n, int k, const float* alpha,
         const void* A, int atype, int lda, long long stride_a, const void* B, int btype, int ldb, long long stride_b,
         const float* beta, void* C, int ctype, int ldc, long long stride_c, int batch, bool tf32) {
  if (!handle) return complain(kNotInitialized, "%s: null handle", fn);
  fakeblas::Gemm g;
  if (int r = op_flag(transa, &g.a.transposed)) return r;
  if (int r = op_flag(transb, &g.b.transposed)) return r;
  if (m < 0 || n < 0 || k < 0 || batch < 0) return complain(kInvalidValue, "%s: negative size m=%d n=%d k=%d batch=%d", fn, m, n, k, batch);
  const int a_rows = g.a.transposed ? k : m, b_rows = g.b.transposed ? n : k;
  if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
    return complain(kInvalidValue, "%s: leading dimensions lda=%d ldb=%d ldc=%d too small for stored A %dx.., B %dx.., C %dx..",
                    fn, lda, ldb, ldc, a_rows, b_rows, m);
  for (int t : {atype, btype, ctype})
    if (t != fakeblas::kF32 && t != fakeblas::kF16 && t != fakeblas::kBF16)
      return complain(kNotSupported, "%s: data type %d is not supported (f32, f16, bf16 are)", fn, t);
  if (atype != btype) return complain(kNotSupported, "%s: A is %s but B is %s", fn, fakeblas::type_name(atype), fakeblas::type_name(btype));
  if (m == 0 || n == 0 || batch == 0) return kSuccess;
  g.m = m; g.n = n; g.k = k; g.batch = batch;
  g.alpha = *alpha; g.beta = *beta; g.tf32 = tf32 && atype == fakeblas::kF32;
  g.a.ptr = A; g.a.type = atype; g.a.ld = lda; g.a.batch_stride = stride_a;
  g.b.ptr = B; g.b.type = btype; g.b.ld = ldb; g.b.batch_stride = stride_b;
  g.c.ptr = C; g.c.type = ctype; g.c.ld = ldc; g.c.batch_stride = stride_c;
  g.d = g.c;
  fakeblas::run(g);
  return kSuccess;
}

int check_compute(const char* fn, int compute, bool* tf32) {
  switch (compute) {
    case kComputeF32: case kComputeF32Pedantic: case kComputeF32FastF16: case kComputeF32FastBF16: *tf32 = false; return kSuccess;
    case kComputeF32FastTF32: *tf32 = true; return kSuccess;
    default: return complain(kNotSupported, "%s: compute type %d is not supported (the f32 family is)", fn, compute);
  }
}

}  // namespace

extern "C" {

int cublasCreate_v2(void** handle) { *handle = new Handle; return kSuccess; }
int cublasDestroy_v2(void* handle) { delete static_cast<Handle*>(handle); return kSuccess; }
int cublasSetStream_v2(void* handle, void* stream) { static_cast<Handle*>(handle)->stream = stream; return kSuccess; }
int cublasGetStream_v2(void* handle, void** stream) { *stream = static_cast<Handle*>(handle)->stream; return kSuccess; }
int cublasSetMathMode(void* handle, int mode) { static_cast<Handle*>(handle)->math_mode = mode; return kSuccess; }
int cublasGetMathMode(void* handle, int* mode) { *mode = static_cast<Handle*>(handle)->math_mode; return kSuccess; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return kSuccess; }
int cublasSetPointerMode_v2(void*, int mode) {
  return mode == 0 ? kSuccess : complain(kNotSupported, "device pointer mode is not supported");
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                   const float* B, int ldb, const float* beta, float* C, int ldc) {
  const bool tf32 = h && static_cast<Handle*>(h)->math_mode == kTF32TensorOpMath;
  return gemm("cublasSgemm", h, ta, tb, m, n, k, alpha, A, fakeblas::kF32, lda, 0, B, fakeblas::kF32, ldb, 0, beta, C,
              fakeblas::kF32, ldc, 0, 1, tf32);
}

int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                              long long sa, const float* B, int ldb, long long sb, const float* beta, float* C, int ldc,
                              long long sc, int batch) {
  const bool tf32 = h && static_cast<Handle*>(h)->math_mode == kTF32TensorOpMath;
  return gemm("cublasSgemmStridedBatched", h, ta, tb, m, n, k, alpha, A, fakeblas::kF32, lda, sa, B, fakeblas::kF32,
              ldb, sb, beta, C, fakeblas::kF32, ldc, sc, batch, tf32);
}

int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda,
                 const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc, int compute, int) {
  bool tf32 = false;
  if (int r = check_compute("cublasGemmEx", compute, &tf32)) return r;
  return gemm("cublasGemmEx", h, ta, tb, m, n, k, static_cast<const float*>(alpha), A, atype, lda, 0, B, btype, ldb, 0,
              static_cast<const float*>(beta), C, ctype, ldc, 0, 1, tf32);
}

int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype,
                               int lda, long long sa, const void* B, int btype, int ldb, long long sb, const void* beta,
                               void* C, int ctype, int ldc, long long sc, int batch, int compute, int) {
  bool tf32 = false;
  if (int r = check_compute("cublasGemmStridedBatchedEx", compute, &tf32)) return r;
  return gemm("cublasGemmStridedBatchedEx", h, ta, tb, m, n, k, static_cast<const float*>(alpha), A, atype, lda, sa, B,
              btype, ldb, sb, static_cast<const float*>(beta), C, ctype, ldc, sc, batch, tf32);
}

}  // extern "C"
