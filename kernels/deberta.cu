// DeBERTa's ops: disentangled self-attention (forward and backward) and the im2col of its
// convolution layer, with the semantics of lmtrain_cpu::ops::deberta (the reference).
//
// Layout (as attention.cu): qkv is [B, T, 3C] row-major, C = NH * HS, q of head h at columns
// h*HS, k at C + h*HS, v at 2C + h*HS; out and dout are [B, T, C]; the projected relative
// embeddings pos_key / pos_query are [2*span, C] (heads contiguous); probs and the backward's
// ds are [B, NH, T, T] f32. The relative position of query i and key j depends on i - j only:
// the host builds rel[d + T - 1] = RelPositions::index(i, j) for every d = i - j (exact, with
// the CPU's f32 log buckets), and for the relative-embedding gradient the inverse table (the
// differences d of each row, grouped by row: rows_start / rows_delta).
//
// Not flash-style: DeBERTa's sequences are short (T <= 512), so the probabilities of a layer
// are saved for the backward ([B, NH, T, T] f32, Backend::alloc_disentangled_state) and every
// kernel owns one row (a query, a key or a relative-embedding row) of one head, summing over
// the other side in a fixed order: no atomics, identical bits from run to run. Arithmetic in
// f32, results rounded once to the storage type T.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;

struct Geometry {
  int B, T, NH, HS, C;
  // Element offset of row t of batch b in qkv-like [B, T, 3C] storage.
  __device__ size_t row(int b, int t) const { return (size_t(b) * T + t) * 3 * C; }
};

template <class T>
__device__ float dot(const T* a, const T* b, int n) {
  float s = 0.f;
  for (int d = 0; d < n; ++d) s += lm::to_f32(a[d]) * lm::to_f32(b[d]);
  return s;
}

__device__ __forceinline__ bool pair_ok(const unsigned char* key_valid, int b, int T, int i, int j) {
  return !key_valid || (key_valid[size_t(b) * T + i] && key_valid[size_t(b) * T + j]);
}

// deberta_attn_fwd_*: one block (128 threads) per query row i of head (b, h); grid (T, B*NH),
// T floats of dynamic shared memory (the score row). Per head, sc = sqrt(HS * scale_factor):
//   s_ij = q_i.k_j / sc + (q_i.pos_key[rel(i,j)] / sc  [c2p] + k_j.pos_query[rel(i,j)] / sc  [p2c])
//   s_ij = f32::MIN where query i or key j is padding (a padded query: uniform probabilities)
//   P_ij = softmax_j(s_ij) (saved in probs, before dropout)
//   out_i = sum_j Z_ij P_ij v_j,  Z_ij = dropout factor of element (b*NH + h)*T*T + i*T + j
// Bytes per call (E = bytes per element): q, k (and the relative rows) read T times each from
// L2, v read T times, out written: ~(2 + terms) * B*T*T*C*E of L2 traffic, B*T*C*E + the
// 4*B*NH*T*T probabilities written. FLOPs: 2*B*NH*T*T*HS per score term, + 2*B*NH*T*T*HS for P.v.
template <class T>
__device__ void attn_forward(T* __restrict__ out, float* __restrict__ probs, const T* __restrict__ qkv,
                             const T* __restrict__ pos_key, const T* __restrict__ pos_query,
                             const unsigned char* __restrict__ key_valid, const int* __restrict__ rel, int B,
                             int seq, int NH, int HS, float sc, float p_drop, uint64_t seed) {
  const Geometry g{B, seq, NH, HS, NH * HS};
  const int i = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
  __shared__ float red[33];
  DYN_SMEM(float, srow);
  const T* q = qkv + g.row(b, i) + h * HS;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) {
    const T* k = qkv + g.row(b, j) + g.C + h * HS;
    float s = dot(q, k, HS) / sc;
    if (pos_key || pos_query) {
      const size_t r = size_t(rel[i - j + seq - 1]) * g.C + h * HS;
      float bias = pos_key ? dot(q, pos_key + r, HS) / sc : 0.f;
      if (pos_query) bias += dot(k, pos_query + r, HS) / sc;
      s += bias;
    }
    srow[j] = pair_ok(key_valid, b, seq, i, j) ? s : -3.402823466e38f;  // f32::MIN
  }
  float m = -INFINITY;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) m = fmaxf(m, srow[j]);
  m = lm::block_max(m, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) {
    const float e = lm::exp_for<T>(srow[j] - m);
    srow[j] = e;
    sum += e;
  }
  const float inv = 1.f / lm::block_sum(sum, red);
  float* prow = probs + (size_t(bh) * seq + i) * seq;
  const uint64_t base = (uint64_t(bh) * seq + i) * seq;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) {
    const float p = srow[j] * inv;
    prow[j] = p;
    srow[j] = p_drop > 0.f ? p * lm::dropout_factor(p_drop, seed, base + j) : p;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < seq; ++j) acc += srow[j] * lm::to_f32(qkv[g.row(b, j) + 2 * g.C + h * HS + d]);
    out[(size_t(b) * seq + i) * g.C + h * HS + d] = lm::from_f32<T>(acc);
  }
}

