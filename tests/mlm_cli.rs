//! The masked-LM workflow through the `train` binary on a small WordPiece store of the embedded
//! corpus: training a BERT, `train eval` on fixed masks, `train fill-mask`, and the mismatches
//! that must stop with one clear line.

mod train_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use train_support::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/kjv.txt.gz")
}

fn work(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mlm_cli").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A masked store (WordPiece tokenizer of 600 trained on the corpus, blocks of 32) and a tiny
/// BERT trained on it; made once per test run.
fn trained() -> &'static (PathBuf, PathBuf) {
    static ONCE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let root = work("trained");
        let data = root.join("data");
        let out = train(&[
            "prepare",
            &s(&corpus()),
            "--model-type",
            "masked",
            "--vocab-size",
            "600",
            "--block-size",
            "32",
            "--max-train-blocks",
            "200",
            "--validation-split",
            "0.01",
            "-o",
            &s(&data),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let model = root.join("model");
        train_ok(&[
            "--data",
            &s(&data),
            "--output-dir",
            &s(&model),
            "--model-type",
            "bert",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--max-steps",
            "12",
            "--per-device-train-batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "12",
            "--no-progress",
        ]);
        (data, model)
    })
}

/// The `eval loss` number of `train eval`'s output.
fn eval_loss(stdout: &str) -> f64 {
    let rest = stdout.split("eval loss ").nth(1).unwrap_or_else(|| panic!("no eval loss in {stdout}"));
    rest.split(',').next().unwrap().parse().unwrap()
}

#[test]
fn train_eval_uses_the_fixed_masks_of_the_run() {
    let (data, model) = trained();
    let logged: Vec<f64> = std::fs::read_to_string(model.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get("eval_loss")?.as_f64())
        .collect();
    let last = *logged.last().expect("the run evaluated");
    let args = ["eval", "--checkpoint", &s(model), "--data", &s(data)];
    let first = train_ok(&args);
    assert!(first.contains("fixed masks: 15% of the tokens, seed 42"), "{first}");
    // the run's --seed (42) gives the masks its evaluations used: the same loss as logged
    assert!((eval_loss(&first) - last).abs() < 1e-4, "train eval {} vs logged {last}", eval_loss(&first));
    assert_eq!(train_ok(&args), first, "the same masks every time");
    let other = train_ok(&[&args[..], &["--seed", "7"]].concat());
    assert_ne!(eval_loss(&other), eval_loss(&first), "another seed, other masks");
}

