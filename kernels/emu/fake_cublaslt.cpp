// fake_cublaslt.cpp: a libcublasLt.so for machines without a GPU.
//
// Descriptors, layouts and preferences are plain structs; the heuristic always offers
// one algorithm; cublasLtMatmul validates the problem like cuBLASLt and runs it on the
// CPU (gemm.h): D = epilogue(alpha op(A) op(B) + beta C [+ bias]) with column- or
// row-ordered layouts, leading dimensions, strided batches, f32/f16/bf16 data, and the
// epilogues cudarc can ask for: DEFAULT, RELU, GELU (tanh form) and their BIAS variants.
// A rejected call says why on stderr.
#include "gemm.h"

#include <cstdarg>

namespace {

enum : int { kSuccess = 0, kNotInitialized = 1, kInvalidValue = 7, kNotSupported = 15 };
enum : int { kComputeF32 = 68, kComputeF32Pedantic = 69, kComputeF32FastF16 = 74, kComputeF32FastBF16 = 75, kComputeF32FastTF32 = 77 };

struct Desc {
  int compute = kComputeF32, scale = fakeblas::kF32;
  int32_t transa = 0, transb = 0, transc = 0;
  uint32_t epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
  const void* bias = nullptr;
  int bias_type = -1;     // -1: same as D
  int64_t bias_batch_stride = 0;
};

struct Layout {
  int type = fakeblas::kF32;
  int32_t order = 0;  // CUBLASLT_ORDER_COL
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
  int32_t batch = 1;
  int64_t batch_stride = 0;
};

int complain(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int complain(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("fakecublasLt: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return code;
}

template <class T>
int set(T* dst, const void* buf, size_t size, const char* what) {
  if (size != sizeof(T)) return complain(kInvalidValue, "attribute %s: %zu bytes given, %zu expected", what, size, sizeof(T));
  memcpy(dst, buf, sizeof(T));
  return kSuccess;
}

int64_t min_ld(const Layout& l) { return int64_t(l.order == 1 ? l.cols : l.rows); }

}  // namespace

extern "C" {

int cublasLtCreate(void** handle) { *handle = new int(0); return kSuccess; }
int cublasLtDestroy(void* handle) { delete static_cast<int*>(handle); return kSuccess; }

int cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
  if (scale != fakeblas::kF32) return complain(kNotSupported, "scale type %d is not supported (f32 is)", scale);
  auto* d = new Desc;
  d->compute = compute;
  d->scale = scale;
  *desc = d;
  return kSuccess;
}
int cublasLtMatmulDescDestroy(void* desc) { delete static_cast<Desc*>(desc); return kSuccess; }
int cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size) {
  Desc& d = *static_cast<Desc*>(desc);
  switch (attr) {
    case 0: return set(&d.compute, buf, size, "COMPUTE_TYPE");
    case 1: return set(&d.scale, buf, size, "SCALE_TYPE");
    case 2: {
      int32_t mode = 0;
      if (int r = set(&mode, buf, size, "POINTER_MODE")) return r;
      return mode == 0 ? kSuccess : complain(kNotSupported, "only host pointer mode is supported");
    }
    case 3: return set(&d.transa, buf, size, "TRANSA");
    case 4: return set(&d.transb, buf, size, "TRANSB");
    case 5: return set(&d.transc, buf, size, "TRANSC");
    case 7: return set(&d.epilogue, buf, size, "EPILOGUE");
    case 8: return set(&d.bias, buf, size, "BIAS_POINTER");
    case 10: return set(&d.bias_batch_stride, buf, size, "BIAS_BATCH_STRIDE");
    case 26: return set(&d.bias_type, buf, size, "BIAS_DATA_TYPE");
    default: return complain(kNotSupported, "matmul descriptor attribute %d is not supported", attr);
  }
}

int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
  if (!fakeblas::type_size(type) || type == fakeblas::kF64)
    return complain(kNotSupported, "matrix data type %d is not supported (f32, f16, bf16 are)", type);
  auto* l = new Layout;
  l->type = type;
  l->rows = rows;
  l->cols = cols;
  l->ld = ld;
  *layout = l;
  return kSuccess;
}
int cublasLtMatrixLayoutDestroy(void* layout) { delete static_cast<Layout*>(layout); return kSuccess; }
int cublasLtMatrixLayoutSetAttribute(void* layout, int attr, const void* buf, size_t size) {
  Layout& l = *static_cast<Layout*>(layout);
  switch (attr) {
    case 0: return set(&l.type, buf, size, "TYPE");
    case 1: {
      if (int r = set(&l.order, buf, size, "ORDER")) return r;
      return l.order <= 1 ? kSuccess : complain(kNotSupported, "layout order %d is not supported (COL, ROW are)", l.order);
    }
    case 2: return set(&l.rows, buf, size, "ROWS");
    case 3: return set(&l.cols, buf, size, "COLS");
    case 4: return set(&l.ld, buf, size, "LD");
    case 5: return set(&l.batch, buf, size, "BATCH_COUNT");
    case 6: return set(&l.batch_stride, buf, size, "STRIDED_BATCH_OFFSET");
    default: return complain(kNotSupported, "matrix layout attribute %d is not supported", attr);
  }
}

