// Fused (flash-style) multi-head self-attention over a fused qkv activation.
//
// Layout (as lmtrain_cpu::ops::attention_forward): qkv is [B, T, 3C] row-major, C = NH * HS,
// q of head h at columns h*HS, k at C + h*HS, v at 2C + h*HS; out is [B, T, C]; lse [B, NH, T].
//
// Math, per (batch b, head h), scale = 1/sqrt(HS):
//   S_ij  = scale q_i . k_j, masked to -inf where key j is padding (key_valid[b, j] == 0) or,
//           causal, j > i;
//   P_ij  = softmax_j(S_ij)            (a row with every key masked: P = 0, out = 0, lse = -inf)
//   Z_ij  = dropout factor of element (b*NH + h)*T*T + i*T + j: 0 or 1/(1-p), the SAME
//           counter-based hash as lmtrain_backend::Dropout::factor, so CPU and GPU drop alike
//   out_i = sum_j Z_ij P_ij v_j ;       lse_i = log sum_j exp(S_ij) (the only saved statistic)
// Backward (FA2 form, D_i = dout_i . out_i = sum_j P_ij Z_ij dP'_ij):
//   dP'_ij = dout_i . v_j ;  dS_ij = P_ij (Z_ij dP'_ij - D_i)
//   dv_j += sum_i Z_ij P_ij dout_i ;  dq_i += scale sum_j dS_ij k_j ;  dk_j += scale sum_i dS_ij q_i
// Every *_bwd kernel ACCUMULATES into dqkv. dq and dk/dv are separate kernels (each sums
// over its own loop in a fixed order, no atomics), so two launches give identical bits.
//
// Tiles: a block (128 threads, 4 warps) owns BR query rows (forward, dq) or BC key rows
// (dk/dv) and streams the other side through shared memory in tiles; no T x T matrix ever
// reaches global memory. Tile products run on tensor cores (nvcuda::wmma 16x16x16, bf16 in,
// f32 accumulate) for bf16 storage and as f32 FMA loops for f32 storage; the emulator runs
// both (its wmma computes whole tiles per lane). HS is zero-padded to HP = a multiple of 16.
// The host picks BR/BC so the layout below fits the 48 KiB of dynamic shared memory a
// launch gets without opt-in (see crates/cuda/src/kernels.rs, attention_smem_*).
//
// Bytes per call (E = bytes per element, N = B*T): forward reads qkv once per query block for
// q (N*C*E) and once per query block for k, v (2*N*C*E * ceil(T/BR), halved when causal),
// writes out + lse (N*C*E + 4*B*NH*T); backward reads q, k, v, out, dout, lse, D and writes
// dqkv (read-modify-write). FLOPs: forward 4*B*NH*T*T*HS (S and P.V; half when causal);
// backward 10*B*NH*T*T*HS here (S and dP' recomputed in both kernels, plus dV, dK, dQ; the
// minimum is 8: one S recompute).
#include "common.cuh"

