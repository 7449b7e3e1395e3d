//! Build script of the CUDA kernels (`kernels/*.cu`), shared by two packages:
//!
//! * `lmtrain-cuda` (`build = "../../build.rs"`) does the work: with nvcc it compiles each
//!   kernel file into a fatbin (SASS for every requested arch + PTX for the newest) that the
//!   crate embeds, keeps the `ptxas -v` report, extracts the PTX parameter lists, and builds
//!   the CPU emulator (fake `libcuda.so`/`libcublas.so`/`libcublasLt.so`, plain and with
//!   AddressSanitizer) that the CUDA tests run against. Without nvcc it warns and the crate
//!   builds CPU-only (no kernels embedded; CUDA tests skip).
//! * the root package `lmtrain` only declares its dependencies on this file.
//!
//! Environment: `NVCC` (nvcc to use; `none` = CPU-only), `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`, `LMTRAIN_CUDA_ARCHS`
//! (e.g. `80,90`; default `80,90`), `LMTRAIN_REQUIRE_CUDA=1` (a missing nvcc is an error),
//! `LMTRAIN_BUILD_CUEMU=0` (skip the emulator build), `CXX` (host compiler for the emulator).
//! The build never panics: failures are reported as one message and exit status 1.
//!
//! The host C++ compiler is invoked directly (`$CXX`, default `c++`) rather than through the
//! `cc` crate: `cc` makes static archives linked into this crate, while the emulator must be
//! separate shared libraries named like NVIDIA's (cudarc dlopens `libcuda.so`, ...) plus a
//! self-test executable. The object files compile in parallel.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_ROOT",
    "PATH",
    "CXX",
    "LMTRAIN_CUDA_ARCHS",
    "LMTRAIN_REQUIRE_CUDA",
    "LMTRAIN_BUILD_CUEMU",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("CARGO_PKG_NAME").as_deref() != Ok("lmtrain-cuda") {
        return;
    }
    println!("cargo::rustc-check-cfg=cfg(lmtrain_kernels)");
    if let Err(msg) = build_cuda() {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

fn build_cuda() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let root = manifest
        .ancestors()
        .find(|d| d.join("kernels/common.cuh").is_file())
        .ok_or("cannot find the kernels/ directory above the lmtrain-cuda crate")?
        .to_path_buf();
    let kernels_dir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let required = env::var("LMTRAIN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&root) else {
        let looked = match env::var("NVCC") {
            Ok(v) => format!("NVCC={v} is not an nvcc executable"),
            Err(_) => "looked at $CUDA_HOME/$CUDA_PATH/$CUDA_ROOT bin/nvcc, /usr/local/cuda/bin/nvcc, PATH, .toolchain/cuda".into(),
        };
        if required {
            return fail(format!(
                "LMTRAIN_REQUIRE_CUDA=1 but nvcc was not found ({looked})"
            ));
        }
        println!(
            "cargo:warning=nvcc not found ({looked}): building lmtrain-cuda without kernels (CPU-only); \
             CUDA tests will skip. `.ci/run` installs the pinned nvcc into .toolchain/cuda."
        );
        write_module_table(&out, &[], &[])?;
        return Ok(());
    };

    let archs = parse_archs(env::var("LMTRAIN_CUDA_ARCHS").ok().as_deref())?;
    let include = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("include"))
        .unwrap_or_default();

    // nvcc: one fatbin per kernel file, in parallel; stderr holds the `ptxas -v` report.
    let results: Vec<Result<Compiled, String>> = thread::scope(|s| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile_fatbin(&nvcc, src, &kernels_dir, &out, &archs)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_else(|_| fail("nvcc worker panicked")))
            .collect()
    });
    let mut modules = Vec::new();
    let mut report = String::new();
    let mut params = Vec::new();
    for r in results {
        let (stem, fatbin, ptxas) = r?;
        let entries = ptx_entries(&fatbin).map_err(|e| format!("{stem}.fatbin: {e}"))?;
        if entries.is_empty() {
            return fail(format!(
                "{stem}.fatbin has no readable PTX entry (is the fatbin compressed?)"
            ));
        }
        report.push_str(&ptxas);
        modules.push((
            stem,
            entries.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        ));
        params.extend(entries);
    }
    let report_path = out.join("ptxas-report.txt");
    fs::write(&report_path, &report)
        .map_err(|e| format!("writing {}: {e}", report_path.display()))?;
    println!(
        "cargo:rustc-env=LMTRAIN_PTXAS_REPORT={}",
        report_path.display()
    );
    write_module_table(&out, &modules, &params)?;
    println!("cargo:rustc-cfg=lmtrain_kernels");

    if env::var("LMTRAIN_BUILD_CUEMU").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    build_emulator(&root, &out, &include, &sources, &params)
}

