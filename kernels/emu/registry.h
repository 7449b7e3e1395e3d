// registry.h: how host-compiled kernels make themselves known to the fake libcuda.
//
// crates/cuda/emu/build.rs generates, for every kernels/X.cu, a translation unit that includes X.cu and
// then this header and one CUEMU_REGISTER(name) line per `extern "C" __global__`
// function it found. Registration records the C++ parameter sizes (checked against the
// PTX `.param` list when a module is loaded) and which parameters are pointers (checked
// against live device allocations at launch).
#pragma once

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuemu {

struct KernelEntry {
  const char* name;
  std::vector<size_t> param_sizes;
  std::vector<bool> param_is_pointer;
  // Runs the kernel over the grid with arguments read from cuLaunchKernel's `void**`.
  void (*run)(const KernelEntry&, dim3 grid, dim3 block, size_t smem, void** params);
  void* fn;
};

// Defined in fake_cuda.cpp.
bool add_kernel(KernelEntry entry);

template <class... P, size_t... I>
void run_with(const KernelEntry& e, dim3 grid, dim3 block, size_t smem, void** params, std::index_sequence<I...>) {
  auto fn = reinterpret_cast<void (*)(P...)>(e.fn);
  // One copy of the arguments per launch, as the hardware's parameter buffer.
  std::tuple<std::decay_t<P>...> args{*static_cast<std::decay_t<P>*>(params[I])...};
  launch(e.name, grid, block, smem, [&] { std::apply(fn, args); });
}

template <class... P>
bool register_kernel(const char* name, void (*fn)(P...)) {
  KernelEntry e;
  e.name = name;
  e.param_sizes = {sizeof(std::decay_t<P>)...};
  e.param_is_pointer = {std::is_pointer<std::decay_t<P>>::value...};
  e.run = [](const KernelEntry& k, dim3 g, dim3 b, size_t s, void** p) {
    run_with<P...>(k, g, b, s, p, std::index_sequence_for<P...>{});
  };
  e.fn = reinterpret_cast<void*>(fn);
  return add_kernel(std::move(e));
}

}  // namespace cuemu

#define CUEMU_REGISTER(kernel) \
  [[maybe_unused]] static const bool cuemu_registered_##kernel = ::cuemu::register_kernel(#kernel, &kernel);
