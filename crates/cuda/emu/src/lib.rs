//! Where the build put lmtrain's CPU emulator of the CUDA libraries (see `build.rs`): `None`
//! everywhere when it was not built (no nvcc, or `LMTRAIN_BUILD_CUEMU=0`). A dev-dependency of
//! `lmtrain-cuda`, so only its tests and benches build it.

/// Directory of the fake `libcuda.so`, `libcublas.so`, `libcublasLt.so`.
pub const DIR: Option<&str> = option_env!("LMTRAIN_CUEMU_DIR");
/// The same libraries built with AddressSanitizer (when the host compiler has its runtime).
pub const ASAN_DIR: Option<&str> = option_env!("LMTRAIN_CUEMU_ASAN_DIR");
/// The AddressSanitizer runtime to preload for [`ASAN_DIR`].
pub const ASAN_RUNTIME: Option<&str> = option_env!("LMTRAIN_CUEMU_ASAN_RUNTIME");
/// The emulator's self-test program.
pub const SELFTEST: Option<&str> = option_env!("LMTRAIN_CUEMU_SELFTEST");
