// fake_cuda.cpp: a libcuda.so for machines without a GPU.
//
// Exports the CUDA driver API subset that cudarc 0.19 calls (cudarc resolves each symbol
// lazily, so a subset is enough). Device memory is host memory, every operation is
// synchronous (streams and events only keep time), and cuLaunchKernel runs the
// host-compiled kernel (see registry.h) under the cuemu fiber scheduler. The fake is
// strict where the real driver would fail or misbehave silently, and explains itself on
// stderr before returning an error:
//   * a module must contain readable PTX (PTX text, or a fatbin built with
//     --no-compress); its `.entry` names and `.param` lists are parsed;
//   * a kernel's PTX parameter list must match the host-compiled kernel (count and size);
//   * launches are checked against sm_90 limits (block shape, grid shape, dynamic shared
//     memory up to the per-function limit set by cuFuncSetAttribute);
//   * pointer arguments and memcpy/memset ranges must lie inside live allocations.
// FAKECUDA_TRACE=1 logs every call. cuemu_copy_counts reports how many host-to-device and
// device-to-host copies were made (the tests check that a training step makes no others than
// its batch upload and its one read of the step scalars); cuemu_alloc_counts how many
// allocations were made and are live (the training state is one).
#include "cuemu.h"
#include "registry.h"

#include <cstdarg>
#include <chrono>
#include <map>
#include <mutex>
#include <string>

