//! Bad input to `train`: one clear `error:` line, a non-zero exit, and nothing lost.

mod train_support;

use train_support::*;

const VOCAB: usize = 40;

#[test]
fn block_size_beyond_n_positions_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 8, 0.0);
    let out = tmp.path().join("out");
    let line = train_err(&["--data", &s(&data), "--model-config", &s(&cfg), "--output-dir", &s(&out), "--max-steps", "1"]);
    assert!(line.contains("block size 12") && line.contains("n_positions 8"), "{line}");
    assert!(!out.join("checkpoint-1").exists());
}

#[test]
fn store_vocabulary_beyond_the_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB - 8, 16, 0.0);
    let out = tmp.path().join("out");
    let line = train_err(&["--data", &s(&data), "--model-config", &s(&cfg), "--output-dir", &s(&out), "--max-steps", "1"]);
    assert!(line.contains("vocabulary (40 tokens)") && line.contains("vocab_size 32"), "{line}");
}

#[test]
fn a_store_from_another_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let first = tmp.path().join("first");
    train_ok(&["--data", &s(&data), "--model-config", &s(&cfg), "--output-dir", &s(&first), "--max-steps", "1", "--no-progress"]);
    // Same sizes, other tokenizer.
    let other = make_data_tagged(&tmp.path().join("other"), VOCAB, 12, 6, 2, "b");
    let out = tmp.path().join("out");
    let line = train_err(&["--data", &s(&other), "--init-from", &s(&first), "--output-dir", &s(&out), "--max-steps", "1"]);
    assert!(line.contains("different tokenizer"), "{line}");
    let line = train_err(&["eval", "--checkpoint", &s(&first), "--data", &s(&other)]);
    assert!(line.contains("different tokenizer"), "{line}");
}

#[test]
fn unknown_and_contradictory_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let (d, c, o) = (s(&data), s(&cfg), s(&tmp.path().join("out")));
    let base = ["--data", d.as_str(), "--model-config", c.as_str(), "--output-dir", o.as_str()];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|x| x.to_string()).collect() };
    let cases: [(&[&str], &str); 8] = [
        (&["--learning-rat", "1e-3"], "unexpected argument"),
        (&["--max-steps", "3", "--num-train-epochs", "2"], "either --max-steps or --num-train-epochs"),
        (&["--warmup-steps", "3", "--warmup-ratio", "0.1"], "either --warmup-steps or --warmup-ratio"),
        (&["--load-best-model-at-end"], "needs evaluation"),
        (&["--eval-strategy", "steps", "--save-strategy", "epoch", "--load-best-model-at-end"], "--save-strategy equal"),
        (&["--lr-scheduler", "exponential"], "unknown learning-rate scheduler"),
        (&["--n-layer", "2"], "either --model-config or --n-layer"),
        (&["--device", "cuda"], "; use --device cpu"),
    ];
    for (extra, want) in cases {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = train(&refs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(stderr.contains(want), "{extra:?}: expected `{want}` in:\n{stderr}");
    }
    assert!(!tmp.path().join("out").exists(), "nothing written by refused runs");
}

#[test]
fn a_config_file_key_that_does_not_exist_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("run.toml");
    std::fs::write(&conf, "learning-rate = 1e-3\nlearnin_rate = 2\n").unwrap();
    let line = train_err(&["--config", &s(&conf), "--output-dir", &s(&tmp.path().join("o"))]);
    assert!(line.contains("learnin-rate"), "{line}");
}

#[test]
fn nan_loss_stops_names_the_step_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    // An absurd learning rate blows the weights up within a few steps.
    let line = train_err(&[
        "--data",
        &s(&data),
        "--model-config",
        &s(&cfg),
        "--output-dir",
        &s(&out),
        "--max-steps",
        "20",
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "0",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ]);
    assert!(line.contains("at step ") && line.contains("--learning-rate"), "{line}");
    let step: u64 = line.split("at step ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(step >= 2, "step 1 has a finite loss: {line}");
    let kept = out.join(format!("checkpoint-{}", step - 1));
    assert!(kept.join("model.safetensors").is_file() && line.contains(&s(&kept)), "{line}");
    assert!(!out.join(format!("checkpoint-{step}")).exists());
}

