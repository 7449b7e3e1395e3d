//! `train` interrupted: SIGTERM / SIGINT stop after the step under way with a checkpoint and a
//! resume line, a second signal ends the run at once, and runs killed with SIGKILL at seeded
//! random moments (checkpoint writes included) resume to the uninterrupted run bit for bit.
#![cfg(unix)]

mod train_support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use train_support::*;

const VOCAB: usize = 40;

/// Arguments of a tiny run of `steps` steps into `out` with a checkpoint every `save` steps.
fn args(data: &Path, cfg: &Path, out: &Path, steps: u64, save: u64) -> Vec<String> {
    args_batch(data, cfg, out, steps, save, 4)
}

/// [`args`] with `batch` blocks per step.
fn args_batch(data: &Path, cfg: &Path, out: &Path, steps: u64, save: u64, batch: usize) -> Vec<String> {
    [
        "--data",
        &s(data),
        "--model-config",
        &s(cfg),
        "--output-dir",
        &s(out),
        "--max-steps",
        &steps.to_string(),
        "--per-device-train-batch-size",
        &batch.to_string(),
        "--learning-rate",
        "3e-3",
        "--warmup-steps",
        "5",
        "--logging-steps",
        "1",
        "--save-steps",
        &save.to_string(),
        "--seed",
        "11",
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

/// Starts `train` with stdout and stderr going to files beside `out` (read with [`finish`]).
fn spawn(args: &[String], out: &Path) -> Child {
    let log = |ext: &str| std::fs::File::create(out.with_extension(ext)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .stdout(Stdio::from(log("stdout")))
        .stderr(Stdio::from(log("stderr")))
        .spawn()
        .unwrap()
}

/// Waits for `child`; returns its status and stderr.
fn finish(mut child: Child, out: &Path) -> (ExitStatus, String) {
    let status = child.wait().unwrap();
    (status, std::fs::read_to_string(out.with_extension("stderr")).unwrap())
}

/// Steps logged so far in `out/metrics.jsonl` (complete lines only).
fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.matches('\n').count())
}

/// Polls `cond` every 200 µs until it holds (true) or `child` exits (false).
fn wait_until(child: &mut Child, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("train did not get there in 120 s");
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -{name}");
}

/// Every training-loss record as `(step, loss bits, grad_norm bits)`.
fn records(out: &Path) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap().to_bits(), v["grad_norm"].as_f64().unwrap().to_bits())
        })
        .collect()
}

fn same_run(reference: &Path, resumed: &Path, checkpoint: &str) {
    assert_eq!(records(reference), records(resumed), "losses and gradient norms of every step");
    for file in ["model.safetensors".to_string(), format!("{checkpoint}/model.safetensors"), format!("{checkpoint}/optimizer.safetensors")]
    {
        assert!(std::fs::read(reference.join(&file)).unwrap() == std::fs::read(resumed.join(&file)).unwrap(), "{file} differs");
    }
}

fn setup(tmp: &Path, n_embd: usize) -> (PathBuf, PathBuf) {
    let data = make_data(&tmp.join("data"), VOCAB, 12, 64, 8);
    let cfg = model_config(&tmp.join("cfg"), VOCAB, 16, 0.1);
    if n_embd != 16 {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        v["n_embd"] = n_embd.into();
        std::fs::write(&cfg, v.to_string()).unwrap();
    }
    (data, cfg)
}

#[test]
fn sigterm_stops_after_the_step_with_a_checkpoint_and_the_printed_resume_finishes_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg) = setup(tmp.path(), 16);
    let steps = 1500; // well over what runs before the signal lands, even on a loaded machine
    let reference = tmp.path().join("reference");
    train_ok(&args(&data, &cfg, &reference, steps, 1000).iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("out");
    let mut child = spawn(&args(&data, &cfg, &out, steps, 1000), &out);
    assert!(wait_until(&mut child, || logged_steps(&out) >= 20), "the run ended before it logged 20 steps");
    signal(&child, "TERM");
    let (status, stderr) = finish(child, &out);
    assert_eq!(status.code(), Some(143), "exit status 128 + SIGTERM; stderr:\n{stderr}");
    let stopped = stderr.lines().find_map(|l| l.strip_prefix("stopped by SIGTERM after step ")).expect("a stop line");
    let step: u64 = stopped.strip_suffix(&format!(" of {steps}")).unwrap().parse().unwrap();
    assert!((20..steps).contains(&step), "{stderr}");
    let checkpoint = format!("checkpoint-{step}");
    assert!(out.join(&checkpoint).join("checksums.json").is_file(), "the checkpoint of the last step is complete");
    assert!(!out.join("model.safetensors").exists(), "no final model after a stop");
    assert_eq!(records(&out).len() as u64, step, "every step before the stop logged");
    let names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "no temporary files: {names:?}");

    // The printed command resumes (paths in a temporary directory need no quoting).
    let resume = stderr.lines().find_map(|l| l.strip_prefix("resume with: ")).expect("a resume line");
    let argv: Vec<&str> = resume.split(' ').collect();
    assert_eq!(argv[argv.len() - 2..], ["--resume-from-checkpoint", s(&out.join(&checkpoint)).as_str()]);
    let (status, stderr) = finish(spawn(&argv[1..].iter().map(|a| a.to_string()).collect::<Vec<_>>(), &out), &out);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming from {} at step {step}", out.join(&checkpoint).display())), "{stderr}");
    same_run(&reference, &out, &format!("checkpoint-{steps}"));
}

