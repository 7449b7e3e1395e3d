//! The CPU emulator itself (kernels/emu/cuemu.h), through its self-test program built by
//! crates/cuda/emu/build.rs: features the project's kernels do not use yet must work, and planted kernel bugs
//! must be exposed — some only when a block's threads run in reverse order, which is why the
//! kernel tests run in both orders.

use std::process::{Command, Output};

fn selftest(case: &str, order: &str) -> Option<Output> {
    let Some(exe) = lmtrain_cuda_emu::SELFTEST else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP emulator self-test {case}: no emulator in this build (nvcc not found)");
        return None;
    };
    // Two OS threads execute blocks, so the atomics really race.
    Some(Command::new(exe).arg(case).env("CUEMU_SCHED", order).env("CUEMU_THREADS", "2").output().expect("running the self-test"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn features_work_in_both_orders() {
    for case in ["votes", "shuffles", "atomics", "transpose_2d", "wmma", "partial_warps"] {
        for order in ["forward", "reverse"] {
            let Some(o) = selftest(case, order) else {
                return;
            };
            assert!(o.status.success(), "{case} ({order}): {}\n{}", o.status, stderr(&o));
        }
    }
}

#[test]
fn missing_barrier_is_caught_in_reverse_order() {
    let Some(fwd) = selftest("bug_missing_sync_broadcast", "forward") else {
        return;
    };
    let rev = selftest("bug_missing_sync_broadcast", "reverse").expect("built");
    // Forward order happens to run the writer (thread 0) before the readers: the bug hides.
    assert!(fwd.status.success(), "forward order: {}", stderr(&fwd));
    assert_eq!(rev.status.code(), Some(3), "reverse order must read the stale value: {}", stderr(&rev));
}

#[test]
fn divergent_barrier_and_shuffle_from_exited_lane_are_reported() {
    for (case, needle) in
        [("bug_divergent_syncthreads", "divergent __syncthreads"), ("bug_shuffle_from_exited_lane", "exited without taking part")]
    {
        for order in ["forward", "reverse"] {
            let Some(o) = selftest(case, order) else {
                return;
            };
            assert!(!o.status.success() && stderr(&o).contains(needle), "{case} ({order}) not reported: {}", stderr(&o));
        }
    }
}
