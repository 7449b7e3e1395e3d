//! The `train` workflow on tiny data: config files, evaluation, best-model selection,
//! `--init-from`, `train eval` and `train generate`.

mod train_support;

use train_support::*;

const VOCAB: usize = 40;

fn eval_records(out: &std::path::Path) -> Vec<(u64, f64)> {
    logged(out, "eval_loss")
}

#[test]
fn config_file_sets_options_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 8, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    let conf = tmp.path().join("run.json");
    // HF-style snake_case keys in JSON; the flag --max-steps 4 wins over max_steps 2.
    std::fs::write(
        &conf,
        serde_json::json!({
            "data": data, "model_config": cfg, "output_dir": out, "max_steps": 2, "learning_rate": 1e-2,
            "eval_strategy": "steps", "eval_steps": 2, "logging_steps": 1, "save_strategy": "no",
            "per_device_train_batch_size": 2,
        })
        .to_string(),
    )
    .unwrap();
    train_ok(&["--config", &s(&conf), "--max-steps", "4", "--no-progress"]);
    let losses = logged_losses(&out);
    assert_eq!(losses.len(), 4, "{losses:?}");
    assert_eq!(eval_records(&out).iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(!out.join("checkpoint-4").exists(), "--save-strategy no");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
    // linear schedule, no warmup: the first step runs at the peak learning rate
    assert_eq!(first["learning_rate"].as_f64(), Some(1e-2));

    let toml_conf = tmp.path().join("run.toml");
    std::fs::write(&toml_conf, "learning-rate = 1e-2\nmax-steps = 3\nlogging-steps = 1\nsave-strategy = \"no\"\n").unwrap();
    let out2 = tmp.path().join("out2");
    train_ok(&["--config", &s(&toml_conf), "--data", &s(&data), "--model-config", &s(&cfg), "--output-dir", &s(&out2), "--no-progress"]);
    assert_eq!(logged_losses(&out2).len(), 3);
}

#[test]
fn training_lowers_eval_loss_and_best_model_is_loaded_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 24, 6);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    train_ok(&[
        "--data",
        &s(&data),
        "--model-config",
        &s(&cfg),
        "--output-dir",
        &s(&out),
        "--num-train-epochs",
        "6",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "6",
        "--save-steps",
        "6",
        "--save-total-limit",
        "1",
        "--load-best-model-at-end",
        "--logging-steps",
        "6",
        "--no-progress",
    ]);
    let evals = eval_records(&out);
    assert_eq!(evals.len(), 6, "24 blocks / 4 = 6 steps per epoch, 6 epochs: {evals:?}");
    assert!(evals.last().unwrap().1 < evals[0].1 - 0.3, "eval loss falls: {evals:?}");
    let best = evals.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    // The best checkpoint survives rotation, and the final model in OUTPUT_DIR is it.
    let best_dir = out.join(format!("checkpoint-{}", best.0));
    assert!(best_dir.is_dir());
    assert_eq!(std::fs::read(best_dir.join("model.safetensors")).unwrap(), std::fs::read(out.join("model.safetensors")).unwrap());
    // `train eval` on the final model reproduces the best eval loss.
    let stdout = train_ok(&["eval", "--checkpoint", &s(&out), "--data", &s(&data)]);
    let loss: f64 = stdout.split("eval loss ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!((loss - best.1).abs() < 1e-3, "{stdout} vs best {}", best.1);
    assert!(stdout.contains("perplexity"));
}