#include <type_traits>

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// C[M x N] (f32, row-major, ldc) = (acc ? C : 0) + A . B, every operand in shared memory.
// A is M x K row-major (lda) or, with TA, stored K x M row-major (A^T); B is K x N row-major
// (ldb) or, with TB, stored N x K row-major (B^T). M, N, K are multiples of 16, leading
// dimensions multiples of 16, pointers 32-byte aligned. All threads of the block call it;
// it has no block barrier (callers synchronise around it).
template <bool TA, bool TB, class T>
__device__ void tile_mm(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K, bool acc) {
  if constexpr (std::is_same<T, lm::bf16>::value) {
    using namespace nvcuda;
    using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, tn = N / 16, tiles = (M / 16) * tn;
    for (int tile = warp; tile < tiles; tile += kWarps) {  // warp-uniform loop
      const int r0 = tile / tn * 16, c0 = tile % tn * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (acc)
        wmma::load_matrix_sync(c, C + r0 * ldc + c0, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(c, 0.f);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, lm::bf16, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, lm::bf16, LB> b;
        wmma::load_matrix_sync(a, TA ? A + k0 * lda + r0 : A + r0 * lda + k0, lda);
        wmma::load_matrix_sync(b, TB ? B + c0 * ldb + k0 : B + k0 * ldb + c0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + r0 * ldc + c0, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int r = idx / N, cc = idx % N;
      float s = acc ? C[r * ldc + cc] : 0.f;
      for (int k = 0; k < K; ++k) {
        const float a = lm::to_f32(TA ? A[k * lda + r] : A[r * lda + k]);
        const float b = lm::to_f32(TB ? B[cc * ldb + k] : B[k * ldb + cc]);
        s += a * b;
      }
      C[r * ldc + cc] = s;
    }
  }
}

// Bump allocator over the dynamic shared memory; every region 32-byte aligned. The host
// mirrors these sizes in kernels.rs (attention_smem_*).
struct Smem {
  unsigned char* p;
  template <class U>
  __device__ U* take(int n) {
    U* r = reinterpret_cast<U*>(p);
    p += (size_t(n) * sizeof(U) + 31) / 32 * 32;
    return r;
  }
};

struct Geometry {
  int B, T, NH, HS, HP, C;
  __device__ size_t row(int b, int t) const { return (size_t(b) * T + t) * 3 * C; }
};

// Loads rows [r0, r0 + R) of one head's slice (column offset col) of qkv-like [B, T, ld]
// storage into a zero-padded R x HP tile.
template <class T>
__device__ void load_tile(T* tile, const T* base, size_t ld, int b, int r0, int R, const Geometry& g, int col) {
  for (int idx = threadIdx.x; idx < R * g.HP; idx += blockDim.x) {
    const int r = idx / g.HP, d = idx % g.HP, t = r0 + r;
    tile[idx] = (t < g.T && d < g.HS) ? base[(size_t(b) * g.T + t) * ld + col + d] : lm::from_f32<T>(0.f);
  }
}

__device__ __forceinline__ bool key_ok(const unsigned char* key_valid, int b, int T, int i, int j, int causal) {
  return j < T && (!causal || j <= i) && (!key_valid || key_valid[size_t(b) * T + j]);
}

template <class T>
__device__ void attn_forward(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,
                             const unsigned char* __restrict__ key_valid, int B, int seq, int NH, int HS,
                             int causal, float p_drop, uint64_t seed, int BR, int BC) {
  const Geometry g{B, seq, NH, HS, (HS + 15) / 16 * 16, NH * HS};
  const int HP = g.HP, bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BR;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float scale = 1.f / sqrtf(float(HS));  // as the CPU: 1 / sqrt(head_size)
  DYN_SMEM(unsigned char, raw);
  Smem sm{raw};
  T* q = sm.take<T>(BR * HP);
  T* k = sm.take<T>(BC * HP);
  T* v = sm.take<T>(BC * HP);
  float* s = sm.take<float>(BR * BC);
  T* pb = sm.take<T>(BR * BC);
  float* o = sm.take<float>(BR * HP);
  float* m = sm.take<float>(BR);
  float* l = sm.take<float>(BR);

  const size_t ld = size_t(3) * g.C;
  load_tile(q, qkv, ld, b, i0, BR, g, h * HS);
  for (int idx = threadIdx.x; idx < BR * HP; idx += blockDim.x) o[idx] = 0.f;
  for (int r = threadIdx.x; r < BR; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const int kend = causal ? min(seq, i0 + BR) : seq;
  const uint64_t drop_base = uint64_t(bh) * seq * seq;
  for (int j0 = 0; j0 < kend; j0 += BC) {
    __syncthreads();  // the previous tile's k, v, pb are consumed
    load_tile(k, qkv, ld, b, j0, BC, g, g.C + h * HS);
    load_tile(v, qkv, ld, b, j0, BC, g, 2 * g.C + h * HS);
    __syncthreads();
    tile_mm<false, true>(s, BC, q, HP, k, HP, BR, BC, HP, false);  // S = Q K^T
    __syncthreads();
    // Online softmax: warp w owns rows w, w + 4, ...; lanes run over the tile's keys.
    for (int r = warp; r < BR; r += kWarps) {
      const int i = i0 + r;
      float mx = -INFINITY;
      for (int c = lane; c < BC; c += 32)
        if (key_ok(key_valid, b, seq, i, j0 + c, causal)) mx = fmaxf(mx, s[r * BC + c] * scale);
      const float m_old = m[r];
      const float m_new = fmaxf(m_old, lm::warp_max(mx));
      // m_new == -inf: nothing seen yet in this row, keep zeros
      const float alpha = m_new == -INFINITY ? 1.f : lm::exp_for<T>(m_old - m_new);
      float sum = 0.f;
      for (int c = lane; c < BC; c += 32) {
        const int j = j0 + c;
        float p = 0.f;
        if (key_ok(key_valid, b, seq, i, j, causal) && m_new != -INFINITY) p = lm::exp_for<T>(s[r * BC + c] * scale - m_new);
        sum += p;
        if (p_drop > 0.f && p != 0.f && i < seq) p *= lm::dropout_factor(p_drop, seed, drop_base + uint64_t(i) * seq + j);
        pb[r * BC + c] = lm::from_f32<T>(p);
      }
      sum = lm::warp_sum(sum);
      for (int d = lane; d < HP; d += 32) o[r * HP + d] *= alpha;
      if (lane == 0) {
        m[r] = m_new;
        l[r] = l[r] * alpha + sum;
      }
    }
    __syncthreads();
    tile_mm<false, false>(o, HP, pb, BC, v, HP, BR, HP, BC, true);  // O += P V
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BR * HS; idx += blockDim.x) {
    const int r = idx / HS, d = idx % HS, i = i0 + r;
    if (i >= seq) continue;
    const float li = l[r];
    out[(size_t(b) * seq + i) * g.C + h * HS + d] = lm::from_f32<T>(li > 0.f ? o[r * HP + d] / li : 0.f);
  }
  for (int r = threadIdx.x; r < BR; r += blockDim.x) {
    const int i = i0 + r;
    if (i < seq) lse[size_t(bh) * seq + i] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

// D[b, h, i] = dout_i . out_i (f32), one warp per row.
template <class T>
__device__ void attn_backward_prep(float* __restrict__ D, const T* __restrict__ out, const T* __restrict__ dout,
                                   int B, int seq, int NH, int HS) {
  const int lane = threadIdx.x % 32;
  const size_t row = size_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // over (b, h, i)
  if (row >= size_t(B) * NH * seq) return;  // whole warps leave together
  const int i = int(row % seq), bh = int(row / seq), b = bh / NH, h = bh % NH;
  const size_t at = (size_t(b) * seq + i) * NH * HS + size_t(h) * HS;
  float acc = 0.f;
  for (int d = lane; d < HS; d += 32) acc += lm::to_f32(dout[at + d]) * lm::to_f32(out[at + d]);
  acc = lm::warp_sum(acc);
  if (lane == 0) D[row] = acc;
}

// P, Z and dS of one S / dP' tile (BR x BC) in place: s becomes dS (f32); pz gets Z*P (T) when
// given, ds gets dS (T).
template <class T>
__device__ void softmax_grad_tile(float* s, const float* dp, T* pz, T* ds, const float* lse_r, const float* d_r,
                                  const unsigned char* key_valid, int b, int seq, int i0, int j0, int BR, int BC,
                                  int causal, float scale, float p_drop, uint64_t seed, uint64_t drop_base) {
  for (int idx = threadIdx.x; idx < BR * BC; idx += blockDim.x) {
    const int r = idx / BC, c = idx % BC, i = i0 + r, j = j0 + c;
    float p = 0.f;
    if (i < seq && lse_r[r] != -INFINITY && key_ok(key_valid, b, seq, i, j, causal)) p = lm::exp_for<T>(s[idx] * scale - lse_r[r]);
    const float z = (p_drop > 0.f && p != 0.f) ? lm::dropout_factor(p_drop, seed, drop_base + uint64_t(i) * seq + j) : 1.f;
    if (pz) pz[idx] = lm::from_f32<T>(p * z);
    const float g = p * (dp[idx] * z - d_r[r]);
    ds[idx] = lm::from_f32<T>(g);
  }
}

template <class T>
__device__ void load_rows_stats(float* lse_r, float* d_r, const float* lse, const float* D, size_t bh, int seq, int i0, int BR) {
  for (int r = threadIdx.x; r < BR; r += blockDim.x) {
    const int i = i0 + r;
    lse_r[r] = i < seq ? lse[bh * seq + i] : -INFINITY;
    d_r[r] = i < seq ? D[bh * seq + i] : 0.f;
  }
}

// dq += scale * dS K for the block's BR query rows.
template <class T>
__device__ void attn_backward_dq(T* __restrict__ dqkv, const T* __restrict__ dout, const T* __restrict__ qkv,
                                 const float* __restrict__ lse, const float* __restrict__ D,
                                 const unsigned char* __restrict__ key_valid, int B, int seq, int NH, int HS,
                                 int causal, float p_drop, uint64_t seed, int BR, int BC) {
  const Geometry g{B, seq, NH, HS, (HS + 15) / 16 * 16, NH * HS};
  const int HP = g.HP, bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BR;
  const float scale = 1.f / sqrtf(float(HS));  // as the CPU: 1 / sqrt(head_size)
  DYN_SMEM(unsigned char, raw);
  Smem sm{raw};
  T* q = sm.take<T>(BR * HP);
  T* dq_in = sm.take<T>(BR * HP);  // dout rows
  T* k = sm.take<T>(BC * HP);
  T* v = sm.take<T>(BC * HP);
  float* s = sm.take<float>(BR * BC);
  float* dp = sm.take<float>(BR * BC);
  T* ds = sm.take<T>(BR * BC);
  float* dq = sm.take<float>(BR * HP);
  float* lse_r = sm.take<float>(BR);
  float* d_r = sm.take<float>(BR);

  const size_t ld = size_t(3) * g.C;
  load_tile(q, qkv, ld, b, i0, BR, g, h * HS);
  load_tile(dq_in, dout, size_t(g.C), b, i0, BR, g, h * HS);
  load_rows_stats<T>(lse_r, d_r, lse, D, size_t(bh), seq, i0, BR);
  for (int idx = threadIdx.x; idx < BR * HP; idx += blockDim.x) dq[idx] = 0.f;
  const int kend = causal ? min(seq, i0 + BR) : seq;
  const uint64_t drop_base = uint64_t(bh) * seq * seq;
  for (int j0 = 0; j0 < kend; j0 += BC) {
    __syncthreads();
    load_tile(k, qkv, ld, b, j0, BC, g, g.C + h * HS);
    load_tile(v, qkv, ld, b, j0, BC, g, 2 * g.C + h * HS);
    __syncthreads();
    tile_mm<false, true>(s, BC, q, HP, k, HP, BR, BC, HP, false);       // S = Q K^T
    tile_mm<false, true>(dp, BC, dq_in, HP, v, HP, BR, BC, HP, false);  // dP' = dO V^T
    __syncthreads();
    softmax_grad_tile<T>(s, dp, nullptr, ds, lse_r, d_r, key_valid, b, seq, i0, j0, BR, BC, causal, scale, p_drop, seed,
                         drop_base);
    __syncthreads();
    tile_mm<false, false>(dq, HP, ds, BC, k, HP, BR, HP, BC, true);  // dQ += dS K
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BR * HS; idx += blockDim.x) {
    const int r = idx / HS, d = idx % HS, i = i0 + r;
    if (i >= seq) continue;
    T* dst = dqkv + g.row(b, i) + h * HS + d;
    *dst = lm::from_f32<T>(lm::to_f32(*dst) + scale * dq[r * HP + d]);
  }
}

// dk += scale * dS^T Q and dv += (Z P)^T dout for the block's BC key rows.
template <class T>
__device__ void attn_backward_dkv(T* __restrict__ dqkv, const T* __restrict__ dout, const T* __restrict__ qkv,
                                  const float* __restrict__ lse, const float* __restrict__ D,
                                  const unsigned char* __restrict__ key_valid, int B, int seq, int NH, int HS,
                                  int causal, float p_drop, uint64_t seed, int BR, int BC) {
  const Geometry g{B, seq, NH, HS, (HS + 15) / 16 * 16, NH * HS};
  const int HP = g.HP, bh = blockIdx.y, b = bh / NH, h = bh % NH, j0 = blockIdx.x * BC;
  const float scale = 1.f / sqrtf(float(HS));  // as the CPU: 1 / sqrt(head_size)
  DYN_SMEM(unsigned char, raw);
  Smem sm{raw};
  T* k = sm.take<T>(BC * HP);
  T* v = sm.take<T>(BC * HP);
  T* q = sm.take<T>(BR * HP);
  T* dy = sm.take<T>(BR * HP);
  float* s = sm.take<float>(BR * BC);
  float* dp = sm.take<float>(BR * BC);
  T* pz = sm.take<T>(BR * BC);
  T* ds = sm.take<T>(BR * BC);
  float* dk = sm.take<float>(BC * HP);
  float* dv = sm.take<float>(BC * HP);
  float* lse_r = sm.take<float>(BR);
  float* d_r = sm.take<float>(BR);

  const size_t ld = size_t(3) * g.C;
  load_tile(k, qkv, ld, b, j0, BC, g, g.C + h * HS);
  load_tile(v, qkv, ld, b, j0, BC, g, 2 * g.C + h * HS);
  for (int idx = threadIdx.x; idx < BC * HP; idx += blockDim.x) dk[idx] = dv[idx] = 0.f;
  const int istart = causal ? j0 / BR * BR : 0;  // earlier queries see none of these keys
  const uint64_t drop_base = uint64_t(bh) * seq * seq;
  for (int i0 = istart; i0 < seq; i0 += BR) {
    __syncthreads();
    load_tile(q, qkv, ld, b, i0, BR, g, h * HS);
    load_tile(dy, dout, size_t(g.C), b, i0, BR, g, h * HS);
    load_rows_stats<T>(lse_r, d_r, lse, D, size_t(bh), seq, i0, BR);
    __syncthreads();
    tile_mm<false, true>(s, BC, q, HP, k, HP, BR, BC, HP, false);    // S = Q K^T
    tile_mm<false, true>(dp, BC, dy, HP, v, HP, BR, BC, HP, false);  // dP' = dO V^T
    __syncthreads();
    softmax_grad_tile<T>(s, dp, pz, ds, lse_r, d_r, key_valid, b, seq, i0, j0, BR, BC, causal, scale, p_drop, seed,
                         drop_base);
    __syncthreads();
    tile_mm<true, false>(dv, HP, pz, BC, dy, HP, BC, HP, BR, true);  // dV += (Z P)^T dO
    tile_mm<true, false>(dk, HP, ds, BC, q, HP, BC, HP, BR, true);   // dK += dS^T Q
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BC * HS; idx += blockDim.x) {
    const int r = idx / HS, d = idx % HS, j = j0 + r;
    if (j >= seq) continue;
    T* dkp = dqkv + g.row(b, j) + g.C + h * HS + d;
    T* dvp = dqkv + g.row(b, j) + 2 * g.C + h * HS + d;
    *dkp = lm::from_f32<T>(lm::to_f32(*dkp) + scale * dk[r * HP + d]);
    *dvp = lm::from_f32<T>(lm::to_f32(*dvp) + dv[r * HP + d]);
  }
}

// Incremental causal attention for generation (batch 1), lmtrain_cpu::ops::attention_cached:
// query i (at position start + i, q is [n_new, C]) of head h over the cached keys and values
// 0..=start+i (k_cache, v_cache: [>= start + n_new, C]), scale = 1/sqrt(HS):
//   w_j = scale q_i . k_j ;  p_j = exp(w_j - max_j w) / sum_j exp(...) ;  out_i = sum_j p_j v_j
// One block per (i, h); its scores live in dynamic shared memory (4 * (start + n_new) bytes,
// checked by the host). Per block: reads q_i's head and (start+i+1) rows of the head's k and v
// (2 * (start+i+1) * HS * E bytes), writes HS * E; 4 * (start+i+1) * HS FLOPs. Decoding is
// bound by those cache reads, not by FLOPs, so plain loops suffice (no tensor cores).
template <class T>
__device__ void attn_cached(T* out, const T* q, const T* k_cache, const T* v_cache, int start, int NH, int HS) {
  __shared__ float red[33];
  DYN_SMEM(float, w);
  const int i = blockIdx.x, h = blockIdx.y, C = NH * HS, n = start + i + 1;
  const float scale = 1.f / sqrtf(float(HS));
  const T* qh = q + size_t(i) * C + h * HS;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T* kh = k_cache + size_t(j) * C + h * HS;
    float dot = 0.f;
    for (int d = 0; d < HS; ++d) dot += lm::to_f32(qh[d]) * lm::to_f32(kh[d]);
    w[j] = dot * scale;
    mx = fmaxf(mx, w[j]);
  }
  mx = lm::block_max(mx, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    w[j] = lm::exp_for<T>(w[j] - mx);
    sum += w[j];
  }
  sum = lm::block_sum(sum, red);  // its barriers also publish every w[j]
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float o = 0.f;
    for (int j = 0; j < n; ++j) o += w[j] / sum * lm::to_f32(v_cache[size_t(j) * C + h * HS + d]);
    out[size_t(i) * C + h * HS + d] = lm::from_f32<T>(o);
  }
}

}  // namespace

extern "C" __global__ __launch_bounds__(kThreads) void attention_fwd_f32(
    float* out, float* lse, const float* qkv, const unsigned char* key_valid, int B, int seq, int NH, int HS, int causal,
    float p_drop, uint64_t seed, int BR, int BC) {
  attn_forward(out, lse, qkv, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_prep_f32(float* D, const float* out,
                                                                              const float* dout, int B, int seq,
                                                                              int NH, int HS) {
  attn_backward_prep(D, out, dout, B, seq, NH, HS);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_dq_f32(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* D, const unsigned char* key_valid,
    int B, int seq, int NH, int HS, int causal, float p_drop, uint64_t seed, int BR, int BC) {
  attn_backward_dq(dqkv, dout, qkv, lse, D, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_dkv_f32(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* D, const unsigned char* key_valid,
    int B, int seq, int NH, int HS, int causal, float p_drop, uint64_t seed, int BR, int BC) {
  attn_backward_dkv(dqkv, dout, qkv, lse, D, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_fwd_bf16(
    lm::bf16* out, float* lse, const lm::bf16* qkv, const unsigned char* key_valid, int B, int seq, int NH, int HS, int causal,
    float p_drop, uint64_t seed, int BR, int BC) {
  attn_forward(out, lse, qkv, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_prep_bf16(float* D, const lm::bf16* out,
                                                                              const lm::bf16* dout, int B, int seq,
                                                                              int NH, int HS) {
  attn_backward_prep(D, out, dout, B, seq, NH, HS);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_dq_bf16(
    lm::bf16* dqkv, const lm::bf16* dout, const lm::bf16* qkv, const float* lse, const float* D, const unsigned char* key_valid,
    int B, int seq, int NH, int HS, int causal, float p_drop, uint64_t seed, int BR, int BC) {
  attn_backward_dq(dqkv, dout, qkv, lse, D, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_bwd_dkv_bf16(
    lm::bf16* dqkv, const lm::bf16* dout, const lm::bf16* qkv, const float* lse, const float* D, const unsigned char* key_valid,
    int B, int seq, int NH, int HS, int causal, float p_drop, uint64_t seed, int BR, int BC) {
  attn_backward_dkv(dqkv, dout, qkv, lse, D, key_valid, B, seq, NH, HS, causal, p_drop, seed, BR, BC);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_cached_f32(float* out, const float* q,
                                                                          const float* k_cache, const float* v_cache,
                                                                          int start, int NH, int HS) {
  attn_cached(out, q, k_cache, v_cache, start, NH, HS);
}
extern "C" __global__ __launch_bounds__(kThreads) void attention_cached_bf16(lm::bf16* out, const lm::bf16* q,
                                                                           const lm::bf16* k_cache,
                                                                           const lm::bf16* v_cache, int start, int NH,
                                                                           int HS) {
  attn_cached(out, q, k_cache, v_cache, start, NH, HS);
}
