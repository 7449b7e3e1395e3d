//! Checkpoints and resume through the `train` binary: the checkpoint layout, atomic writes,
//! rotation, and a resumed run that reproduces the uninterrupted run bit for bit.

mod train_support;

use std::path::Path;

use train_support::*;

const VOCAB: usize = 40;

fn base_args(data: &Path, cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--data",
        &s(data),
        "--model-config",
        &s(cfg),
        "--output-dir",
        &s(out),
        "--max-steps",
        "6",
        "--per-device-train-batch-size",
        "3",
        "--gradient-accumulation-steps",
        "2",
        "--learning-rate",
        "3e-3",
        "--warmup-steps",
        "2",
        "--lr-scheduler",
        "cosine",
        "--weight-decay",
        "0.1",
        "--logging-steps",
        "1",
        "--save-steps",
        "3",
        "--seed",
        "7",
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    // A flag in `extra` replaces the base value (clap refuses repeated flags).
    for (i, flag) in extra.iter().enumerate().filter(|(_, f)| f.starts_with("--")) {
        if let Some(at) = v.iter().position(|x| x == flag) {
            let takes_value = extra.get(i + 1).is_some_and(|x| !x.starts_with("--"));
            v.drain(at..at + 1 + takes_value as usize);
        }
    }
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    train_ok(&refs)
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    // 10 blocks, batch 3, accumulation 2: 2 steps per epoch (the second with one short
    // micro-batch), so 6 steps cross two epoch boundaries and the resume point (step 3) sits
    // inside an epoch. Dropout is on, so the dropout seeds must be restored too.
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.1);
    let full = tmp.path().join("full");
    run(&base_args(&data, &cfg, &full, &[]));
    let full_losses = logged_losses(&full);
    assert_eq!(full_losses.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);

    // The "interrupted" run: only checkpoint-3 survives, in a fresh output directory.
    let part = tmp.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    copy_dir(&full.join("checkpoint-3"), &part.join("checkpoint-3"));
    // Without DIR, the latest checkpoint of --output-dir is taken.
    run(&base_args(&data, &cfg, &part, &["--resume-from-checkpoint"]));
    let resumed = logged_losses(&part);
    assert_eq!(resumed.iter().map(|l| l.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    for (a, b) in full_losses[3..].iter().zip(&resumed) {
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "step {}: {} vs {}", a.0, a.1, b.1);
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(full.join("checkpoint-6").join(file)).unwrap();
        let b = std::fs::read(part.join("checkpoint-6").join(file)).unwrap();
        assert!(a == b, "{file} of the resumed run differs");
    }
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(part.join("model.safetensors")).unwrap();
    assert!(a == b, "final model differs");
}

#[test]
fn checkpoints_are_complete_atomic_and_rotated() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    run(&base_args(&data, &cfg, &out, &["--save-steps", "1", "--save-total-limit", "2"]));
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        ["checkpoint-5", "checkpoint-6", "config.json", "metrics.jsonl", "model.safetensors", "tokenizer.json"],
        "two newest checkpoints, the final model, no temporary directories"
    );
    for ck in ["checkpoint-5", "checkpoint-6"] {
        for f in ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"] {
            assert!(out.join(ck).join(f).is_file(), "{ck}/{f} missing");
        }
    }
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("checkpoint-5/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], 5);
    // 2 steps per epoch: after step 5 the run is 1 step into epoch 2.
    assert_eq!((state["epoch"].as_u64(), state["step_in_epoch"].as_u64()), (Some(2), Some(1)));
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("checkpoint-6/config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_layer"], 2);
}