// deberta_attn_bwd_ds_*: one block per query row i of head (b, h), T floats of dynamic shared
// memory. The score gradient (without 1/sc) into ds:
//   dP_ij = Z_ij dout_i.v_j ;  ds_ij = P_ij (dP_ij - sum_k P_ik dP_ik), 0 where the pair is masked
// Bytes: dout row + T v rows (L2) per block, 4*B*NH*T*T read (probs) and written (ds).
// FLOPs: 2*B*NH*T*T*HS + 4*B*NH*T*T.
template <class T>
__device__ void attn_backward_ds(float* __restrict__ ds, const float* __restrict__ probs, const T* __restrict__ dout,
                                 const T* __restrict__ qkv, const unsigned char* __restrict__ key_valid, int B,
                                 int seq, int NH, int HS, float p_drop, uint64_t seed) {
  const Geometry g{B, seq, NH, HS, NH * HS};
  const int i = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
  __shared__ float red[33];
  DYN_SMEM(float, dp);
  const T* dy = dout + (size_t(b) * seq + i) * g.C + h * HS;
  const float* prow = probs + (size_t(bh) * seq + i) * seq;
  const uint64_t base = (uint64_t(bh) * seq + i) * seq;
  float part = 0.f;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) {
    float x = dot(dy, qkv + g.row(b, j) + 2 * g.C + h * HS, HS);
    if (p_drop > 0.f) x *= lm::dropout_factor(p_drop, seed, base + j);
    dp[j] = x;
    part += x * prow[j];
  }
  const float dsum = lm::block_sum(part, red);
  float* drow = ds + (size_t(bh) * seq + i) * seq;
  for (int j = threadIdx.x; j < seq; j += blockDim.x)
    drow[j] = pair_ok(key_valid, b, seq, i, j) ? prow[j] * (dp[j] - dsum) : 0.f;
}

// deberta_attn_bwd_dq_*: one block per query row i of head (b, h), a thread per channel d;
// ACCUMULATES into the q part of dqkv:
//   dq_i += (sum_j ds_ij k_j + sum_j ds_ij pos_key[rel(i,j)]  [c2p]) / sc
// Bytes: the ds row, T k rows (+ T relative rows) from L2 per block; dq read-modify-written.
// FLOPs: 2*B*NH*T*T*HS per term.
template <class T>
__device__ void attn_backward_dq(T* __restrict__ dqkv, const float* __restrict__ ds, const T* __restrict__ qkv,
                                 const T* __restrict__ pos_key, const int* __restrict__ rel, int B, int seq, int NH,
                                 int HS, float sc) {
  const Geometry g{B, seq, NH, HS, NH * HS};
  const int i = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
  const float* drow = ds + (size_t(bh) * seq + i) * seq;
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float a = 0.f, c2p = 0.f;
    for (int j = 0; j < seq; ++j) {
      a += drow[j] * lm::to_f32(qkv[g.row(b, j) + g.C + h * HS + d]);
      if (pos_key) c2p += drow[j] * lm::to_f32(pos_key[size_t(rel[i - j + seq - 1]) * g.C + h * HS + d]);
    }
    T& dq = dqkv[g.row(b, i) + h * HS + d];
    dq = lm::from_f32<T>(lm::to_f32(dq) + (a / sc + c2p / sc));
  }
}

