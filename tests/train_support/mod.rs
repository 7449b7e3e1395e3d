//! Shared helpers of the `train_*` integration tests: a tiny word-level tokenizer, synthetic
//! block stores with a learnable pattern, tiny GPT-2 configs, and running the `train` binary.

#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmtrain_store::{BlockWriter, SpecialTokens, StoreSpec};

/// A Hugging Face `tokenizer.json` with a word-level vocabulary `w0 .. w{n-1}`
/// (`w0` doubles as end of text), whitespace pre-tokenization. Tag "a" has no normalizer, any
/// other tag a lowercasing one: same ids, another tokenizer (another fingerprint).
pub fn tokenizer_json(vocab: usize, tag: &str) -> String {
    let entries: Vec<String> = (0..vocab).map(|i| format!("\"w{i}\":{i}")).collect();
    let normalizer = if tag == "a" { "null" } else { r#"{"type":"Lowercase"}"# };
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{normalizer},
"pre_tokenizer":{{"type":"WhitespaceSplit"}},"post_processor":null,
"decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        entries.join(",")
    )
}

/// Writes `dir/{train.bin, validation.bin, tokenizer.json}`: blocks of `block` tokens where
/// each token is the previous one plus a per-block stride (mod `vocab`), so a model can learn it.
pub fn make_data(dir: &Path, vocab: usize, block: usize, n_train: usize, n_val: usize) -> PathBuf {
    make_data_tagged(dir, vocab, block, n_train, n_val, "a")
}

/// As [`make_data`] with a tokenizer variant tag (another tag = another tokenizer fingerprint).
pub fn make_data_tagged(dir: &Path, vocab: usize, block: usize, n_train: usize, n_val: usize, tag: &str) -> PathBuf {
    make_data_with(dir, vocab, block, n_train, n_val, tag, SpecialTokens { eos: Some(0), ..Default::default() })
}

/// As [`make_data_tagged`] with the special-token ids the store headers record.
pub fn make_data_with(dir: &Path, vocab: usize, block: usize, n_train: usize, n_val: usize, tag: &str, special: SpecialTokens) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer_json(vocab, tag);
    std::fs::write(dir.join("tokenizer.json"), &tok).unwrap();
    let fp = lmtrain_text::tokenizer_fingerprint(tok.as_bytes());
    for (name, n, salt) in [("train.bin", n_train, 0u64), ("validation.bin", n_val, 1_000_003)] {
        let spec = StoreSpec {
            block_size: block as u32,
            vocab_size: vocab as u32,
            tokenizer_fingerprint: fp,
            special,
            word_starts: false,
            layout: Default::default(),
        };
        let mut w = BlockWriter::create(&dir.join(name), spec).unwrap();
        for i in 0..n as u64 {
            let h = lmtrain_backend::mix64(i + salt);
            let start = h % vocab as u64;
            let stride = 1 + (h >> 32) % 3;
            let toks: Vec<u32> = (0..block as u64).map(|j| ((start + j * stride) % vocab as u64) as u32).collect();
            w.push_block(&toks, None).unwrap();
        }
        w.finish().unwrap().persist().unwrap();
    }
    dir.to_path_buf()
}

/// Writes a tiny GPT-2 `config.json` and returns its path.
pub fn model_config(dir: &Path, vocab: usize, n_positions: usize, dropout: f64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.json");
    let cfg = serde_json::json!({
        "model_type": "gpt2", "vocab_size": vocab, "n_positions": n_positions, "n_embd": 16,
        "n_layer": 2, "n_head": 2, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "embd_pdrop": dropout, "attn_pdrop": dropout, "resid_pdrop": dropout,
        "bos_token_id": 0, "eos_token_id": 0,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    path
}

/// The `train` binary: this build's, or `LMTRAIN_TRAIN_BIN` (scripts/gpu-check.sh runs the
/// test binaries away from the build tree).
pub fn train_bin() -> PathBuf {
    std::env::var_os("LMTRAIN_TRAIN_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_train")), PathBuf::from)
}

/// The repository's `data/` directory (corpus and tokenizers), or `LMTRAIN_DATA_DIR`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("LMTRAIN_DATA_DIR").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data"), PathBuf::from)
}

/// Runs the `train` binary with `args`.
pub fn train(args: &[&str]) -> Output {
    Command::new(train_bin()).args(args).output().expect("run train")
}

/// Runs `train`, asserting success; returns stdout.
pub fn train_ok(args: &[&str]) -> String {
    let out = train(args);
    assert!(
        out.status.success(),
        "train {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `train`, asserting failure with exactly one `error:` line; returns that line.
pub fn train_err(args: &[&str]) -> String {
    let out = train(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "train {args:?} should fail; stderr:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected, stderr:\n{stderr}");
    errors[0].to_string()
}

/// `(step, value)` of every record of `out_dir/metrics.jsonl` that has `key`.
pub fn logged(out_dir: &Path, key: &str) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v.get("step")?.as_u64()?, v.get(key)?.as_f64()?))
        })
        .collect()
}

/// `(step, loss)` of every training-loss record of `out_dir/metrics.jsonl`.
pub fn logged_losses(out_dir: &Path) -> Vec<(u64, f64)> {
    logged(out_dir, "loss")
}

/// `s(p)` as an owned `String` for argument lists.
pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