/// `$NVCC`, else `$CUDA_HOME` / `$CUDA_PATH` / `$CUDA_ROOT`, `/usr/local/cuda`, `PATH`, then the
/// toolchain that `.ci/run` installs into the repository. The canonical path matters: nvcc
/// resolves its headers relative to the path it was invoked by.
/// A set `$NVCC` is authoritative (`NVCC=none` builds CPU-only).
fn find_nvcc(root: &Path) -> Option<PathBuf> {
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
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
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
                return fail(format!(
                    "LMTRAIN_CUDA_ARCHS: `{a}` is not a compute capability like 80 or sm_90"
                ));
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

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
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

fn compile_fatbin(
    nvcc: &Path,
    src: &Path,
    kernels_dir: &Path,
    out: &Path,
    archs: &[u32],
) -> Result<Compiled, String> {
    let stem = src
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let fatbin = out.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    // --no-compress: the PTX stays readable, for the parameter tables and the emulator.
    cmd.args([
        "-fatbin",
        "--no-compress",
        "-O3",
        "-std=c++17",
        "-Xptxas",
        "-v",
    ]);
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let newest = archs[archs.len() - 1];
    cmd.arg(format!(
        "-gencode=arch=compute_{newest},code=compute_{newest}"
    ));
    cmd.arg("-I")
        .arg(kernels_dir)
        .arg("-o")
        .arg(&fatbin)
        .arg(src);
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
        let name_end = rest
            .find(|c: char| c == '(' || c.is_whitespace())
            .ok_or("truncated .entry")?;
        let name = rest[..name_end].to_string();
        let body = &rest[name_end..];
        let mut sizes = Vec::new();
        let brace = body.find('{').unwrap_or(body.len());
        if let (Some(open), Some(close)) = (body.find('('), body.find(')'))
            && open < brace
            && close > open
        {
            for decl in body[open + 1..close]
                .split(',')
                .filter(|d| d.contains(".param"))
            {
                sizes.push(
                    param_size(decl)
                        .ok_or_else(|| format!("{name}: cannot size `{}`", decl.trim()))?,
                );
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
    let elem = decl
        .split_whitespace()
        .filter(|t| *t != ".param")
        .find_map(|t| {
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
fn write_module_table(
    out: &Path,
    modules: &[(String, Vec<String>)],
    params: &[Entry],
) -> Result<(), String> {
    let mut s = String::from(
        "/// Embedded kernel modules: (name of the kernels/*.cu file, fatbin, its kernels).\n",
    );
    s.push_str("pub static MODULES: &[(&str, &[u8], &[&str])] = &[\n");
    for (m, kernels) in modules {
        let path = out.join(format!("{m}.fatbin"));
        let _ = writeln!(
            s,
            "    ({m:?}, include_bytes!({:?}), &{kernels:?}),",
            path.display().to_string()
        );
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

/// Compiles the CPU emulator twice (plain, and with AddressSanitizer) into
/// `OUT_DIR/cuemu{,-asan}/lib{cuda,cublas,cublasLt}.so`. Object files compile in parallel;
/// each kernels/*.cu is its own translation unit followed by its registration lines.
fn build_emulator(
    root: &Path,
    out: &Path,
    include: &Path,
    sources: &[PathBuf],
    params: &[Entry],
) -> Result<(), String> {
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".into());
    let emu = root.join("kernels/emu");
    let gen_dir = out.join("cuemu-src");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let mut kernel_units = Vec::new();
    for src in sources {
        let stem = src
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut unit = format!(
            "#include {:?}\n#include \"emu/registry.h\"\n",
            src.display().to_string()
        );
        let text =
            fs::read_to_string(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        for name in global_functions(&text) {
            if !params.iter().any(|(n, _)| *n == name) {
                return fail(format!(
                    "{}: kernel {name} is not in nvcc's PTX",
                    src.display()
                ));
            }
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
        variants.push((
            "cuemu-asan",
            vec!["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
        ));
    } else {
        println!(
            "cargo:warning=no libasan for {cxx}: the AddressSanitizer pass of the CUDA tests will skip"
        );
    }

    let common = |cmd: &mut Command, flags: &[&str]| {
        cmd.args([
            "-std=c++17",
            "-fPIC",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-DCUEMU",
        ])
        .args(flags);
        cmd.arg("-I")
            .arg(root.join("kernels"))
            .arg("-I")
            .arg(&emu)
            .arg("-I")
            .arg(include);
    };
    // (variant, library, translation units)
    let mut libs: Vec<(&str, &[&str], &str, Vec<PathBuf>)> = Vec::new();
    for (variant, flags) in &variants {
        let mut cuda_units = vec![emu.join("fake_cuda.cpp")];
        cuda_units.extend(kernel_units.iter().cloned());
        libs.push((variant, flags, "libcuda.so", cuda_units));
        libs.push((
            variant,
            flags,
            "libcublas.so",
            vec![emu.join("fake_cublas.cpp")],
        ));
        libs.push((
            variant,
            flags,
            "libcublasLt.so",
            vec![emu.join("fake_cublaslt.cpp")],
        ));
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
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["compiler worker panicked".into()])
            })
            .collect()
    });
    if let Some(e) = errors.into_iter().next() {
        return fail(format!("building the CUDA emulator: {e}"));
    }
    // The emulator's own self-test program (plain variant), run by tests/cuda_emulator.rs.
    let selftest = out.join("cuemu").join("cuemu-selftest");
    let mut cmd = Command::new(&cxx);
    common(&mut cmd, &["-O1"]);
    cmd.arg(emu.join("selftest.cpp"))
        .arg("-o")
        .arg(&selftest)
        .arg("-lpthread");
    run(&mut cmd).map_err(|e| format!("building the emulator self-test: {e}"))?;
    println!(
        "cargo:rustc-env=LMTRAIN_CUEMU_SELFTEST={}",
        selftest.display()
    );
    for (variant, flags, lib, units) in &libs {
        let objs: Vec<PathBuf> = units
            .iter()
            .map(|u| {
                out.join(variant).join(format!(
                    "{lib}-{}.o",
                    u.file_stem().unwrap_or_default().to_string_lossy()
                ))
            })
            .collect();
        let mut cmd = Command::new(&cxx);
        cmd.arg("-shared")
            .args(flags.iter().filter(|f| f.starts_with("-fsanitize")));
        cmd.arg(format!("-Wl,-soname,{lib}"))
            .args(&objs)
            .arg("-o")
            .arg(out.join(variant).join(lib));
        cmd.arg("-lpthread");
        run(&mut cmd).map_err(|e| format!("linking the CUDA emulator: {e}"))?;
    }
    println!(
        "cargo:rustc-env=LMTRAIN_CUEMU_DIR={}",
        out.join("cuemu").display()
    );
    if let Some(rt) = asan_runtime {
        println!(
            "cargo:rustc-env=LMTRAIN_CUEMU_ASAN_DIR={}",
            out.join("cuemu-asan").display()
        );
        println!(
            "cargo:rustc-env=LMTRAIN_CUEMU_ASAN_RUNTIME={}",
            rt.display()
        );
    }
    Ok(())
}

/// Names of the `extern "C" __global__` functions defined in a kernel source.
fn global_functions(text: &str) -> Vec<String> {
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