#[test]
fn init_from_a_pickle_only_directory_says_it_is_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let hf = tmp.path().join("hf");
    model_config(&hf, VOCAB, 16, 0.0);
    std::fs::write(hf.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let out = tmp.path().join("out");
    let line = train_err(&["--data", &s(&data), "--init-from", &s(&hf), "--output-dir", &s(&out), "--max-steps", "1"]);
    assert!(line.contains("pytorch_model.bin"), "{line}");
    assert!(!out.exists());
}

#[test]
fn an_inconsistent_trainer_state_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    let base = [
        "--data",
        &s(&data),
        "--model-config",
        &s(&cfg),
        "--output-dir",
        &s(&out),
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--no-progress",
    ]
    .map(String::from);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    train_ok(&base);
    let state_path = out.join("checkpoint-2/trainer_state.json");
    let good = std::fs::read_to_string(&state_path).unwrap();
    let ckpt = s(&out.join("checkpoint-2"));
    // Edited by hand with its checksums dropped (a changed file with them is refused as damaged,
    // see train_resume.rs): the loop state itself must still be checked.
    std::fs::remove_file(out.join("checkpoint-2/checksums.json")).unwrap();
    for (key, value) in [("step_in_epoch", 999), ("global_step", 99)] {
        let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
        state[key] = value.into();
        std::fs::write(&state_path, state.to_string()).unwrap();
        let mut args = base.clone();
        args.extend(["--resume-from-checkpoint", ckpt.as_str()]);
        let line = train_err(&args);
        assert!(line.contains("inconsistent loop state"), "{key}: {line}");
    }
}

#[test]
fn a_model_beyond_the_machines_memory_is_refused_before_allocation_everywhere() {
    let Some(mem) = lmtrain_model::limits::host_memory() else {
        println!("SKIP: this platform does not report its memory; only the fixed parameter bound applies");
        return;
    };
    // GPT-2 of width 8192 (805M parameters a layer) with enough layers that even evaluation
    // (8 bytes a parameter) needs more than the available memory, within every size bound.
    let per_layer = 12 * 8192u64 * 8192 + 13 * 8192;
    let n_layer = mem.available / 8 / per_layer + 2;
    if n_layer as u128 * per_layer as u128 > lmtrain_model::limits::MAX_PARAMS {
        println!("SKIP: {} GB available: no model within the parameter bound exceeds it", mem.available / 1_000_000_000);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 6, 2);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let mut huge: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    huge["n_embd"] = 8192.into();
    huge["n_layer"] = n_layer.into();
    // a model directory: the huge config.json, no weights worth reading (never opened)
    let dir = tmp.path().join("huge");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), huge.to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    std::fs::copy(data.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let refused = |line: &str, bytes: u32| {
        assert!(
            line.contains("parameters and needs at least")
                && line.contains(&format!("({bytes} bytes per parameter"))
                && line.contains("available (of"),
            "{line}"
        );
    };
    let out = tmp.path().join("out");
    let (d, o, c) = (s(&data), s(&out), s(&dir));
    let scratch = train_err(&["--data", &d, "--model-config", &s(&dir.join("config.json")), "--output-dir", &o, "--max-steps", "1"]);
    refused(&scratch, 16);
    let init = train_err(&["--data", &d, "--init-from", &c, "--output-dir", &o, "--max-steps", "1"]);
    refused(&init, 16);
    assert!(init.contains(&format!("{}: the model has", dir.join("config.json").display())), "{init}");
    let resume = train_err(&["--data", &d, "--resume-from-checkpoint", &c, "--output-dir", &o, "--max-steps", "1"]);
    refused(&resume, 16);
    refused(&train_err(&["eval", "--checkpoint", &c, "--data", &d]), 8);
    refused(&train_err(&["generate", "--checkpoint", &c, "--prompt", "w1"]), 8);
    assert!(!out.join("checkpoint-1").exists());
}
