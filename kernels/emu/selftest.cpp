// selftest.cpp: checks of the emulator itself (cuemu.h), one case per run:
//   cuemu-selftest <case>     exit 0: result correct, 3: result wrong, abort: bug reported
// Cases that must pass exercise what lmtrain's kernels do not (yet) use: static shared
// memory, votes, every shuffle flavour with sub-warp widths, atomics across OS threads,
// 2-D blocks, nvcuda::wmma. Cases named bug_* contain a planted kernel bug that the emulator
// must expose (tests/cuda_emulator.rs states in which thread order).
#include "../common.cuh"

#include <string>

namespace {

int g_status = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "selftest: wrong result: %s\n", what);
    g_status = 3;
  }
}

// ---- cases that must pass ------------------------------------------------------------
__global__ void votes_kernel(unsigned* out) {
  __shared__ unsigned ballots[4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
  const int any = __any_sync(0xffffffffu, lane == 31 && warp == 1);
  const int all = __all_sync(0xffffffffu, lane < 32);
  if (lane == 0) ballots[warp] = b ^ unsigned(any) ^ (unsigned(all) << 1);
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 0; w < 4; ++w) out[w] = ballots[w];
}

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane + 1;
  for (int d = 1; d < 32; d <<= 1) {  // inclusive prefix sum
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  const int down = __shfl_down_sync(0xffffffffu, lane, 3, 8);  // within groups of 8
  const int idx = __shfl_sync(0xffffffffu, lane * 10, 5, 16);   // lane 5 of each half
  const int x = __shfl_xor_sync(0xffffffffu, lane, 1);
  out[threadIdx.x * 4 + 0] = v;
  out[threadIdx.x * 4 + 1] = down;
  out[threadIdx.x * 4 + 2] = idx;
  out[threadIdx.x * 4 + 3] = x;
}

__global__ void atomics_kernel(int* count, float* sum, int* maxv, unsigned* cas_count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(count, 1);
  atomicAdd(sum, 0.5f);
  atomicMax(maxv, i);
  unsigned old = *cas_count, seen;  // atomicAdd built from a CAS loop
  while ((seen = atomicCAS(cas_count, old, old + 1)) != old) old = seen;
}

__global__ void transpose_kernel(const float* in, float* out, int w) {  // 2-D block, dynamic smem tile
  DYN_SMEM(float, tile);
  const int x = threadIdx.x, y = threadIdx.y;
  tile[y * blockDim.x + x] = in[y * w + x];
  __syncthreads();
  out[x * blockDim.y + y] = tile[y * blockDim.x + x];
}

__global__ void wmma_kernel(const lm::bf16* a, const lm::bf16* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, lm::bf16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, lm::bf16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// Legal: a full mask may name lanes that have exited or do not exist (the second warp of a
// 48-thread block has 16 lanes); they are not waited for, as long as nobody reads from them.
__global__ void partial_warps_kernel(int* y) {
  if (threadIdx.x % 32 >= 24) return;
  y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// ---- planted bugs ----------------------------------------------------------------------
__global__ void bug_missing_sync_broadcast(const float* x, float* y) {
  __shared__ float v;
  if (threadIdx.x == 0) v = 2.f * x[0];
  y[threadIdx.x] = v;  // BUG: no __syncthreads() between the write and the reads
}

__global__ void bug_divergent_syncthreads(float* y) {
  if (threadIdx.x < 16) {
    __syncthreads();  // BUG: two different barriers
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.f;
}

__global__ void bug_shuffle_from_exited_lane(int* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), threadIdx.x + 16);  // BUG: the source has exited
}

}  // namespace

template <class... P, class... A>
void run(void (*k)(P...), const char* name, dim3 grid, dim3 block, size_t smem, A... args) {
  std::tuple<P...> tup(args...);
  cuemu::launch(name, grid, block, smem, [&] { std::apply(k, tup); });
}

