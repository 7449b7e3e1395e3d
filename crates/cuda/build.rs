//! Build script of `lmtrain-cuda`: the CUDA kernels (`kernels/*.cu`).
//!
//! With nvcc it compiles each kernel file into a fatbin (SASS for every requested arch + PTX
//! for the newest) that the crate embeds, keeps the `ptxas -v` report (`OUT_DIR/ptxas-report.txt`,
//! `LMTRAIN_PTXAS_REPORT`) and extracts the PTX parameter lists the launch wrappers are checked
//! against. Without nvcc it warns and the crate builds CPU-only (no kernels embedded; CUDA tests
//! skip). The CPU emulator the tests run on is not built here but by the dev-dependency
//! `lmtrain-cuda-emu` (`crates/cuda/emu`), so `cargo build --release` never compiles it.
//!
//! Environment: `NVCC` (nvcc to use; `none` = CPU-only), `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`,
//! `LMTRAIN_CUDA_ARCHS` (e.g. `80,90`; default `80,90`), `LMTRAIN_REQUIRE_CUDA=1` (a missing nvcc
//! is an error). The build never panics: failures are reported as one message and exit status 1.

#[path = "build_common.rs"]
mod common;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use common::{ENV_VARS, fail, find_nvcc, kernel_sources, repo_root, run};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_common.rs");
    println!("cargo::rustc-check-cfg=cfg(lmtrain_kernels)");
    if let Err(msg) = build_kernels() {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn build_kernels() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let root = repo_root()?;
    let kernels_dir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let sources = kernel_sources(&kernels_dir)?;

    let required = env::var("LMTRAIN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&root) else {
        let looked = match env::var("NVCC") {
            Ok(v) => format!("NVCC={v} is not an nvcc executable"),
            Err(_) => "looked at $CUDA_HOME/$CUDA_PATH/$CUDA_ROOT bin/nvcc, /usr/local/cuda/bin/nvcc, PATH, .toolchain/cuda".into(),
        };
        if required {
            return fail(format!("LMTRAIN_REQUIRE_CUDA=1 but nvcc was not found ({looked})"));
        }
        println!(
            "cargo:warning=nvcc not found ({looked}): building lmtrain-cuda without kernels (CPU-only); \
             CUDA tests will skip. `.ci/run` installs the pinned nvcc into .toolchain/cuda."
        );
        write_module_table(&out, &[], &[])?;
        return Ok(());
    };

    let archs = parse_archs(env::var("LMTRAIN_CUDA_ARCHS").ok().as_deref())?;

    // nvcc: one fatbin per kernel file, in parallel; stderr holds the `ptxas -v` report.
    let results: Vec<Result<Compiled, String>> = thread::scope(|s| {
        let jobs: Vec<_> = sources.iter().map(|src| s.spawn(|| compile_fatbin(&nvcc, src, &kernels_dir, &out, &archs))).collect();
        jobs.into_iter().map(|j| j.join().unwrap_or_else(|_| fail("nvcc worker panicked"))).collect()
    });
    let mut modules = Vec::new();
    let mut report = String::new();
    let mut params = Vec::new();
    for r in results {
        let (stem, fatbin, ptxas) = r?;
        let entries = ptx_entries(&fatbin).map_err(|e| format!("{stem}.fatbin: {e}"))?;
        if entries.is_empty() {
            return fail(format!("{stem}.fatbin has no readable PTX entry (is the fatbin compressed?)"));
        }
        report.push_str(&ptxas);
        modules.push((stem, entries.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()));
        params.extend(entries);
    }
    // Every `extern "C" __global__` of the sources must be in the PTX (the emulator registers
    // kernels by these names, and the fake driver matches them against the PTX at load time).
    for src in &sources {
        let text = fs::read_to_string(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        for name in common::global_functions(&text) {
            if !params.iter().any(|(n, _)| *n == name) {
                return fail(format!("{}: kernel {name} is not in nvcc's PTX", src.display()));
            }
        }
    }
    let report_path = out.join("ptxas-report.txt");
    fs::write(&report_path, &report).map_err(|e| format!("writing {}: {e}", report_path.display()))?;
    println!("cargo:rustc-env=LMTRAIN_PTXAS_REPORT={}", report_path.display());
    write_module_table(&out, &modules, &params)?;
    println!("cargo:rustc-cfg=lmtrain_kernels");
    Ok(())
}

/// `LMTRAIN_CUDA_ARCHS`: comma-separated compute capabilities such as `80,90` (`sm_` prefix
/// allowed). SASS is built for each, PTX for the newest (for JIT on future GPUs).
fn parse_archs(spec: Option<&str>) -> Result<Vec<u32>, String> {
    let spec = spec.filter(|s| !s.trim().is_empty()).unwrap_or("80,90");
    let mut archs = Vec::new();
    for a in spec.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let digits = a.trim_start_matches("sm_").trim_start_matches("compute_");
        match digits.parse::<u32>() {
            Ok(v) if v >= 50 => archs.push(v),
            _ => {
                return fail(format!("LMTRAIN_CUDA_ARCHS: `{a}` is not a compute capability like 80 or sm_90"));
            }
        }
    }
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        return fail("LMTRAIN_CUDA_ARCHS names no architecture");
    }
    Ok(archs)
}

