// Fused classifier: softmax + cross-entropy loss + dlogits, in place, over selected rows.
//
// For each selected entry s (row r = rows[s] of logits [*, V], target y = targets[s]):
//   loss_s = log sum_j exp(x_j) - x_y                       (0 when y == -100, ignored)
//   with write_grad: x_j <- dloss * (softmax(x)_j - [j == y])  (an ignored row becomes 0;
//   values below the smallest normal float flush to 0, as lmtrain_cpu::ops::cross_entropy)
// Rows not selected are not touched. One block per selected row streams the vocabulary in
// blockDim-wide chunks with an online max/sum (no second full-size buffer, probabilities
// never stored); per-thread partials combine in a fixed order, so the bits are reproducible.
// classifier_loss_sum adds the per-row losses in a fixed order, in f64, on one block.
//
// Bytes per call (E = bytes per element, S = selected rows): S*V*E read twice (statistics,
// then gradient) and S*V*E written, plus 12 bytes per row; FLOPs ~ 5*S*V plus 2 exponentials
// per logit (one without write_grad).
#include "common.cuh"

namespace {

constexpr int kIgnore = -100;
constexpr int kThreads = 256;

template <class T>
__device__ void classifier(T* __restrict__ logits, float* __restrict__ losses, const int* __restrict__ rows,
                           const int* __restrict__ targets, int vocab, float dloss, int write_grad) {
  __shared__ float scratch[33];
  const int sel = blockIdx.x, y = targets[sel];
  T* x = logits + size_t(rows[sel]) * vocab;
  if (y == kIgnore) {  // uniform over the block: the whole block leaves
    if (write_grad)
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = lm::from_f32<T>(0.f);
    if (threadIdx.x == 0) losses[sel] = 0.f;
    return;
  }
  const float target_logit = lm::to_f32(x[y]);  // read before anyone overwrites the row
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = lm::to_f32(x[j]);
    if (v > m) {
      s = s * lm::exp_for<T>(m - v) + 1.f;
      m = v;
    } else {
      s += lm::exp_for<T>(v - m);
    }
  }
  const float M = lm::block_max(m, scratch);
  const float S = lm::block_sum(m == -INFINITY ? 0.f : s * lm::exp_for<T>(m - M), scratch);
  if (threadIdx.x == 0) losses[sel] = logf(S) + M - target_logit;
  if (!write_grad) return;
  const float inv = dloss / S;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    float g = lm::exp_for<T>(lm::to_f32(x[j]) - M) * inv;
    if (fabsf(g) < 1.17549435e-38f) g = 0.f;  // flush subnormals (FLT_MIN)
    if (j == y) g -= dloss;
    x[j] = lm::from_f32<T>(g);
  }
}

}  // namespace

extern "C" __global__ __launch_bounds__(kThreads) void classifier_f32(float* logits, float* losses, const int* rows,
                                                                      const int* targets, int vocab, float dloss,
                                                                      int write_grad) {
  classifier(logits, losses, rows, targets, vocab, dloss, write_grad);
}

extern "C" __global__ __launch_bounds__(kThreads) void classifier_bf16(lm::bf16* logits, float* losses,
                                                                       const int* rows, const int* targets, int vocab,
                                                                       float dloss, int write_grad) {
  classifier(logits, losses, rows, targets, vocab, dloss, write_grad);
}

// total[0] = sum of losses[0..n) in f64: thread i adds i, i + 256, ... in order, then a fixed
// tree over the 256 partials. One block of 256 threads.
extern "C" __global__ __launch_bounds__(kThreads) void classifier_loss_sum_f32(double* total, const float* losses,
                                                                               int n) {
  __shared__ double part[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += double(losses[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) total[0] = part[0];
}

// loss_accumulate: loss[0] += double(float(total[0] / n_labels)) * weight (one thread: the mean
// rounded to f32 first, as the CPU backend adds a model's reported loss to the step's stats).
extern "C" __global__ void loss_accumulate_f32(double* loss, const double* total, double n_labels, double weight) {
  if (lm::global_thread() == 0) loss[0] += double(float(total[0] / n_labels)) * weight;
}
