//! `train prepare` end to end through the built binary: the happy path, and every kind of
//! bad input giving one clear error line, a non-zero exit and no partial output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmtrain_store::BlockStore;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

fn gpt2() -> PathBuf {
    data("tokenizers/gpt2.tokenizer.json")
}

fn prepare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).arg("prepare").arg("--quiet").args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failure with exactly one stderr line that contains every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected, got: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{stderr:?} lacks {n:?}");
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn prepares_the_embedded_corpus_with_a_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("kjv");
    let out = prepare(&[
        s(&data("corpus/kjv.txt.gz")),
        "--tokenizer",
        s(&gpt2()),
        "--validation-split",
        "0.05",
        "--block-size",
        "256",
        "--output-dir",
        s(&out_dir),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(files_in(&out_dir), ["tokenizer.json", "train.bin", "validation.bin"]);
    let train = BlockStore::open(&out_dir.join("train.bin")).unwrap();
    let valid = BlockStore::open(&out_dir.join("validation.bin")).unwrap();
    train.verify().unwrap();
    valid.verify().unwrap();
    assert_eq!(train.header().block_size, 256);
    assert_eq!(train.header().tokenizer_fingerprint, valid.header().tokenizer_fingerprint);
    // KJV is ~1.0 M GPT-2 tokens; 5% of the verses are held out.
    let (t, v) = (train.len() as f64, valid.len() as f64);
    assert!((3500.0..4200.0).contains(&(t + v)), "{t} + {v} blocks");
    assert!((0.035..0.065).contains(&(v / (t + v))), "validation share {}", v / (t + v));
    for needle in ["documents", "tokens", "blocks", "tokens/s", "train.bin", "validation.bin", "tokenizer.json"] {
        assert!(stdout.contains(needle), "summary lacks {needle}: {stdout}");
    }
    let train_line = stdout.lines().find(|l| l.starts_with("train")).unwrap();
    assert!(train_line.contains(&format!("{} blocks", train.len())), "{train_line}");
}

#[test]
fn help_explains_the_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["prepare", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "--tokenizer",
        "--block-size",
        "--validation-split",
        "--text-field",
        "--text-column",
        "--paragraphs",
        "--skip-invalid",
        "end-of-text",
        "[CLS]",
    ] {
        assert!(help.contains(needle), "help lacks {needle}");
    }
}

#[test]
fn missing_input_path() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = prepare(&[s(&dir.path().join("missing.txt")), "--tokenizer", s(&gpt2()), "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["missing.txt", "no such file"]);
    assert!(files_in(&out_dir).is_empty());
}

#[test]
fn empty_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("empty.txt");
    std::fs::write(&corpus, "\n\n   \n").unwrap();
    let out_dir = dir.path().join("out");
    let out = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["corpus is empty", "empty.txt"]);
    assert!(files_in(&out_dir).is_empty());
}

#[test]
fn invalid_utf8_names_file_and_offset_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("latin1.txt");
    let mut bytes = b"In the beginning God created the heaven and the earth.\n".repeat(20);
    let bad_at = bytes.len() + 8; // the offset of \xef in the line below
    bytes.extend_from_slice(b"Caf\xc3\xa9 na\xefve\n"); // "Café" is fine, "\xef" starts a bad sequence
    bytes.extend_from_slice(&b"And the earth was without form, and void.\n".repeat(20));
    std::fs::write(&corpus, &bytes).unwrap();
    let out_dir = dir.path().join("out");
    let out = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "16", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["latin1.txt", &format!("byte offset {bad_at}"), "--skip-invalid"]);
    assert!(files_in(&out_dir).is_empty());

    let out = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "16", "--skip-invalid", "-o", s(&out_dir)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("skipped    1 documents with invalid UTF-8"), "{stdout}");
    assert!(stdout.contains("40 documents"), "{stdout}");
}

