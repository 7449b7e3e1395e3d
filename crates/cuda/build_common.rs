//! Build-script helpers shared by `lmtrain-cuda` (the kernels) and `lmtrain-cuda-emu` (the CPU
//! emulator the tests run on): finding nvcc, running a command, the kernel sources.
#![allow(dead_code)] // each build script uses a subset

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Environment variables both builds depend on.
pub const ENV_VARS: &[&str] =
    &["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "PATH", "CXX", "LMTRAIN_CUDA_ARCHS", "LMTRAIN_REQUIRE_CUDA", "LMTRAIN_BUILD_CUEMU"];

pub fn fail<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

/// The repository root (the directory holding `kernels/common.cuh`) above `CARGO_MANIFEST_DIR`.
pub fn repo_root() -> Result<PathBuf, String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    manifest
        .ancestors()
        .find(|d| d.join("kernels/common.cuh").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot find the kernels/ directory above this crate".to_string())
}

/// `kernels/*.cu`, sorted.
pub fn kernel_sources(kernels_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    Ok(sources)
}

/// `$NVCC`, else `$CUDA_HOME` / `$CUDA_PATH` / `$CUDA_ROOT`, `/usr/local/cuda`, `PATH`, then the
/// toolchain that `.ci/run` installs into the repository. The canonical path matters: nvcc
/// resolves its headers relative to the path it was invoked by.
/// A set `$NVCC` is authoritative (`NVCC=none` builds CPU-only).
pub fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p).canonicalize().ok().filter(|p| p.is_file());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(root.join(".toolchain/cuda/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file()).and_then(|p| p.canonicalize().ok())
}

pub fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return fail(format!(
            "{:?} failed ({}):\n{}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// Names of the `extern "C" __global__` functions defined in a kernel source.
pub fn global_functions(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("extern \"C\" __global__") {
        // `extern "C" __global__ [__launch_bounds__(..)] void name(`
        let rest = &text[at..];
        let Some(void) = rest.find(" void ") else {
            continue;
        };
        let rest = &rest[void + 6..];
        let Some(paren) = rest.find('(') else {
            continue;
        };
        names.push(rest[..paren].trim().to_string());
    }
    names
}
