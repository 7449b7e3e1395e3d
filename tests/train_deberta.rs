//! `train` with DeBERTa-v2 (`--model-type deberta-v2`): from scratch on a masked-LM store, then
//! `train eval` and `train fill-mask` on it, `--init-from` an RTD discriminator checkpoint (its discriminator tensors listed, the missing
//! MLM head initialised), and the bad inputs of the family: an unsupported config option and a
//! tokenizer that differs from the checkpoint's, each one `error:` line.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use train_support::*;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

/// `train prepare` of a small corpus (one line per document) into `out`, with `tokenizer` or a
/// WordPiece tokenizer trained on it.
fn prepare(corpus: &Path, out: &Path, tokenizer: Option<&Path>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.args(["prepare", "--quiet", &s(corpus), "--block-size", "24", "--line-by-line", "--validation-split", "0.2", "-o", &s(out)]);
    match tokenizer {
        Some(t) => cmd.args(["--tokenizer", &s(t), "--model-type", "masked"]),
        None => cmd.args(["--model-type", "bert", "--vocab-size", "300"]),
    };
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn deberta_trains_from_scratch_and_starts_from_a_discriminator() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("c.txt");
    let lines: Vec<String> = (0..60).map(|i| format!("the quick brown fox number {i} jumps over the lazy dog")).collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let bert = tmp.path().join("bert");
    prepare(&corpus, &bert, Some(&data("tokenizers/bert-base-uncased.tokenizer.json")));
    let out = tmp.path().join("out");
    let common = ["--max-steps", "3", "--per-device-train-batch-size", "4", "--no-progress"];
    let size = ["--model-type", "deberta-v2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"];
    let mut args = vec!["--data".to_string(), s(&bert), "--output-dir".into(), s(&out)];
    args.extend(size.iter().chain(&common).map(|x| x.to_string()));
    let stdout = train_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "deberta-v2");
    assert_eq!(cfg["architectures"][0], "DebertaV2ForMaskedLM");
    assert_eq!(cfg["relative_attention"], true);
    // the masked-LM commands take the family from the checkpoint
    let eval = train_ok(&["eval", "--checkpoint", &s(&out), "--data", &s(&bert)]);
    assert!(eval.contains("eval loss"), "{eval}");
    let fill = train_ok(&["fill-mask", "--checkpoint", &s(&out), "--top-k", "3", "the quick brown [MASK] jumps"]);
    assert_eq!(fill.lines().count(), 3, "{fill}");

    // an RTD discriminator: no MLM head, a mask_predictions head instead
    let disc = tmp.path().join("disc");
    std::fs::create_dir_all(&disc).unwrap();
    std::fs::copy(out.join("config.json"), disc.join("config.json")).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 4 * 16];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.iter().filter(|(n, _)| !n.starts_with("cls.")).map(|(n, v)| (n.to_string(), v)).collect();
    tensors.push((
        "mask_predictions.classifier.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 16], &zeros).unwrap(),
    ));
    std::fs::write(disc.join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    let adapted = tmp.path().join("adapted");
    let o = train(&["--data", &s(&bert), "--init-from", &s(&disc), "--output-dir", &s(&adapted), "--max-steps", "3", "--no-progress"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("tensor mask_predictions.classifier.weight is not used by this model"), "{stderr}");
    assert!(stderr.contains("tensor cls.predictions.bias is not in the checkpoint and was initialised fresh"), "{stderr}");

    // a store from another tokenizer than the checkpoint's (which carries its tokenizer.json)
    let other = tmp.path().join("other");
    prepare(&corpus, &other, None);
    let line = train_err(&["--data", &s(&other), "--init-from", &s(&out), "--output-dir", &s(&tmp.path().join("x")), "--max-steps", "1"]);
    assert!(line.contains("tokenizer"), "{line}");

    // an option this implementation does not have
    let mut bad = cfg.clone();
    bad["pos_att_type"] = serde_json::json!(["c2p", "p2p"]);
    let bad_path = tmp.path().join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let line =
        train_err(&["--data", &s(&bert), "--model-config", &s(&bad_path), "--output-dir", &s(&tmp.path().join("y")), "--max-steps", "1"]);
    assert!(line.contains("pos_att_type \"p2p\""), "{line}");
}
