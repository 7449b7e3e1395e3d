//! How the CUDA tests reach a device.
//!
//! * With `LMTRAIN_CUDA_REAL=1` (scripts/gpu-check.sh) every test runs in-process against the
//!   real driver.
//! * Otherwise, when the build made the CPU emulator, each test re-executes this test binary
//!   for itself with `LD_LIBRARY_PATH` pointing at the fake `libcuda.so`/`libcublas*.so`
//!   (the dynamic loader reads the variable only at process start), once with the fibers of
//!   each block scheduled forward and once in reverse (`CUEMU_SCHED`), and requires the child
//!   to report exactly its tests as passed. The child sees `LMTRAIN_CUDA_CHILD=1` and runs the
//!   body. `address_sanitizer_pass` runs all device tests once more in one child whose fake
//!   libraries are built with AddressSanitizer (its runtime preloaded).
//! * Without nvcc at build time there is no emulator: tests print SKIP and pass.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use half::bf16;
use lmtrain_cuda::{CudaDevice, KernelDtype};

/// Tolerance of f32 results (max-norm relative error).
pub const F32_TOL: f64 = 1e-5;
/// Tolerance of results stored in bf16.
pub const BF16_TOL: f64 = 1e-2;

/// Where this process stands.
pub enum Mode {
    /// Run test bodies here, against whatever libcuda the loader finds.
    Direct,
    /// Re-execute for each test against the emulator in this directory.
    Emulate(&'static str),
    /// Nothing to run against; the reason.
    Skip(&'static str),
}

pub fn mode() -> Mode {
    if std::env::var("LMTRAIN_CUDA_CHILD").is_ok_and(|v| v == "1") || std::env::var("LMTRAIN_CUDA_REAL").is_ok_and(|v| v == "1") {
        return Mode::Direct;
    }
    match lmtrain_cuda_emu::DIR {
        Some(dir) if lmtrain_cuda::kernels_built() => Mode::Emulate(dir),
        _ => Mode::Skip("no CUDA kernels in this build (nvcc not found at build time; see README, CUDA)"),
    }
}

/// Runs `body` on device 0: directly, or in two emulator children (forward and reverse
/// thread order), or prints why it is skipped.
pub fn on_device(test: &str, body: impl FnOnce(&CudaDevice)) {
    match mode() {
        Mode::Direct => {
            let dev = CudaDevice::open(0).unwrap_or_else(|e| panic!("{test}: {e}"));
            body(&dev);
        }
        Mode::Emulate(dir) => {
            for order in ["forward", "reverse"] {
                run_children(&[test], &Child { lib_dir: dir, order, asan_runtime: None, allow_emulator: true });
            }
        }
        Mode::Skip(why) => skip(test, why),
    }
}

/// [`on_device`] with one emulator child (forward thread order) instead of two: for long runs of
/// kernels that other tests already run in both orders.
pub fn on_device_once(test: &str, body: impl FnOnce(&CudaDevice)) {
    match mode() {
        Mode::Emulate(dir) => run_children(&[test], &Child { lib_dir: dir, order: "forward", asan_runtime: None, allow_emulator: true }),
        _ => on_device(test, body),
    }
}

/// Reports a skipped test on stderr, bypassing libtest's output capture so that it is seen.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// How to start a child.
pub struct Child<'a> {
    pub lib_dir: &'a str,
    pub order: &'a str,
    pub asan_runtime: Option<&'a str>,
    pub allow_emulator: bool,
}

/// Runs the named tests of this binary in one child process and checks that all passed.
pub fn run_children(tests: &[&str], c: &Child<'_>) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args(tests).args(["--exact", "--test-threads=1", "--nocapture"]);
    let ld_path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => format!("{}:{}", c.lib_dir, old.to_string_lossy()),
        _ => c.lib_dir.to_string(),
    };
    cmd.env("LD_LIBRARY_PATH", ld_path).env("LMTRAIN_CUDA_CHILD", "1").env("CUEMU_SCHED", c.order);
    if c.allow_emulator {
        cmd.env("LMTRAIN_CUEMU", "1");
    } else {
        cmd.env_remove("LMTRAIN_CUEMU");
    }
    if let Some(rt) = c.asan_runtime {
        assert!(Path::new(rt).exists(), "AddressSanitizer runtime {rt} is missing");
        // Rust's own allocations are not instrumented; leaks of the test harness are not ours.
        cmd.env("LD_PRELOAD", rt).env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0");
    }
    let (status, stdout, stderr) = output_within(cmd, CHILD_TIMEOUT);
    let expected = format!("test result: ok. {} passed", tests.len());
    assert!(
        status.as_ref().is_some_and(|s| s.success()) && stdout.contains(&expected),
        "emulated run of {tests:?} (CUEMU_SCHED={}, asan={}) failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        c.order,
        c.asan_runtime.is_some(),
        status.map_or_else(|| format!("killed after {CHILD_TIMEOUT:?} (a kernel that never finishes?)"), |s| s.to_string()),
    );
}

/// A child that runs longer has hung (an emulated kernel in an endless loop, say).
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `cmd`, killing it after `limit`; returns its status (None if killed) and output.
fn output_within(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning the test binary");
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the test binary") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

/// Small deterministic generator for test data (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.uniform()).collect()
    }
}

/// Relative error in the max norm: `max_i |got_i - want_i| / max_i |want_i|`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut num = 0f64;
    let mut den = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite result {g}");
        num = num.max((f64::from(g) - f64::from(w)).abs());
        den = den.max(f64::from(w).abs());
    }
    if den == 0.0 { num } else { num / den }
}

/// Asserts `rel_err(got, want) <= tol` and reports the error.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{what}: max-norm relative error {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: max-norm relative error {e:.3e} > {tol:.0e}");
}

/// Storage types under test: conversion from the f32 test data, and the tolerance of results
/// stored in that type.
pub trait Elem: KernelDtype + Default {
    const TOL: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Elem for f32 {
    const TOL: f64 = F32_TOL;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    const TOL: f64 = BF16_TOL;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

pub fn store<T: Elem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}
pub fn load<T: Elem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}
/// The values a T-typed buffer actually holds: the CPU reference starts from the same inputs.
pub fn quantize<T: Elem>(x: Vec<f32>) -> Vec<f32> {
    load(&store::<T>(&x))
}

/// Downloads a device buffer and checks it against the CPU reference `want`.
pub fn check<T: Elem>(dev: &CudaDevice, what: &str, buf: &CudaSlice<T>, want: &[f32], tol: f64) {
    assert_close(what, &load(&dev.download(buf).unwrap()), want, tol);
}
