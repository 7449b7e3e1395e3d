// Embeddings: word + position (+ token type) lookup, and a deterministic backward.
//
// Forward, for each token n = b*T + t:
//   out[n, :] = wte[ids[n], :] (+ wpe[pos[n], :] when wpe is given: DeBERTa-v3 has no position
//   table) (+ tte[types[n], :] when tte is given)
// (pos = explicit position ids, or pos_offset + t built by the host). Ids are validated on the
// host before upload (crates/cuda EmbeddingBatch), so the kernel does not range-check.
// Bytes: N*C*E written, N*C*E * (1 to 3) read. FLOPs 0 to 2 N*C.
//
// Backward, per table: the host groups the tokens by id ("buckets": the rows of each distinct
// id in increasing order, as llm.c sorts them); one thread per (bucket, channel) sums its rows
// in that order and adds the sum to the table row once:
//   dtable[key[k], c] += sum_{n in bucket k} dout[n, c]
// into an f32 table gradient (embedding_bwd_<dout type>) or, for the bf16 backend whose
// gradients are stored in bf16, into a bf16 one (embedding_bwd_bf16_grad_bf16: the sum in f32,
// rounded once per table element).
// No float atomics, so the result is the same bits every run. Bytes: N*C*E read (once per
// table) + distinct*C*4 (bf16 grad: *2) read-modify-written.
#include "common.cuh"

namespace {

template <class T>
__device__ void embedding_forward(T* __restrict__ out, const int* __restrict__ ids, const int* __restrict__ pos,
                                  const int* __restrict__ types, const T* __restrict__ wte,
                                  const T* __restrict__ wpe, const T* __restrict__ tte, int n_tokens, int C) {
  const uint64_t total = uint64_t(n_tokens) * C;
  for (uint64_t i = lm::global_thread(); i < total; i += lm::grid_threads()) {
    const int n = int(i / C), c = int(i % C);
    float v = lm::to_f32(wte[size_t(ids[n]) * C + c]);
    if (wpe) v += lm::to_f32(wpe[size_t(pos[n]) * C + c]);
    if (tte) v += lm::to_f32(tte[size_t(types[n]) * C + c]);
    out[i] = lm::from_f32<T>(v);
  }
}

template <class T, class G>
__device__ void embedding_backward(G* __restrict__ dtable, const T* __restrict__ dout,
                                   const int* __restrict__ start, const int* __restrict__ rows,
                                   const int* __restrict__ keys, int C) {
  const int k = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int i = start[k]; i < start[k + 1]; ++i) acc += lm::to_f32(dout[size_t(rows[i]) * C + c]);
  G& d = dtable[size_t(keys[k]) * C + c];
  d = lm::from_f32<G>(lm::to_f32(d) + acc);
}

}  // namespace

extern "C" __global__ void embedding_fwd_f32(float* out, const int* ids, const int* pos, const int* types,
                                             const float* wte, const float* wpe, const float* tte, int n_tokens,
                                             int C) {
  embedding_forward(out, ids, pos, types, wte, wpe, tte, n_tokens, C);
}

extern "C" __global__ void embedding_fwd_bf16(lm::bf16* out, const int* ids, const int* pos, const int* types,
                                              const lm::bf16* wte, const lm::bf16* wpe, const lm::bf16* tte,
                                              int n_tokens, int C) {
  embedding_forward(out, ids, pos, types, wte, wpe, tte, n_tokens, C);
}

extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout, const int* start, const int* rows,
                                             const int* keys, int C) {
  embedding_backward(dtable, dout, start, rows, keys, C);
}

extern "C" __global__ void embedding_bwd_bf16(float* dtable, const lm::bf16* dout, const int* start, const int* rows,
                                              const int* keys, int C) {
  embedding_backward(dtable, dout, start, rows, keys, C);
}

extern "C" __global__ void embedding_bwd_bf16_grad_bf16(lm::bf16* dtable, const lm::bf16* dout, const int* start,
                                                        const int* rows, const int* keys, int C) {
  embedding_backward(dtable, dout, start, rows, keys, C);
}