#[test]
fn fill_mask_prints_top_k_per_mask_and_json() {
    let (_, model) = trained();
    let dir = s(model);
    let text = train_ok(&["fill-mask", "--checkpoint", &dir, "--top-k", "3", "and god said, let there be [MASK]."]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let scores: Vec<f64> = lines.iter().map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]) && scores[0] > 0.0 && scores.iter().sum::<f64>() <= 1.0 + 1e-9, "{text}");

    let json = train_ok(&["fill-mask", "--checkpoint", &dir, "--json", "and god said, let there be [MASK]."]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 5, "--top-k defaults to 5");
    for c in list {
        let seq = c["sequence"].as_str().unwrap();
        let tok = c["token_str"].as_str().unwrap();
        assert!(c["score"].as_f64().unwrap() > 0.0 && c["token"].as_u64().is_some());
        assert!(!seq.contains("[CLS]") && !seq.contains("[MASK]") && seq.contains(tok.trim_start_matches("##")), "{seq} / {tok}");
    }
    assert!((list[0]["score"].as_f64().unwrap() - scores[0]).abs() < 1e-4);

    // two masks: one list each, and the other mask stays visible in each sequence
    let json = train_ok(&["fill-mask", "--checkpoint", &dir, "--json", "--top-k", "2", "[MASK] god said, let there be [MASK]."]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let lists = v.as_array().unwrap();
    assert_eq!(lists.len(), 2);
    for l in lists {
        assert_eq!(l.as_array().unwrap().len(), 2);
        assert!(l[0]["sequence"].as_str().unwrap().contains("[MASK]"));
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let (_, model) = trained();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_train"))
        // ten masks x 600 completions: far more than a pipe buffer holds
        .args(["fill-mask", "--checkpoint", &s(model), "--json", "--top-k", "600", &"[MASK] ".repeat(10)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "a closed stdout made train panic:\n{stderr}");
}

#[test]
fn masked_lm_mismatches_stop_with_one_line() {
    let (data, model) = trained();
    let root = work("mismatch");
    // a fill-mask prompt without the checkpoint's mask token
    let e = train_err(&["fill-mask", "--checkpoint", &s(model), "no mask here"]);
    assert!(e.contains("no [MASK]"), "{e}");
    // a checkpoint whose vocabulary is not the tokenizer's
    let other = root.join("other-tokenizer");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), other.join(f)).unwrap();
    }
    let bert_tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizers/bert-base-uncased.tokenizer.json");
    std::fs::copy(&bert_tok, other.join("tokenizer.json")).unwrap();
    let e = train_err(&["fill-mask", "--checkpoint", &s(&other), "a [MASK]."]);
    assert!(e.contains("30522 tokens") && e.contains("do not belong together"), "{e}");
    // a masked store for a causal model, a causal store for a masked one
    let out = root.join("gpt2-on-masked");
    let e = train_err(&[
        "--data",
        &s(data),
        "--output-dir",
        &s(&out),
        "--model-type",
        "gpt2",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
    ]);
    assert!(e.contains("prepared for masked LM") && e.contains("--model-type causal"), "{e}");
    assert!(!out.exists(), "nothing written");
    let causal = root.join("causal");
    let gpt2_tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizers/gpt2.tokenizer.json");
    let out = train(&[
        "prepare",
        &s(&corpus()),
        "--tokenizer",
        &s(&gpt2_tok),
        "--block-size",
        "32",
        "--max-train-blocks",
        "20",
        "-o",
        &s(&causal),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = root.join("bert-on-causal");
    let e = train_err(&[
        "--data",
        &s(&causal),
        "--output-dir",
        &s(&out),
        "--model-type",
        "bert",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
    ]);
    assert!(e.contains("prepared for causal LM") && e.contains("--model-type masked"), "{e}");
    assert!(!out.exists(), "nothing written");
    // --objective must fit the family
    let e = train_err(&["--data", &s(data), "--output-dir", &s(&out), "--model-type", "gpt2", "--objective", "mlm"]);
    assert!(e.contains("--objective mlm does not fit GPT2LMHeadModel"), "{e}");
    // a causal checkpoint fills no masks
    let gdata = make_data(&root.join("gdata"), 40, 8, 16, 4);
    let gcfg = model_config(&root.join("gcfg"), 40, 8, 0.0);
    let gout = root.join("gpt2");
    train_ok(&["--data", &s(&gdata), "--output-dir", &s(&gout), "--model-config", &s(&gcfg), "--max-steps", "1", "--no-progress"]);
    let e = train_err(&["fill-mask", "--checkpoint", &s(&gout), "a [MASK]"]);
    assert!(e.contains("fills no masks") && e.contains("train generate"), "{e}");
    // an MLM run on a tokenizer without a mask token
    let e = train_err(&[
        "--data",
        &s(&gdata),
        "--output-dir",
        &s(&root.join("no-mask")),
        "--model-type",
        "bert",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
    ]);
    assert!(e.contains("no mask token"), "{e}");
    // --whole-word-masking on a store without word-start flags
    let special = lmtrain_store::SpecialTokens { mask: Some(1), ..Default::default() };
    let wdata = make_data_with(&root.join("no-word-starts"), 40, 8, 16, 4, "a", special);
    let out = root.join("wwm");
    let e = train_err(&[
        "--data",
        &s(&wdata),
        "--output-dir",
        &s(&out),
        "--model-type",
        "bert",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--whole-word-masking",
    ]);
    assert!(e.contains("--whole-word-masking needs the store's word-start flags"), "{e}");
    assert!(!out.exists(), "nothing written");
}