namespace {

typedef int CUresult;
enum : CUresult {
  kSuccess = 0,
  kInvalidValue = 1,
  kOutOfMemory = 2,
  kInvalidDevice = 101,
  kInvalidImage = 200,
  kInvalidHandle = 400,
  kNotFound = 500,
  kLaunchOutOfResources = 701,
  kNotSupported = 801,
};

constexpr int kMaxThreads = 1024;
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kOptinSmem = 227 * 1024;  // sm_90 opt-in maximum per block
const char* const kDeviceName = "cuemu (host CPU emulating an sm_90 device)";

bool tracing() {
  static const bool on = getenv("FAKECUDA_TRACE") && *getenv("FAKECUDA_TRACE") && strcmp(getenv("FAKECUDA_TRACE"), "0");
  return on;
}
#define TRACE(...) \
  do {             \
    if (tracing()) { fprintf(stderr, "[fakecuda] " __VA_ARGS__); fputc('\n', stderr); } \
  } while (0)

CUresult complain(CUresult code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
CUresult complain(CUresult code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("fakecuda: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return code;
}

std::map<std::string, cuemu::KernelEntry>& kernels() {
  static std::map<std::string, cuemu::KernelEntry> k;
  return k;
}

// ---- device memory ------------------------------------------------------------------
std::mutex g_mem_mutex;
std::map<uintptr_t, size_t> g_allocs;  // base -> bytes

bool inside_allocation(uintptr_t p, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  auto it = g_allocs.upper_bound(p);
  if (it == g_allocs.begin()) return false;
  --it;
  return p >= it->first && p - it->first + bytes <= it->second;
}

CUresult check_range(const char* what, uintptr_t p, size_t bytes) {
  if (bytes == 0 || inside_allocation(p, bytes)) return kSuccess;
  return complain(kInvalidValue, "%s: device range [0x%lx, +%zu) is not inside one live allocation", what,
                  (unsigned long)p, bytes);
}

// ---- modules: what the PTX declares ------------------------------------------------
struct Function {
  const cuemu::KernelEntry* kernel;
  std::vector<size_t> ptx_params;
  int max_dynamic_smem = kDefaultSmem;
};

struct Module {
  std::map<std::string, std::vector<size_t>> entries;  // name -> PTX parameter sizes
  std::map<std::string, Function*> functions;
  ~Module() {
    for (auto& f : functions) delete f.second;
  }
};

size_t ptx_type_size(const std::string& t) {
  if (t.size() < 3) return 0;
  const int bits = atoi(t.c_str() + 2);  // ".u64" -> 64, ".f32" -> 32, ".b8" -> 8
  return (t[1] == 'u' || t[1] == 's' || t[1] == 'b' || t[1] == 'f') && bits % 8 == 0 ? size_t(bits / 8) : 0;
}

// Parses `.entry name( .param .u64 [.ptr ...] name_param_0, ... )` declarations out of a
// PTX text (which may sit inside a fatbin). Returns false on a malformed declaration.
bool parse_entries(const char* text, size_t len, Module& m) {
  const std::string s(text, len);
  for (size_t at = s.find(".entry "); at != std::string::npos; at = s.find(".entry ", at + 7)) {
    size_t b = at + 7, e = s.find_first_of("( \t\n", b);
    if (e == std::string::npos) return false;
    const std::string name = s.substr(b, e - b);
    size_t open = s.find('(', e), close = s.find(')', e);
    std::vector<size_t> params;
    if (open != std::string::npos && close != std::string::npos && open < close && s.find('{', e) > open) {
      std::string list = s.substr(open + 1, close - open - 1);
      size_t p = 0;
      while ((p = list.find(".param", p)) != std::string::npos) {
        size_t end = list.find(',', p);
        std::string decl = list.substr(p, end == std::string::npos ? std::string::npos : end - p);
        p = end == std::string::npos ? list.size() : end;
        size_t elem = 0, count = 1;
        size_t t = 0;
        while ((t = decl.find('.', t)) != std::string::npos) {
          size_t te = decl.find_first_of(" \t\n", t);
          std::string tok = decl.substr(t, te == std::string::npos ? std::string::npos : te - t);
          if (tok != ".param" && ptx_type_size(tok)) elem = ptx_type_size(tok);
          t = te == std::string::npos ? decl.size() : te;
        }
        size_t lb = decl.find('['), rb = decl.find(']');
        if (lb != std::string::npos && rb != std::string::npos) count = strtoull(decl.c_str() + lb + 1, nullptr, 10);
        if (!elem) return false;
        params.push_back(elem * count);
      }
    }
    auto prev = m.entries.find(name);
    if (prev != m.entries.end() && prev->second != params) return false;  // two PTX copies disagree
    m.entries[name] = params;
  }
  return true;
}

std::string sizes_str(const std::vector<size_t>& v) {
  std::string r = "(";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
  return r + ")";
}

struct Event {
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
};

int g_context_tag;  // the one context's handle points here
thread_local void* g_current = nullptr;

}  // namespace

bool cuemu::add_kernel(KernelEntry entry) {
  std::string name = entry.name;
  kernels()[name] = std::move(entry);
  return true;
}

extern "C" {

typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

CUresult cuGetErrorName(CUresult e, const char** s) {
  switch (e) {
    case kSuccess: *s = "CUDA_SUCCESS"; break;
    case kInvalidValue: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case kOutOfMemory: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case kInvalidDevice: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case kInvalidImage: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
    case kInvalidHandle: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case kNotFound: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case kLaunchOutOfResources: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
    case kNotSupported: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; return kInvalidValue;
  }
  return kSuccess;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

CUresult cuInit(unsigned) { TRACE("cuInit"); return kSuccess; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return kSuccess; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return kSuccess; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  TRACE("cuDeviceGet(%d)", ordinal);
  if (ordinal != 0) return complain(kInvalidDevice, "device ordinal %d does not exist (the emulator has one device, 0)", ordinal);
  *d = 0;
  return kSuccess;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) { snprintf(name, size_t(len), "%s", kDeviceName); return kSuccess; }
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = size_t(16) << 30; return kSuccess; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
  TRACE("cuDeviceGetAttribute(%d)", attr);
  switch (attr) {
    case 1: *v = kMaxThreads; break;             // MAX_THREADS_PER_BLOCK
    case 2: case 3: *v = 1024; break;            // MAX_BLOCK_DIM_X, _Y
    case 4: *v = 64; break;                      // MAX_BLOCK_DIM_Z
    case 5: *v = 2147483647; break;              // MAX_GRID_DIM_X
    case 6: case 7: *v = 65535; break;           // MAX_GRID_DIM_Y, _Z
    case 8: *v = kDefaultSmem; break;            // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;                     // WARP_SIZE
    case 16: *v = 2; break;                      // MULTIPROCESSOR_COUNT
    case 39: *v = 2048; break;                   // MAX_THREADS_PER_MULTIPROCESSOR
    case 75: *v = 9; break;                      // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;                      // COMPUTE_CAPABILITY_MINOR
    case 97: *v = kOptinSmem; break;             // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    default: *v = 0;                             // unsupported features (memory pools: 115, ...)
  }
  return kSuccess;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) { *ctx = &g_context_tag; return kSuccess; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return kSuccess; }
CUresult cuCtxSetCurrent(void* ctx) { g_current = ctx; return kSuccess; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = g_current; return kSuccess; }
CUresult cuCtxPushCurrent_v2(void* ctx) { g_current = ctx; return kSuccess; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = g_current; return kSuccess; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return kSuccess; }
CUresult cuCtxSynchronize() { return kSuccess; }

CUresult cuStreamCreate(void** s, unsigned) { *s = new int(0); return kSuccess; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = new int(0); return kSuccess; }
CUresult cuStreamDestroy_v2(void* s) { delete static_cast<int*>(s); return kSuccess; }
CUresult cuStreamSynchronize(void*) { return kSuccess; }
CUresult cuStreamQuery(void*) { return kSuccess; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return kSuccess; }

CUresult cuEventCreate(void** e, unsigned) { *e = new Event; return kSuccess; }
CUresult cuEventDestroy_v2(void* e) { delete static_cast<Event*>(e); return kSuccess; }
CUresult cuEventRecord(void* e, void*) { static_cast<Event*>(e)->at = std::chrono::steady_clock::now(); return kSuccess; }
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void*) { return kSuccess; }
CUresult cuEventQuery(void*) { return kSuccess; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
  *ms = std::chrono::duration<float, std::milli>(static_cast<Event*>(b)->at - static_cast<Event*>(a)->at).count();
  return kSuccess;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

std::atomic<unsigned long long> g_alloc_calls{0};

// cuemu_alloc_counts: how many allocations were made, and how many are live.
void cuemu_alloc_counts(unsigned long long* made, unsigned long long* live) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  *made = g_alloc_calls.load();
  *live = g_allocs.size();
}

// Exact-size allocations (256-byte aligned like the real driver) so that AddressSanitizer
// sees an out-of-bounds kernel access one byte past the end.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  void* q = nullptr;
  if (posix_memalign(&q, 256, bytes ? bytes : 1)) return kOutOfMemory;
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_allocs[uintptr_t(q)] = bytes;
  ++g_alloc_calls;
  *p = CUdeviceptr(q);
  TRACE("cuMemAlloc(%zu) -> 0x%llx", bytes, *p);
  return kSuccess;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  auto it = g_allocs.find(uintptr_t(p));
  if (it == g_allocs.end()) return complain(kInvalidValue, "cuMemFree of 0x%llx, which is not a live allocation", p);
  g_allocs.erase(it);
  free(reinterpret_cast<void*>(p));
  return kSuccess;
}
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  *free_bytes = size_t(15) << 30;
  *total = size_t(16) << 30;
  return kSuccess;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
  if (CUresult r = check_range("cuMemsetD8", d, n)) return r;
  memset(reinterpret_cast<void*>(d), v, n);
  return kSuccess;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void*) {
  if (CUresult r = check_range("cuMemsetD32", d, n * 4)) return r;
  for (size_t i = 0; i < n; ++i) memcpy(reinterpret_cast<char*>(d) + 4 * i, &v, 4);
  return kSuccess;
}
std::atomic<unsigned long long> g_htod{0}, g_dtoh{0};