#[test]
fn unparsable_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, "{ this is not json").unwrap();
    let out_dir = dir.path().join("out");
    let out = prepare(&[s(&data("corpus/kjv.txt.gz")), "--tokenizer", s(&tok), "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["tokenizer.json", "not a usable Hugging Face tokenizer.json"]);
    assert!(files_in(&out_dir).is_empty());
}

#[test]
fn missing_jsonl_field_and_csv_column() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let jsonl = dir.path().join("docs.jsonl");
    std::fs::write(&jsonl, "{\"content\": \"In the beginning\"}\n").unwrap();
    let out = prepare(&[s(&jsonl), "--tokenizer", s(&gpt2()), "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["docs.jsonl:1", "no field \"text\"", "content", "--text-field"]);

    let csv = dir.path().join("docs.csv");
    std::fs::write(&csv, "id,body\n1,In the beginning\n").unwrap();
    let out = prepare(&[s(&csv), "--tokenizer", s(&gpt2()), "--text-column", "verse", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["docs.csv", "no column \"verse\"", "id, body", "--text-column"]);
    assert!(files_in(&out_dir).is_empty());

    // The right names work.
    let out = prepare(&[s(&jsonl), "--tokenizer", s(&gpt2()), "--text-field", "content", "--block-size", "2", "-o", s(&out_dir)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn block_size_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = prepare(&[s(&data("corpus/kjv.txt.gz")), "--tokenizer", s(&gpt2()), "--block-size", "0", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["--block-size must be at least 1"]);
    assert!(files_in(&out_dir).is_empty());
}

#[test]
fn incompatible_store_in_output_dir() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "In the beginning God created the heaven and the earth.\n".repeat(50)).unwrap();
    let out_dir = dir.path().join("out");
    let ok = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "32", "-o", s(&out_dir)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let before = std::fs::read(out_dir.join("train.bin")).unwrap();

    let out = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "64", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["train.bin", "block size 32, not 64", "--overwrite"]);
    let bert = data("tokenizers/bert-base-uncased.tokenizer.json");
    let out = prepare(&[s(&corpus), "--tokenizer", s(&bert), "--model-type", "masked", "--block-size", "32", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["train.bin", "different tokenizer", "--overwrite"]);
    assert_eq!(std::fs::read(out_dir.join("train.bin")).unwrap(), before, "the old store is untouched");
    assert_eq!(files_in(&out_dir), ["tokenizer.json", "train.bin"], "no temporary files left");

    // Re-running the same preparation is fine; --overwrite replaces an incompatible one.
    let same = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "32", "-o", s(&out_dir)]);
    assert!(same.status.success());
    let over = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "64", "--overwrite", "-o", s(&out_dir)]);
    assert!(over.status.success(), "{}", String::from_utf8_lossy(&over.stderr));
    assert_eq!(BlockStore::open(&out_dir.join("train.bin")).unwrap().header().block_size, 64);

    // A file that is not a store at all.
    std::fs::write(out_dir.join("train.bin"), b"precious data").unwrap();
    let out = prepare(&[s(&corpus), "--tokenizer", s(&gpt2()), "--block-size", "64", "-o", s(&out_dir)]);
    assert_one_line_error(&out, &["train.bin", "not a readable lmtrain block store"]);
    assert_eq!(std::fs::read(out_dir.join("train.bin")).unwrap(), b"precious data");
}

#[test]
fn trains_a_wordpiece_tokenizer_for_masked_lm() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bert");
    let out = prepare(&[
        s(&data("corpus/kjv.txt.gz")),
        "--model-type",
        "bert",
        "--vocab-size",
        "2000",
        "--max-train-blocks",
        "100",
        "-o",
        s(&out_dir),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = BlockStore::open(&out_dir.join("train.bin")).unwrap();
    assert_eq!(store.len(), 100);
    let h = store.header();
    assert!(h.vocab_size <= 2000 && h.cls.is_some() && h.sep.is_some() && h.mask.is_some());
    let mut first = vec![0u32; 128];
    store.read_block(0, &mut first);
    assert_eq!(Some(first[0]), h.cls, "the first document starts with [CLS]");
    assert!(String::from_utf8_lossy(&out.stdout).contains("trained in"));
}