#[test]
fn init_from_continues_from_a_saved_model_and_generate_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 24, 6);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let first = tmp.path().join("first");
    let common =
        ["--per-device-train-batch-size", "4", "--learning-rate", "1e-2", "--logging-steps", "1", "--no-progress", "--save-strategy", "no"];
    let mut args = vec![
        "--data".to_string(),
        s(&data),
        "--model-config".into(),
        s(&cfg),
        "--output-dir".into(),
        s(&first),
        "--max-steps".into(),
        "30".into(),
    ];
    args.extend(common.iter().map(|x| x.to_string()));
    train_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let first_losses = logged_losses(&first);

    let second = tmp.path().join("second");
    let mut args = vec![
        "--data".to_string(),
        s(&data),
        "--init-from".into(),
        s(&first),
        "--output-dir".into(),
        s(&second),
        "--max-steps".into(),
        "2".into(),
    ];
    args.extend(common.iter().map(|x| x.to_string()));
    train_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let second_losses = logged_losses(&second);
    assert!(
        second_losses[0].1 < first_losses[0].1 - 0.5,
        "starts from the trained weights: {} vs fresh {}",
        second_losses[0].1,
        first_losses[0].1
    );

    // Greedy generation is deterministic; the output is the prompt and its continuation.
    let g = |extra: &[&str]| {
        let mut a = vec!["generate", "--checkpoint", second.to_str().unwrap(), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "6"];
        a.extend_from_slice(extra);
        train_ok(&a)
    };
    let greedy = g(&[]);
    assert_eq!(greedy, g(&["--greedy"]));
    assert!(greedy.starts_with("w1 w2 w3 w4 "), "{greedy}");
    let words = greedy.split_whitespace().count();
    assert!((5..=10).contains(&words), "1 to 6 new tokens (fewer if w0, the end of text, comes): {greedy}");
    let sampled = g(&["--temperature", "1.0", "--top-k", "5", "--seed", "3"]);
    assert_eq!(sampled, g(&["--temperature", "1.0", "--top-k", "5", "--seed", "3"]), "seeded sampling repeats");
    let line = train_err(&["generate", "--checkpoint", &s(&second), "--prompt", "w1", "--greedy", "--top-k", "3"]);
    assert!(line.contains("--greedy") || line.contains("cannot be used"), "{line}");
}

#[test]
fn eval_accepts_a_text_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 8, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    train_ok(&["--data", &s(&data), "--model-config", &s(&cfg), "--output-dir", &s(&out), "--max-steps", "2", "--no-progress"]);
    let text = tmp.path().join("text.txt");
    let line: Vec<String> = (0..40).map(|i| format!("w{}", (i * 2) % VOCAB)).collect();
    std::fs::write(&text, format!("{}\n", line.join(" ")).repeat(4)).unwrap();
    let stdout = train_ok(&["eval", "--checkpoint", &s(&out), "--data", &s(&text), "--block-size", "12"]);
    assert!(stdout.contains("perplexity") && stdout.contains("blocks of 12 tokens"), "{stdout}");
}

#[test]
fn gradient_accumulation_matches_the_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 16, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let run = |name: &str, batch: &str, accum: &str| {
        let out = tmp.path().join(name);
        train_ok(&[
            "--data",
            &s(&data),
            "--model-config",
            &s(&cfg),
            "--output-dir",
            &s(&out),
            "--max-steps",
            "6",
            "--per-device-train-batch-size",
            batch,
            "--gradient-accumulation-steps",
            accum,
            "--learning-rate",
            "1e-2",
            "--logging-steps",
            "1",
            "--save-strategy",
            "no",
            "--no-progress",
        ]);
        logged_losses(&out)
    };
    let big = run("big", "4", "1");
    let acc = run("acc", "2", "2");
    assert_eq!(big.len(), 6);
    for (a, b) in big.iter().zip(&acc) {
        assert!((a.1 - b.1).abs() < 1e-5 * a.1, "step {}: batch 4 loss {} vs 2x2 accumulated {}", a.0, a.1, b.1);
    }
}

#[test]
fn epoch_strategies_evaluate_and_save_at_epoch_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 12, 8, 4);
    let cfg = model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.0);
    let out = tmp.path().join("out");
    // 8 blocks of batch 3: 3 micro-batches (the last short), 3 steps per epoch.
    train_ok(&[
        "--data",
        &s(&data),
        "--model-config",
        &s(&cfg),
        "--output-dir",
        &s(&out),
        "--num-train-epochs",
        "2",
        "--per-device-train-batch-size",
        "3",
        "--eval-strategy",
        "epoch",
        "--save-strategy",
        "epoch",
        "--logging-steps",
        "100",
        "--no-progress",
    ]);
    assert_eq!(eval_records(&out).iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 6]);
    assert!(out.join("checkpoint-3").is_dir() && out.join("checkpoint-6").is_dir());
    // logging every 100 steps still logs the last step
    assert_eq!(logged_losses(&out).iter().map(|l| l.0).collect::<Vec<_>>(), vec![6]);
}

#[test]
fn recompute_trains_to_the_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = s(&make_data(&tmp.path().join("data"), VOCAB, 12, 16, 4));
    let cfg = s(&model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.1));
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let base = ["--data", &data, "--model-config", &cfg, "--output-dir", &s(&out), "--max-steps", "4", "--logging-steps", "1"];
        train_ok(&[&base[..], &["--save-strategy", "no", "--no-progress"], extra].concat());
        logged_losses(&out)
    };
    let (kept, recomputed) = (run("kept", &[]), run("recomputed", &["--recompute"]));
    assert_eq!(kept.len(), 4);
    assert_eq!(kept, recomputed, "--recompute changed the losses");
}