void cuemu_copy_counts(unsigned long long* htod, unsigned long long* dtoh) {
  *htod = g_htod.load();
  *dtoh = g_dtoh.load();
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
  if (CUresult r = check_range("cuMemcpyHtoD", d, n)) return r;
  ++g_htod;
  memcpy(reinterpret_cast<void*>(d), s, n);
  return kSuccess;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
  if (CUresult r = check_range("cuMemcpyDtoH", s, n)) return r;
  ++g_dtoh;
  memcpy(d, reinterpret_cast<void*>(s), n);
  return kSuccess;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
  if (CUresult r = check_range("cuMemcpyDtoD (destination)", d, n)) return r;
  if (CUresult r = check_range("cuMemcpyDtoD (source)", s, n)) return r;
  memmove(reinterpret_cast<void*>(d), reinterpret_cast<void*>(s), n);
  return kSuccess;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoD_v2(d, s, n); }

CUresult cuModuleLoadData(void** module, const void* image) {
  const unsigned char* bytes = static_cast<const unsigned char*>(image);
  uint32_t magic;
  memcpy(&magic, bytes, 4);
  size_t len;
  if (magic == 0xBA55ED50u) {  // fatbin: u32 magic, u16 version, u16 header size, u64 payload size
    uint16_t header;
    uint64_t payload;
    memcpy(&header, bytes + 6, 2);
    memcpy(&payload, bytes + 8, 8);
    len = header + payload;
  } else if (magic == 0x464C457Fu) {
    return complain(kInvalidImage, "cuModuleLoadData: a cubin (ELF) cannot run on the emulator; load PTX or a fatbin with PTX");
  } else {
    len = strlen(static_cast<const char*>(image));
  }
  auto* m = new Module;
  if (!parse_entries(static_cast<const char*>(image), len, *m)) {
    delete m;
    return complain(kInvalidImage, "cuModuleLoadData: malformed or inconsistent .entry/.param declarations in the PTX");
  }
  if (m->entries.empty()) {
    delete m;
    return complain(kInvalidImage,
                    "cuModuleLoadData: no PTX .entry found (a compressed fatbin? build it with nvcc --no-compress)");
  }
  TRACE("cuModuleLoadData: %zu entries", m->entries.size());
  *module = m;
  return kSuccess;
}
CUresult cuModuleUnload(void* m) { delete static_cast<Module*>(m); return kSuccess; }
CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
  TRACE("cuModuleGetFunction(%s)", name);
  auto* m = static_cast<Module*>(module);
  auto entry = m->entries.find(name);
  if (entry == m->entries.end()) return complain(kNotFound, "kernel %s is not an .entry of the loaded module", name);
  auto host = kernels().find(name);
  if (host == kernels().end()) return complain(kNotFound, "kernel %s is in the PTX but was not host-compiled", name);
  if (host->second.param_sizes != entry->second)
    return complain(kInvalidImage, "kernel %s: the PTX declares parameters of sizes %s, the host-compiled kernel %s",
                    name, sizes_str(entry->second).c_str(), sizes_str(host->second.param_sizes).c_str());
  auto& slot = m->functions[name];
  if (!slot) slot = new Function{&host->second, entry->second};
  *f = slot;
  return kSuccess;
}
CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
  auto* fn = static_cast<Function*>(f);
  switch (attr) {
    case 0: *v = kMaxThreads; break;                 // MAX_THREADS_PER_BLOCK
    case 8: *v = fn->max_dynamic_smem; break;        // MAX_DYNAMIC_SHARED_SIZE_BYTES
    default: *v = 0;
  }
  return kSuccess;
}
CUresult cuFuncSetAttribute(void* f, int attr, int value) {
  auto* fn = static_cast<Function*>(f);
  if (attr == 8) {
    if (value < 0 || value > kOptinSmem)
      return complain(kInvalidValue, "%s: dynamic shared memory limit %d exceeds the device maximum %d", fn->kernel->name, value, kOptinSmem);
    fn->max_dynamic_smem = value;
  }
  return kSuccess;
}
CUresult cuFuncSetCacheConfig(void*, int) { return kSuccess; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void*, void** params, void** extra) {
  if (!f) return complain(kInvalidHandle, "cuLaunchKernel: null function");
  auto* fn = static_cast<Function*>(f);
  const cuemu::KernelEntry& k = *fn->kernel;
  TRACE("cuLaunchKernel(%s, grid (%u,%u,%u), block (%u,%u,%u), smem %u)", k.name, gx, gy, gz, bx, by, bz, smem);
  if (extra) return complain(kNotSupported, "%s: the `extra` launch parameter form is not supported", k.name);
  if (!gx || !gy || !gz || !bx || !by || !bz)
    return complain(kInvalidValue, "%s: empty launch (grid (%u,%u,%u), block (%u,%u,%u))", k.name, gx, gy, gz, bx, by, bz);
  if (bx > 1024 || by > 1024 || bz > 64 || uint64_t(bx) * by * bz > kMaxThreads)
    return complain(kInvalidValue, "%s: block (%u,%u,%u) exceeds the limits (x,y <= 1024, z <= 64, %d threads)", k.name,
                    bx, by, bz, kMaxThreads);
  if (gx > 2147483647u || gy > 65535 || gz > 65535)
    return complain(kInvalidValue, "%s: grid (%u,%u,%u) exceeds the limits (2^31-1, 65535, 65535)", k.name, gx, gy, gz);
  if (int(smem) > fn->max_dynamic_smem)
    return complain(kLaunchOutOfResources, "%s: %u bytes of dynamic shared memory > the function's limit of %d", k.name,
                    smem, fn->max_dynamic_smem);
  if (!k.param_sizes.empty() && !params) return complain(kInvalidValue, "%s: kernel takes parameters, none given", k.name);
  for (size_t i = 0; i < k.param_sizes.size(); ++i) {
    if (!params[i]) return complain(kInvalidValue, "%s: parameter %zu is a null pointer to its value", k.name, i);
    if (!k.param_is_pointer[i]) continue;
    uintptr_t p;
    memcpy(&p, params[i], sizeof p);
    if (p && !inside_allocation(p, 0))  // [base, base + size]: one-past-the-end is a valid pointer
      return complain(kInvalidValue, "%s: pointer parameter %zu (0x%lx) is not inside a live device allocation", k.name, i,
                      (unsigned long)p);
  }
  k.run(k, dim3(gx, gy, gz), dim3(bx, by, bz), smem, params);
  return kSuccess;
}

}  // extern "C"
