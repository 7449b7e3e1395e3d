//! The AVX2 and portable fallbacks of every fast path, tested on whatever machine runs the
//! suite: this binary re-runs itself with `LMTRAIN_CPU_SIMD` forced to each level below the
//! current one, (1) running every op test of tests/ops.rs there, and (2) checking that every op
//! and three GPT-2 training steps agree with the results at the current level (bit for bit where
//! the builds are documented to agree, else within the op tests' tolerance).

use std::path::PathBuf;
use std::process::Command;

use lmtrain_cpu::dispatch::{SIMD_ENV, SimdLevel, simd_level};

mod fingerprint;
#[path = "ops.rs"]
mod op_tests;

/// Set in a child run: where it writes its level and outputs.
const CHILD_OUT: &str = "LMTRAIN_SIMD_LEVELS_OUT";

/// Every op's outputs followed by the GPT-2 steps'.
fn outputs() -> Vec<fingerprint::Output> {
    let mut o = fingerprint::run_ops();
    o.extend(fingerprint::run_gpt2_steps());
    o
}

/// Outputs that every build computes with the same operations in the same order (no fused
/// multiply-add, no explicit kernel of its own), so they must match bit for bit.
const SAME_BITS: &[&str] = &[
    "elementwise",
    "add_bias",
    "bias_backward",
    "embedding",
    "embedding dwte",
    "embedding dwpe",
    "global_norm",
    "adamw params",
    "adamw m",
    "adamw v",
];

/// Runs this test binary again with `LMTRAIN_CPU_SIMD=level` and `args`; returns its output.
fn rerun(level: SimdLevel, args: &[&str], child_out: Option<&PathBuf>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(args).env(SIMD_ENV, level.name());
    if let Some(p) = child_out {
        cmd.env(CHILD_OUT, p);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{SIMD_ENV}={} {args:?} failed:\n{text}", level.name());
    text
}

#[test]
fn every_fast_path_has_a_fallback_that_agrees() {
    if let Ok(path) = std::env::var(CHILD_OUT) {
        // child: report the level actually in effect, then every output's bits
        let mut bytes = format!("{}\n", simd_level().name()).into_bytes();
        for o in outputs() {
            bytes.extend(o.values.iter().flat_map(|v| v.to_le_bytes()));
            bytes.extend(o.wide.iter().flat_map(|v| v.to_le_bytes()));
        }
        std::fs::write(path, bytes).unwrap();
        return;
    }
    let top = simd_level();
    let lower: Vec<SimdLevel> = [SimdLevel::Avx2, SimdLevel::Portable].into_iter().filter(|&l| l < top).collect();
    if lower.is_empty() {
        eprintln!("SKIP: already at the portable level, nothing to force lower");
        return;
    }
    let want = outputs();
    let n_op_tests = include_str!("ops.rs").matches("#[test]").count();
    let dir = std::env::temp_dir().join(format!("lmtrain-simd-levels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for level in lower {
        // (1) the op tests against their f64 references and finite differences
        let text = rerun(level, &["op_tests::", "--test-threads", "2"], None);
        assert!(
            text.contains(&format!("test result: ok. {n_op_tests} passed")),
            "{SIMD_ENV}={}: expected {n_op_tests} op tests to pass:\n{text}",
            level.name()
        );
        // (2) the same outputs as at the top level
        let path = dir.join(level.name());
        rerun(level, &["--exact", "every_fast_path_has_a_fallback_that_agrees"], Some(&path));
        let bytes = std::fs::read(&path).unwrap();
        let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(std::str::from_utf8(&bytes[..nl]).unwrap(), level.name(), "the child ran at the forced level");
        let mut rest = &bytes[nl + 1..];
        let mut take = |n: usize| {
            let (a, b) = rest.split_at(n.min(rest.len()));
            rest = b;
            a
        };
        for o in &want {
            let g: Vec<f64> = take(4 * o.values.len()).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect();
            let gw: Vec<f64> = take(8 * o.wide.len()).chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
            let w: Vec<f64> = o.values.iter().map(|&v| v as f64).chain(o.wide.iter().copied()).collect();
            let g: Vec<f64> = g.into_iter().chain(gw).collect();
            assert_eq!(g.len(), w.len(), "{}: output length", o.name);
            // (an f32 widened to f64 keeps its bits' identity)
            let same_bits = g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
            if SAME_BITS.contains(&o.name) {
                assert!(same_bits, "{} at {} differs from {} in its bits", o.name, level.name(), top.name());
                continue;
            }
            // relative to the output's largest magnitude, as the op tests' `assert_close`
            let scale = w.iter().fold(0f64, |m, &v| m.max(v.abs())).max(1e-30);
            let worst = g.iter().zip(&w).map(|(&a, &b)| (a - b).abs() / scale).fold(0f64, f64::max);
            eprintln!(
                "{:<36} {:>9}: {}",
                o.name,
                level.name(),
                if same_bits { "same bits".to_string() } else { format!("max rel diff {worst:.1e}") }
            );
            assert!(worst <= 1e-5, "{} at {}: max relative difference {worst:e} from {}", o.name, level.name(), top.name());
        }
        assert!(rest.is_empty(), "child wrote more outputs than expected");
    }
    std::fs::remove_dir_all(&dir).ok();
}