// deberta_attn_bwd_dkv_*: one block per key row j of head (b, h), 2*T floats of dynamic shared
// memory (column j of ds and of Z.P); ACCUMULATES into the k and v parts of dqkv:
//   dk_j += (sum_i ds_ij q_i + sum_i ds_ij pos_query[rel(i,j)]  [p2c]) / sc
//   dv_j += sum_i Z_ij P_ij dout_i
// Bytes: a column of ds and probs, T q and dout rows (+ T relative rows) from L2 per block; dk,
// dv read-modify-written. FLOPs: 2*B*NH*T*T*HS per term, + 2*B*NH*T*T*HS for dv.
template <class T>
__device__ void attn_backward_dkv(T* __restrict__ dqkv, const float* __restrict__ ds, const float* __restrict__ probs,
                                  const T* __restrict__ dout, const T* __restrict__ qkv,
                                  const T* __restrict__ pos_query, const int* __restrict__ rel, int B, int seq,
                                  int NH, int HS, float sc, float p_drop, uint64_t seed) {
  const Geometry g{B, seq, NH, HS, NH * HS};
  const int j = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
  DYN_SMEM(float, col);
  float* zp = col + seq;
  for (int i = threadIdx.x; i < seq; i += blockDim.x) {
    const size_t ij = (size_t(bh) * seq + i) * seq + j;
    col[i] = ds[ij];
    zp[i] = p_drop > 0.f ? probs[ij] * lm::dropout_factor(p_drop, seed, ij) : probs[ij];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float a = 0.f, p2c = 0.f, v = 0.f;
    for (int i = 0; i < seq; ++i) {
      a += col[i] * lm::to_f32(qkv[g.row(b, i) + h * HS + d]);
      if (pos_query) p2c += col[i] * lm::to_f32(pos_query[size_t(rel[i - j + seq - 1]) * g.C + h * HS + d]);
      v += zp[i] * lm::to_f32(dout[(size_t(b) * seq + i) * g.C + h * HS + d]);
    }
    T& dk = dqkv[g.row(b, j) + g.C + h * HS + d];
    dk = lm::from_f32<T>(lm::to_f32(dk) + (a / sc + p2c / sc));
    T& dv = dqkv[g.row(b, j) + 2 * g.C + h * HS + d];
    dv = lm::from_f32<T>(lm::to_f32(dv) + v);
  }
}

// deberta_rel_grad_*: one block per relative-embedding row r of head h (grid (2*span, NH)), a
// thread per channel; ACCUMULATES the gradient of pos_key (query = 0: the c2p term) or of
// pos_query (query = 1: p2c) summed over every batch and every pair (i, j) with rel(i, j) = r,
// in the order b, then the row's differences d = i - j, then i:
//   dpos_key[r]   += sum_{b, rel(i,j)=r} ds_ij q_i / sc
//   dpos_query[r] += sum_{b, rel(i,j)=r} ds_ij k_j / sc
// Every pair is visited once over the grid: bytes 4*B*NH*T*T (ds) + B*T*T*C*E (q or k rows,
// mostly from L2) read, 2*span*C*E read-modify-written; FLOPs 2*B*NH*T*T*HS.
template <class T>
__device__ void rel_backward(T* __restrict__ dpos, const float* __restrict__ ds, const T* __restrict__ qkv,
                             const int* __restrict__ rows_start, const int* __restrict__ rows_delta, int B, int seq,
                             int NH, int HS, float sc, int query) {
  const Geometry g{B, seq, NH, HS, NH * HS};
  const int r = blockIdx.x, h = blockIdx.y;
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float acc = 0.f;
    for (int b = 0; b < B; ++b) {
      const float* dh = ds + size_t(b * NH + h) * seq * seq;
      for (int e = rows_start[r]; e < rows_start[r + 1]; ++e) {
        const int delta = rows_delta[e];
        for (int i = max(0, delta); i < min(seq, seq + delta); ++i) {
          const int j = i - delta;
          const size_t src = query ? g.row(b, j) + g.C : g.row(b, i);
          acc += dh[size_t(i) * seq + j] * lm::to_f32(qkv[src + h * HS + d]);
        }
      }
    }
    T& dst = dpos[size_t(r) * g.C + h * HS + d];
    dst = lm::from_f32<T>(lm::to_f32(dst) + acc / sc);
  }
}