#[test]
fn existing_checkpoints_are_not_overwritten_without_a_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    run(&base_args(&data, &cfg, &out, &[]));
    let before = std::fs::read(out.join("checkpoint-6/model.safetensors")).unwrap();
    let args = base_args(&data, &cfg, &out, &["--learning-rate", "1e-2"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = train_err(&refs);
    assert!(line.contains("already holds checkpoints"), "{line}");
    assert_eq!(std::fs::read(out.join("checkpoint-6/model.safetensors")).unwrap(), before);
    run(&base_args(&data, &cfg, &out, &["--learning-rate", "1e-2", "--overwrite-output-dir"]));
    assert_ne!(std::fs::read(out.join("checkpoint-6/model.safetensors")).unwrap(), before);
}

/// Flips one bit of `path` at `at` bytes from its end (inside the last tensor's data).
fn flip_bit(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - at;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_damaged_checkpoint_file_is_named_and_a_directory_without_checksums_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let full = tmp.path().join("full");
    run(&base_args(&data, &cfg, &full, &[]));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(full.join("checkpoint-3/checksums.json")).unwrap()).unwrap();
    let listed: Vec<&String> = manifest["files"].as_object().unwrap().keys().collect();
    assert_eq!(listed, ["config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json"]);

    // One low mantissa bit of a weight: the model would load and run, silently different.
    let bad_model = tmp.path().join("bad-model/checkpoint-3");
    copy_dir(&full.join("checkpoint-3"), &bad_model);
    flip_bit(&bad_model.join("model.safetensors"), 4);
    let bad_opt = tmp.path().join("bad-opt/checkpoint-3");
    copy_dir(&full.join("checkpoint-3"), &bad_opt);
    flip_bit(&bad_opt.join("optimizer.safetensors"), 4);
    let bad_state = tmp.path().join("bad-state/checkpoint-3");
    copy_dir(&full.join("checkpoint-3"), &bad_state);
    let state = std::fs::read_to_string(bad_state.join("trainer_state.json")).unwrap();
    std::fs::write(bad_state.join("trainer_state.json"), state.replace("\"tokens_seen\": ", "\"tokens_seen\": 1")).unwrap();

    let damaged = |dir: &Path, file: &str, line: &str| {
        let want = format!("{}: the file is damaged", dir.join(file).display());
        assert!(line.contains(&want) && line.ends_with("use another checkpoint"), "want {want:?} in {line}");
    };
    let resume = |dir: &Path| {
        let out = dir.parent().unwrap();
        let args = base_args(&data, &cfg, out, &["--resume-from-checkpoint", &s(dir)]);
        train_err(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    damaged(&bad_model, "model.safetensors", &resume(&bad_model));
    damaged(&bad_opt, "optimizer.safetensors", &resume(&bad_opt));
    damaged(&bad_state, "trainer_state.json", &resume(&bad_state));
    let eval = |dir: &Path| train_err(&["eval", "--checkpoint", &s(dir), "--data", &s(&data)]);
    damaged(&bad_model, "model.safetensors", &eval(&bad_model));
    let generate = train_err(&["generate", "--checkpoint", &s(&bad_model), "--prompt", "w1 w2", "--max-new-tokens", "2"]);
    damaged(&bad_model, "model.safetensors", &generate);
    let init = base_args(&data, &cfg, &tmp.path().join("init"), &["--init-from", &s(&bad_model)]);
    let init: Vec<&str> = init.iter().map(String::as_str).filter(|a| *a != "--model-config" && *a != s(&cfg)).collect();
    damaged(&bad_model, "model.safetensors", &train_err(&init));
    // A Hugging Face directory has no checksums.json: it loads unchecked (the final model too).
    std::fs::remove_file(bad_model.join("checksums.json")).unwrap();
    train_ok(&["eval", "--checkpoint", &s(&bad_model), "--data", &s(&data)]);
    assert!(!full.join("checksums.json").exists());
    train_ok(&["eval", "--checkpoint", &s(&full), "--data", &s(&data)]);
    train_ok(&["eval", "--checkpoint", &s(&full.join("checkpoint-3")), "--data", &s(&data)]);
}

#[test]
fn temporary_files_a_killed_run_left_in_the_output_dir_are_removed_and_only_those() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // 99999999 is above Linux's largest process id; process 1 always runs.
    let stale =
        [".model.safetensors.99999999.tmp", ".config.json.99999999.tmp", ".tokenizer.json.99999999.tmp", ".metrics.jsonl.99999999.tmp"];
    let keep = [".model.safetensors.1.tmp", ".model.safetensors.99999999.tmp.partial", "notes.txt"];
    for n in stale.iter().chain(&keep) {
        std::fs::write(out.join(n), b"left over").unwrap();
    }
    // a checkpoint directory a killed run was writing, and one a live process is writing
    let (dead_ckpt, live_ckpt) = (out.join(".checkpoint-3.99999999.tmp"), out.join(".checkpoint-3.1.tmp"));
    for d in [&dead_ckpt, &live_ckpt] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("model.safetensors"), b"half").unwrap();
    }
    let args = base_args(&data, &cfg, &out, &["--save-strategy", "no"]);
    let o = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a dead writer from a live one: nothing is removed
    }
    assert!(stderr.contains(&format!("note: removed 5 temporary files an interrupted run left in {}", out.display())), "{stderr}");
    for n in stale {
        assert!(!out.join(n).exists(), "{n} stayed");
    }
    for n in keep {
        assert!(out.join(n).exists(), "{n} is not provably stale and ours");
    }
    assert!(!dead_ckpt.exists() && live_ckpt.join("model.safetensors").is_file());
}

#[test]
fn a_checkpoint_re_save_interrupted_between_its_renames_is_finished_on_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 10, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    run(&base_args(&data, &cfg, &out, &[]));
    // the crash came after `checkpoint-6` was moved aside and before its replacement arrived
    std::fs::rename(out.join("checkpoint-6"), out.join("checkpoint-6.old")).unwrap();
    // and another after the replacement of `checkpoint-3` was complete
    copy_dir(&out.join("checkpoint-3"), &out.join("checkpoint-3.old"));
    let args = base_args(&data, &cfg, &out, &["--resume-from-checkpoint"]);
    let o = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("note: restored") && stderr.contains("checkpoint-6 (a crash interrupted its re-save)"), "{stderr}");
    assert!(
        stderr.contains("resuming from") && stderr.contains("checkpoint-6 at step 6"),
        "the newest checkpoint is the one resumed: {stderr}"
    );
    assert!(stderr.contains("checkpoint-3.old (left by a crash after its replacement was complete)"), "{stderr}");
    assert!(out.join("checkpoint-6/trainer_state.json").is_file());
    assert!(!out.join("checkpoint-6.old").exists() && !out.join("checkpoint-3.old").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