fn compile_fatbin(nvcc: &Path, src: &Path, kernels_dir: &Path, out: &Path, archs: &[u32]) -> Result<Compiled, String> {
    let stem = src.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let fatbin = out.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    // --no-compress: the PTX stays readable, for the parameter tables and the emulator.
    cmd.args(["-fatbin", "--no-compress", "-O3", "-std=c++17", "-Xptxas", "-v"]);
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let newest = archs[archs.len() - 1];
    cmd.arg(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
    cmd.arg("-I").arg(kernels_dir).arg("-o").arg(&fatbin).arg(src);
    let o = run(&mut cmd)?;
    let bytes = fs::read(&fatbin).map_err(|e| format!("reading {}: {e}", fatbin.display()))?;
    let mut report = format!("# {stem}.cu\n");
    report.push_str(&String::from_utf8_lossy(&o.stderr));
    report.push_str(&String::from_utf8_lossy(&o.stdout));
    Ok((stem, bytes, report))
}

/// A kernel's PTX parameter sizes in bytes, in order.
type Entry = (String, Vec<usize>);
/// A compiled kernel file: (stem, fatbin bytes, ptxas report).
type Compiled = (String, Vec<u8>, String);

/// Parses `.entry name( .param .u64 [...] name_param_0, ... )` out of PTX text, which an
/// uncompressed fatbin carries verbatim.
fn ptx_entries(image: &[u8]) -> Result<Vec<Entry>, String> {
    let text = String::from_utf8_lossy(image);
    let mut entries: Vec<Entry> = Vec::new();
    for (at, _) in text.match_indices(".entry ") {
        let rest = &text[at + 7..];
        let name_end = rest.find(|c: char| c == '(' || c.is_whitespace()).ok_or("truncated .entry")?;
        let name = rest[..name_end].to_string();
        let body = &rest[name_end..];
        let mut sizes = Vec::new();
        let brace = body.find('{').unwrap_or(body.len());
        if let (Some(open), Some(close)) = (body.find('('), body.find(')'))
            && open < brace
            && close > open
        {
            for decl in body[open + 1..close].split(',').filter(|d| d.contains(".param")) {
                sizes.push(param_size(decl).ok_or_else(|| format!("{name}: cannot size `{}`", decl.trim()))?);
            }
        }
        match entries.iter().find(|(n, _)| *n == name) {
            Some((_, prev)) if *prev != sizes => {
                return fail(format!("{name}: PTX copies disagree on parameters"));
            }
            Some(_) => {}
            None => entries.push((name, sizes)),
        }
    }
    Ok(entries)
}

fn param_size(decl: &str) -> Option<usize> {
    let elem = decl.split_whitespace().filter(|t| *t != ".param").find_map(|t| {
        let t = t.strip_prefix('.')?;
        let (kind, bits) = t.split_at(1);
        let bits: usize = bits.parse().ok()?;
        (matches!(kind, "u" | "s" | "b" | "f") && bits.is_multiple_of(8)).then_some(bits / 8)
    })?;
    let count = match (decl.find('['), decl.find(']')) {
        (Some(l), Some(r)) if r > l => decl[l + 1..r].trim().parse().ok()?,
        _ => 1,
    };
    Some(elem * count)
}

/// `kernels.rs`: the embedded fatbins and every kernel's PTX parameter sizes.
fn write_module_table(out: &Path, modules: &[(String, Vec<String>)], params: &[Entry]) -> Result<(), String> {
    let mut s = String::from("/// Embedded kernel modules: (name of the kernels/*.cu file, fatbin, its kernels).\n");
    s.push_str("pub static MODULES: &[(&str, &[u8], &[&str])] = &[\n");
    for (m, kernels) in modules {
        let path = out.join(format!("{m}.fatbin"));
        let _ = writeln!(s, "    ({m:?}, include_bytes!({:?}), &{kernels:?}),", path.display().to_string());
    }
    s.push_str("];\n/// Every kernel's parameter sizes in bytes, as its PTX declares them.\n");
    s.push_str("pub static PARAMS: &[(&str, &[usize])] = &[\n");
    for (name, sizes) in params {
        let _ = writeln!(s, "    ({name:?}, &{sizes:?}),");
    }
    s.push_str("];\n");
    let path = out.join("kernels.rs");
    fs::write(&path, s).map_err(|e| format!("writing {}: {e}", path.display()))
}