#[test]
fn a_second_signal_ends_the_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // Steps of a fraction of a second: both signals land inside the same step.
    let (data, cfg) = setup(tmp.path(), 512);
    let out = tmp.path().join("out");
    let mut child = spawn(&args_batch(&data, &cfg, &out, 50, 1000, 64), &out);
    assert!(wait_until(&mut child, || logged_steps(&out) >= 1), "the run ended early");
    let first_step = Instant::now();
    signal(&child, "INT");
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, "INT");
    let (status, stderr) = finish(child, &out);
    let elapsed = first_step.elapsed();
    assert_eq!(status.code(), Some(130), "exit status 128 + SIGINT; stderr:\n{stderr}");
    assert!(!stderr.contains("stopped by") && !stderr.contains("resume with"), "the second signal did not wait: {stderr}");
    assert_eq!(logged_steps(&out), 1, "no step finished after the signals (took {elapsed:?})");
    assert!(!out.join("checkpoint-2").exists());
}

/// A seeded stream of numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        lmtrain_backend::mix64(self.0) % n
    }
}

#[test]
fn runs_killed_at_random_moments_resume_to_the_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg) = setup(tmp.path(), 128);
    let (steps, save) = (48, 4);
    let reference = tmp.path().join("reference");
    train_ok(&args(&data, &cfg, &reference, steps, save).iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("out");
    let seed = std::env::var("LMTRAIN_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2026);
    let mut rng = Rng(seed);
    let (mut kills, mut during_save) = (0, 0);
    for _ in 0..4 {
        let mut a = args(&data, &cfg, &out, steps, save);
        if checkpoint_count(&out) > 0 {
            a.push("--resume-from-checkpoint".into());
        }
        // a half-written checkpoint an earlier kill left is not this run's
        let before = temp_dirs(&out);
        let mut child = spawn(&a, &out);
        // Half the kills at a random logged step, half as soon as a checkpoint is being written.
        let hit = if rng.below(2) == 0 {
            let target = logged_steps(&out) + 1 + rng.below(12) as usize;
            let hit = wait_until(&mut child, || logged_steps(&out) >= target);
            std::thread::sleep(Duration::from_micros(rng.below(3000))); // somewhere in the next step or save
            hit
        } else {
            wait_until(&mut child, || temp_dirs(&out).iter().any(|d| !before.contains(d)))
        };
        child.kill().unwrap();
        let (status, _) = finish(child, &out);
        if hit && status.signal() == Some(9) {
            kills += 1;
            during_save += temp_dirs(&out).iter().any(|d| !before.contains(d)) as usize;
        }
    }
    let mut a = args(&data, &cfg, &out, steps, save);
    if checkpoint_count(&out) > 0 {
        a.push("--resume-from-checkpoint".into());
    }
    let (status, stderr) = finish(spawn(&a, &out), &out);
    assert!(status.success(), "{stderr}");
    eprintln!("seed {seed}: {kills} kills, {during_save} of them while a checkpoint was being written");
    assert!(kills >= 3, "at least 3 of the 4 runs were killed, not finished");
    same_run(&reference, &out, &format!("checkpoint-{steps}"));
    let names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "temporary files left: {names:?}");
}

fn checkpoint_count(out: &Path) -> usize {
    lmtrain_trainer::checkpoint::list_checkpoints(out).unwrap().len()
}

/// The temporary checkpoint directories of `out` (name and inode): one exists while a
/// checkpoint is being written, and stays when that write was killed.
fn temp_dirs(out: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(out) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((name, e.metadata().ok()?.ino())).filter(|(n, _)| n.starts_with(".checkpoint-"))
        })
        .collect()
}