int main(int argc, char** argv) {
  const std::string c = argc > 1 ? argv[1] : "";
  if (c == "votes") {
    unsigned out[4];
    run(votes_kernel, "votes", dim3(1), dim3(128), 0, out);
    unsigned every3 = 0;
    for (int l = 0; l < 32; l += 3) every3 |= 1u << l;
    for (int w = 0; w < 4; ++w) expect(out[w] == (every3 ^ unsigned(w == 1) ^ 2u), "ballot/any/all");
  } else if (c == "shuffles") {
    std::vector<int> out(64 * 4);
    run(shuffle_kernel, "shuffles", dim3(1), dim3(64), 0, out.data());
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32;
      expect(out[t * 4 + 0] == (lane + 1) * (lane + 2) / 2, "__shfl_up_sync prefix sum");
      expect(out[t * 4 + 1] == ((lane % 8) + 3 < 8 ? lane + 3 : lane), "__shfl_down_sync width 8");
      expect(out[t * 4 + 2] == ((lane / 16) * 16 + 5) * 10, "__shfl_sync width 16");
      expect(out[t * 4 + 3] == (lane ^ 1), "__shfl_xor_sync");
    }
  } else if (c == "atomics") {
    int count = 0, maxv = -1;
    float sum = 0.f;
    unsigned cas = 0;
    run(atomics_kernel, "atomics", dim3(37), dim3(96), 0, &count, &sum, &maxv, &cas);
    expect(count == 37 * 96 && cas == 37u * 96u, "atomicAdd/atomicCAS counts");
    expect(sum == 0.5f * 37 * 96 && maxv == 37 * 96 - 1, "atomicAdd(float)/atomicMax");
  } else if (c == "transpose_2d") {
    const int w = 16, h = 8;
    std::vector<float> in(w * h), out(w * h);
    for (int i = 0; i < w * h; ++i) in[i] = float(i);
    run(transpose_kernel, "transpose", dim3(1), dim3(w, h), w * h * sizeof(float), in.data(), out.data(), w);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) expect(out[x * h + y] == in[y * w + x], "2-D block transpose");
  } else if (c == "wmma") {
    std::vector<lm::bf16> a(256), b(256);
    std::vector<float> af(256), bf(256), cc(256);
    for (int i = 0; i < 256; ++i) {
      a[i] = __float2bfloat16(float(i % 7) - 3.f);
      b[i] = __float2bfloat16(float(i % 5) * 0.5f);
      af[i] = __bfloat162float(a[i]);
      bf[i] = __bfloat162float(b[i]);
    }
    run(wmma_kernel, "wmma", dim3(1), dim3(32), 0, a.data(), b.data(), cc.data());
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float r = 1.f;
        for (int k = 0; k < 16; ++k) r += af[i * 16 + k] * bf[j * 16 + k];  // b is col-major
        expect(cc[i * 16 + j] == r, "wmma 16x16x16 bf16 -> f32");
      }
  } else if (c == "partial_warps") {
    int y[48];
    run(partial_warps_kernel, "partial_warps", dim3(1), dim3(48), 0, y);
    for (int t = 0; t < 48; ++t)
      if (t % 32 < 24) expect(y[t] == (t ^ 1), "xor shuffle with exited lanes in the mask");
  } else if (c == "bug_missing_sync_broadcast") {
    float x = 1.f, y[64];
    run(bug_missing_sync_broadcast, "bug_missing_sync_broadcast", dim3(1), dim3(64), 0, &x, y);
    for (float v : y) expect(v == 2.f, "broadcast through shared memory");
  } else if (c == "bug_divergent_syncthreads") {
    float y[32];
    run(bug_divergent_syncthreads, "bug_divergent_syncthreads", dim3(1), dim3(32), 0, y);
  } else if (c == "bug_shuffle_from_exited_lane") {
    int y[32];
    run(bug_shuffle_from_exited_lane, "bug_shuffle_from_exited_lane", dim3(1), dim3(32), 0, y);
  } else {
    fprintf(stderr, "usage: cuemu-selftest <case>\n");
    return 2;
  }
  return g_status;
}
