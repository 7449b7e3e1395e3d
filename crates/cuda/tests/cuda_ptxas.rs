//! The `ptxas -v` report of the kernel build (kept in OUT_DIR by build.rs): no kernel may
//! spill registers or use a stack frame (both mean local-memory traffic on the GPU).
//! Skips when the build had no nvcc.

use std::collections::BTreeSet;

/// Per (kernel, arch): stack frame, spill stores, spill loads (bytes).
fn parse(report: &str) -> Vec<(String, String, [u64; 3])> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        // ptxas info    : Compiling entry function 'layernorm_fwd_f32' for 'sm_90'
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch = rest.split("for '").nth(1).and_then(|a| a.split('\'').next()).unwrap_or_default().to_string();
            current = Some((name, arch));
        } else if line.contains("bytes stack frame") {
            // "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
            let nums: Vec<u64> = line.split(',').filter_map(|p| p.split_whitespace().next()?.parse().ok()).collect();
            let (name, arch) = current.take().expect("stack-frame line without a function");
            assert_eq!(nums.len(), 3, "unexpected ptxas line: {line}");
            out.push((name, arch, [nums[0], nums[1], nums[2]]));
        }
    }
    out
}

#[test]
fn kernels_have_no_spills_or_stack_frames() {
    let Some(path) = option_env!("LMTRAIN_PTXAS_REPORT") else {
        use std::io::Write;
        // stderr directly: libtest does not capture it, so the skip is visible.
        let _ = writeln!(std::io::stderr(), "SKIP kernels_have_no_spills_or_stack_frames: built without nvcc (no ptxas report)");
        return;
    };
    let report = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let entries = parse(&report);
    let seen: BTreeSet<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    for kernel in lmtrain_cuda::kernel_names() {
        assert!(seen.contains(kernel), "{kernel} is missing from the ptxas report");
    }
    let bad: Vec<String> = entries
        .iter()
        .filter(|(_, _, [stack, stores, loads])| stack + stores + loads > 0)
        .map(|(n, a, [s, st, ld])| format!("{n} ({a}): {s} B stack frame, {st} B spill stores, {ld} B spill loads"))
        .collect();
    println!("{} kernel/arch pairs checked", entries.len());
    assert!(bad.is_empty(), "kernels using local memory:\n{}", bad.join("\n"));
}

#[test]
fn parser_reads_a_spilling_kernel() {
    let sample = "ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
                  ptxas info    : Function properties for k\n    \
                  16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n";
    assert_eq!(parse(sample), vec![("k".to_string(), "sm_80".to_string(), [16, 8, 4])]);
}
