//! Build script of `lmtrain-cuda-emu`: lmtrain's CPU emulator of the CUDA driver, cuBLAS and
//! cuBLASLt, for the tests of `lmtrain-cuda` only (it is that crate's dev-dependency, so a
//! `cargo build --release` never compiles it).
//!
//! Compiles every `kernels/*.cu` with the host C++ compiler against `kernels/emu/cuemu.h` into
//! a fake `libcuda.so` (plus `libcublas.so`, `libcublasLt.so` from `kernels/emu/`), twice: plainly
//! and with AddressSanitizer, and the emulator's self-test program. Needs the CUDA headers
//! (`cuda_bf16.h`, ...) of the nvcc installation `lmtrain-cuda` uses; without nvcc nothing is
//! built and the tests skip. Kernel names are checked against the PTX when the fake driver loads
//! a module (and by `lmtrain-cuda`'s build).
//!
//! Environment: as `lmtrain-cuda`'s build, plus `LMTRAIN_BUILD_CUEMU=0` (skip) and `CXX` (host
//! compiler). The host C++ compiler is invoked directly rather than through the `cc` crate: `cc`
//! makes static archives linked into this crate, while the emulator must be separate shared
//! libraries named like NVIDIA's (cudarc dlopens `libcuda.so`, ...) plus a self-test executable.
//! The object files compile in parallel.

#[path = "../build_common.rs"]
mod common;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use common::{ENV_VARS, fail, find_nvcc, global_functions, kernel_sources, repo_root, run};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build_common.rs");
    if let Err(msg) = build() {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let root = repo_root()?;
    let kernels_dir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var("LMTRAIN_BUILD_CUEMU").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    let Some(nvcc) = find_nvcc(&root) else {
        return Ok(()); // lmtrain-cuda's build reports the missing nvcc
    };
    let include = nvcc.parent().and_then(Path::parent).map(|p| p.join("include")).unwrap_or_default();
    let sources = kernel_sources(&kernels_dir)?;
    build_emulator(&root, &out, &include, &sources)
}

/// Compiles the CPU emulator twice (plain, and with AddressSanitizer) into
/// `OUT_DIR/cuemu{,-asan}/lib{cuda,cublas,cublasLt}.so`. Object files compile in parallel;
/// each kernels/*.cu is its own translation unit followed by its registration lines.
fn build_emulator(root: &Path, out: &Path, include: &Path, sources: &[PathBuf]) -> Result<(), String> {
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".into());
    let emu = root.join("kernels/emu");
    let gen_dir = out.join("cuemu-src");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let mut kernel_units = Vec::new();
    for src in sources {
        let stem = src.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let mut unit = format!("#include {:?}\n#include \"emu/registry.h\"\n", src.display().to_string());
        let text = fs::read_to_string(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        for name in global_functions(&text) {
            let _ = writeln!(unit, "CUEMU_REGISTER({name})");
        }
        let path = gen_dir.join(format!("{stem}.cpp"));
        fs::write(&path, unit).map_err(|e| e.to_string())?;
        kernel_units.push(path);
    }

    let asan_runtime = run(Command::new(&cxx).arg("-print-file-name=libasan.so"))
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute() && p.exists());
    let mut variants = vec![("cuemu", vec!["-O2"])];
    if asan_runtime.is_some() {
        variants.push(("cuemu-asan", vec!["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]));
    } else {
        println!("cargo:warning=no libasan for {cxx}: the AddressSanitizer pass of the CUDA tests will skip");
    }

    let common = |cmd: &mut Command, flags: &[&str]| {
        cmd.args(["-std=c++17", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-DCUEMU"]).args(flags);
        cmd.arg("-I").arg(root.join("kernels")).arg("-I").arg(&emu).arg("-I").arg(include);
    };
    // (variant, library, translation units)
    let mut libs: Vec<(&str, &[&str], &str, Vec<PathBuf>)> = Vec::new();
    for (variant, flags) in &variants {
        let mut cuda_units = vec![emu.join("fake_cuda.cpp")];
        cuda_units.extend(kernel_units.iter().cloned());
        libs.push((variant, flags, "libcuda.so", cuda_units));
        libs.push((variant, flags, "libcublas.so", vec![emu.join("fake_cublas.cpp")]));
        libs.push((variant, flags, "libcublasLt.so", vec![emu.join("fake_cublaslt.cpp")]));
    }
    // All objects in parallel (bounded by the machine's cores).
    let jobs: Vec<(String, PathBuf, PathBuf, &[&str])> = libs
        .iter()
        .flat_map(|(variant, flags, lib, units)| {
            units.iter().map(move |u| {
                let stem = u.file_stem().unwrap_or_default().to_string_lossy();
                let obj = out.join(variant).join(format!("{lib}-{stem}.o"));
                (variant.to_string(), u.clone(), obj, *flags)
            })
        })
        .collect();
    for (variant, _) in &variants {
        fs::create_dir_all(out.join(variant)).map_err(|e| e.to_string())?;
    }
    let workers = thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut errs = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, unit, obj, flags)) = jobs.get(i) else {
                            break;
                        };
                        let mut cmd = Command::new(&cxx);
                        common(&mut cmd, flags);
                        cmd.arg("-c").arg(unit).arg("-o").arg(obj);
                        if let Err(e) = run(&mut cmd) {
                            errs.push(e);
                        }
                    }
                    errs
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec!["compiler worker panicked".into()])).collect()
    });
    if let Some(e) = errors.into_iter().next() {
        return fail(format!("building the CUDA emulator: {e}"));
    }
    // The emulator's own self-test program (plain variant), run by tests/cuda_emulator.rs.
    let selftest = out.join("cuemu").join("cuemu-selftest");
    let mut cmd = Command::new(&cxx);
    common(&mut cmd, &["-O1"]);
    cmd.arg(emu.join("selftest.cpp")).arg("-o").arg(&selftest).arg("-lpthread");
    run(&mut cmd).map_err(|e| format!("building the emulator self-test: {e}"))?;
    println!("cargo:rustc-env=LMTRAIN_CUEMU_SELFTEST={}", selftest.display());
    for (variant, flags, lib, units) in &libs {
        let objs: Vec<PathBuf> = units
            .iter()
            .map(|u| out.join(variant).join(format!("{lib}-{}.o", u.file_stem().unwrap_or_default().to_string_lossy())))
            .collect();
        let mut cmd = Command::new(&cxx);
        cmd.arg("-shared").args(flags.iter().filter(|f| f.starts_with("-fsanitize")));
        cmd.arg(format!("-Wl,-soname,{lib}")).args(&objs).arg("-o").arg(out.join(variant).join(lib));
        cmd.arg("-lpthread");
        run(&mut cmd).map_err(|e| format!("linking the CUDA emulator: {e}"))?;
    }
    println!("cargo:rustc-env=LMTRAIN_CUEMU_DIR={}", out.join("cuemu").display());
    if let Some(rt) = asan_runtime {
        println!("cargo:rustc-env=LMTRAIN_CUEMU_ASAN_DIR={}", out.join("cuemu-asan").display());
        println!("cargo:rustc-env=LMTRAIN_CUEMU_ASAN_RUNTIME={}", rt.display());
    }
    Ok(())
}