// conv1d_unfold_*: im2col along each sequence, kernel K (odd), zero padding (K-1)/2:
//   out[(b,t), c*K + kk] = x[(b, t + kk - (K-1)/2), c]  (0 outside the sequence)
// Grid-stride over the B*T*C*K outputs. Bytes: B*T*C*K*E written, up to that read (from L1/L2;
// B*T*C*E from DRAM). FLOPs: none.
template <class T>
__device__ void conv_unfold(T* __restrict__ out, const T* __restrict__ x, int B, int seq, int C, int K) {
  const uint64_t total = uint64_t(B) * seq * C * K;
  const int half = (K - 1) / 2;
  for (uint64_t idx = lm::global_thread(); idx < total; idx += lm::grid_threads()) {
    const int kk = int(idx % K), c = int(idx / K % C);
    const uint64_t pos = idx / (uint64_t(C) * K);
    const int t = int(pos % seq), src = t + kk - half;
    out[idx] = (src >= 0 && src < seq) ? x[(pos - t + src) * C + c] : lm::from_f32<T>(0.f);
  }
}

// conv1d_fold_*: the backward of conv1d_unfold, ACCUMULATING; one thread per element of dx
// gathers the K columns that read it, taps in order (no write conflicts):
//   dx[(b,t), c] += sum_kk dcol[(b, t + (K-1)/2 - kk), c*K + kk]  (rows inside the sequence)
// Bytes: B*T*C*K*E read, B*T*C*E read-modify-written. FLOPs: B*T*C*K.
template <class T>
__device__ void conv_fold(T* __restrict__ dx, const T* __restrict__ dcol, int B, int seq, int C, int K) {
  const uint64_t total = uint64_t(B) * seq * C;
  const int half = (K - 1) / 2;
  for (uint64_t idx = lm::global_thread(); idx < total; idx += lm::grid_threads()) {
    const int c = int(idx % C);
    const uint64_t pos = idx / C;
    const int t = int(pos % seq);
    float acc = lm::to_f32(dx[idx]);
    for (int kk = 0; kk < K; ++kk) {
      const int dst = t + half - kk;
      if (dst >= 0 && dst < seq) acc += lm::to_f32(dcol[((pos - t + dst) * C + c) * K + kk]);
    }
    dx[idx] = lm::from_f32<T>(acc);
  }
}

}  // namespace

extern "C" __global__ void deberta_attn_fwd_f32(float* out, float* probs, const float* qkv, const float* pos_key,
                                                const float* pos_query, const unsigned char* key_valid,
                                                const int* rel, int B, int T, int NH, int HS, float sc, float p_drop,
                                                uint64_t seed) {
  attn_forward(out, probs, qkv, pos_key, pos_query, key_valid, rel, B, T, NH, HS, sc, p_drop, seed);
}

extern "C" __global__ void deberta_attn_fwd_bf16(lm::bf16* out, float* probs, const lm::bf16* qkv,
                                                 const lm::bf16* pos_key, const lm::bf16* pos_query,
                                                 const unsigned char* key_valid, const int* rel, int B, int T, int NH,
                                                 int HS, float sc, float p_drop, uint64_t seed) {
  attn_forward(out, probs, qkv, pos_key, pos_query, key_valid, rel, B, T, NH, HS, sc, p_drop, seed);
}