int cublasLtMatmulPreferenceCreate(void** pref) { *pref = new int(0); return kSuccess; }
int cublasLtMatmulPreferenceDestroy(void* pref) { delete static_cast<int*>(pref); return kSuccess; }
int cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return kSuccess; }

// cublasLtMatmulHeuristicResult_t: algo (8 x u64), workspaceSize, state, wavesCount, reserved[4].
struct HeuristicResult {
  uint64_t algo[8];
  size_t workspace_size;
  int state;
  float waves;
  int reserved[4];
};

int cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int requested,
                                   HeuristicResult* results, int* returned) {
  if (requested < 1) return complain(kInvalidValue, "heuristic: %d algorithms requested", requested);
  memset(results, 0, sizeof *results);
  results->waves = 1.f;
  *returned = 1;
  return kSuccess;
}

int cublasLtMatmul(void* handle, void* desc, const void* alpha, const void* A, void* adesc, const void* B, void* bdesc,
                   const void* beta, const void* C, void* cdesc, void* D, void* ddesc, const void*, void*, size_t, void*) {
  if (!handle) return complain(kNotInitialized, "cublasLtMatmul: null handle");
  const Desc& d = *static_cast<Desc*>(desc);
  const Layout& la = *static_cast<Layout*>(adesc);
  const Layout& lb = *static_cast<Layout*>(bdesc);
  const Layout& lc = *static_cast<Layout*>(cdesc);
  const Layout& ld = *static_cast<Layout*>(ddesc);
  bool tf32 = false;
  switch (d.compute) {
    case kComputeF32: case kComputeF32Pedantic: case kComputeF32FastF16: case kComputeF32FastBF16: tf32 = false; break;
    case kComputeF32FastTF32: tf32 = true; break;
    default: return complain(kNotSupported, "compute type %d is not supported (the f32 family is)", d.compute);
  }
  if (d.transa > 1 || d.transb > 1) return complain(kNotSupported, "conjugate transposes are not supported");
  if (d.transc != 0) return complain(kNotSupported, "TRANSC must be CUBLAS_OP_N");
  const uint64_t m = ld.rows, n = ld.cols;
  const uint64_t ar = d.transa ? la.cols : la.rows, ac = d.transa ? la.rows : la.cols;
  const uint64_t br = d.transb ? lb.cols : lb.rows, bc = d.transb ? lb.rows : lb.cols;
  if (ar != m || bc != n || ac != br || lc.rows != m || lc.cols != n)
    return complain(kInvalidValue, "shapes do not chain: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu",
                    (unsigned long long)ar, (unsigned long long)ac, (unsigned long long)br, (unsigned long long)bc,
                    (unsigned long long)lc.rows, (unsigned long long)lc.cols, (unsigned long long)m, (unsigned long long)n);
  for (const Layout* l : {&la, &lb, &lc, &ld})
    if (l->ld < std::max<int64_t>(1, min_ld(*l)))
      return complain(kInvalidValue, "leading dimension %lld too small for a %llux%llu %s matrix", (long long)l->ld,
                      (unsigned long long)l->rows, (unsigned long long)l->cols, l->order ? "row-ordered" : "column-ordered");
  if (la.type != lb.type) return complain(kNotSupported, "A is %s but B is %s", fakeblas::type_name(la.type), fakeblas::type_name(lb.type));
  if (la.batch != ld.batch || lb.batch != ld.batch || lc.batch != ld.batch)
    return complain(kInvalidValue, "batch counts differ: A %d, B %d, C %d, D %d", la.batch, lb.batch, lc.batch, ld.batch);
  fakeblas::Gemm g;
  switch (d.epilogue) {
    case 1: break;                                          // DEFAULT
    case 2: g.epilogue = fakeblas::kRelu; break;            // RELU
    case 4: break;                                          // BIAS
    case 6: g.epilogue = fakeblas::kRelu; break;            // RELU_BIAS
    case 32: case 36: g.epilogue = fakeblas::kGelu; break;  // GELU, GELU_BIAS
    default: return complain(kNotSupported, "epilogue %u is not supported", d.epilogue);
  }
  const bool wants_bias = d.epilogue == 4 || d.epilogue == 6 || d.epilogue == 36;
  if (wants_bias && !d.bias) return complain(kInvalidValue, "epilogue %u needs BIAS_POINTER", d.epilogue);
  if (m == 0 || n == 0) return kSuccess;
  g.m = int64_t(m); g.n = int64_t(n); g.k = int64_t(ac); g.batch = ld.batch;
  g.alpha = *static_cast<const float*>(alpha);
  g.beta = *static_cast<const float*>(beta);
  g.tf32 = tf32 && la.type == fakeblas::kF32;
  auto operand = [](const void* p, const Layout& l, bool t) {
    fakeblas::Operand o;
    o.ptr = p; o.type = l.type; o.ld = l.ld; o.batch_stride = l.batch_stride; o.transposed = t; o.row_order = l.order == 1;
    return o;
  };
  g.a = operand(A, la, d.transa);
  g.b = operand(B, lb, d.transb);
  g.c = operand(C, lc, false);
  g.d = operand(D, ld, false);
  if (wants_bias) {
    g.bias = d.bias;
    g.bias_type = d.bias_type < 0 ? ld.type : d.bias_type;
    g.bias_batch_stride = d.bias_batch_stride;
  }
  fakeblas::run(g);
  return kSuccess;
}

}  // extern "C"