extern "C" __global__ void deberta_attn_bwd_ds_f32(float* ds, const float* probs, const float* dout, const float* qkv,
                                                   const unsigned char* key_valid, int B, int T, int NH, int HS,
                                                   float p_drop, uint64_t seed) {
  attn_backward_ds(ds, probs, dout, qkv, key_valid, B, T, NH, HS, p_drop, seed);
}

extern "C" __global__ void deberta_attn_bwd_ds_bf16(float* ds, const float* probs, const lm::bf16* dout,
                                                    const lm::bf16* qkv, const unsigned char* key_valid, int B, int T,
                                                    int NH, int HS, float p_drop, uint64_t seed) {
  attn_backward_ds(ds, probs, dout, qkv, key_valid, B, T, NH, HS, p_drop, seed);
}

extern "C" __global__ void deberta_attn_bwd_dq_f32(float* dqkv, const float* ds, const float* qkv, const float* pos_key,
                                                   const int* rel, int B, int T, int NH, int HS, float sc) {
  attn_backward_dq(dqkv, ds, qkv, pos_key, rel, B, T, NH, HS, sc);
}

extern "C" __global__ void deberta_attn_bwd_dq_bf16(lm::bf16* dqkv, const float* ds, const lm::bf16* qkv,
                                                    const lm::bf16* pos_key, const int* rel, int B, int T, int NH,
                                                    int HS, float sc) {
  attn_backward_dq(dqkv, ds, qkv, pos_key, rel, B, T, NH, HS, sc);
}

extern "C" __global__ void deberta_attn_bwd_dkv_f32(float* dqkv, const float* ds, const float* probs, const float* dout,
                                                    const float* qkv, const float* pos_query, const int* rel, int B,
                                                    int T, int NH, int HS, float sc, float p_drop, uint64_t seed) {
  attn_backward_dkv(dqkv, ds, probs, dout, qkv, pos_query, rel, B, T, NH, HS, sc, p_drop, seed);
}

extern "C" __global__ void deberta_attn_bwd_dkv_bf16(lm::bf16* dqkv, const float* ds, const float* probs,
                                                     const lm::bf16* dout, const lm::bf16* qkv,
                                                     const lm::bf16* pos_query, const int* rel, int B, int T, int NH,
                                                     int HS, float sc, float p_drop, uint64_t seed) {
  attn_backward_dkv(dqkv, ds, probs, dout, qkv, pos_query, rel, B, T, NH, HS, sc, p_drop, seed);
}

extern "C" __global__ void deberta_rel_grad_f32(float* dpos, const float* ds, const float* qkv, const int* rows_start,
                                                const int* rows_delta, int B, int T, int NH, int HS, float sc,
                                                int query) {
  rel_backward(dpos, ds, qkv, rows_start, rows_delta, B, T, NH, HS, sc, query);
}

extern "C" __global__ void deberta_rel_grad_bf16(lm::bf16* dpos, const float* ds, const lm::bf16* qkv,
                                                 const int* rows_start, const int* rows_delta, int B, int T, int NH,
                                                 int HS, float sc, int query) {
  rel_backward(dpos, ds, qkv, rows_start, rows_delta, B, T, NH, HS, sc, query);
}

extern "C" __global__ void conv1d_unfold_f32(float* out, const float* x, int B, int T, int C, int K) {
  conv_unfold(out, x, B, T, C, K);
}

extern "C" __global__ void conv1d_unfold_bf16(lm::bf16* out, const lm::bf16* x, int B, int T, int C, int K) {
  conv_unfold(out, x, B, T, C, K);
}

extern "C" __global__ void conv1d_fold_f32(float* dx, const float* dcol, int B, int T, int C, int K) {
  conv_fold(dx, dcol, B, T, C, K);
}

extern "C" __global__ void conv1d_fold_bf16(lm::bf16* dx, const lm::bf16* dcol, int B, int T, int C, int K) {
  conv_fold(dx, dcol, B, T, C, K);
}
