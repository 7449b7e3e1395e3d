//! `train prepare` through the binary: a run killed with SIGKILL leaves temporary files that
//! the next run removes (only those), out-of-range flags give one line, and the summary
//! reports what was skipped, split, padded and removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn prepare(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).arg("prepare").arg("--quiet").args(args).output().unwrap()
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.retain(|n| n.starts_with('.') && n.ends_with(".tmp"));
    v.sort();
    v
}

#[test]
fn a_killed_prepare_leaves_temp_files_that_the_next_run_removes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let kjv = s(&data("corpus/kjv.txt.gz"));
    // Several copies of the corpus: long enough to be caught mid-run. The tokenizer is
    // trained, so the run spends a while before and while writing the store.
    let mut args: Vec<String> = vec![kjv.clone(), kjv.clone(), kjv.clone(), kjv];
    args.extend(["--vocab-size", "2000", "--output-dir"].map(String::from));
    args.push(s(&out));
    let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("prepare")
        .arg("--quiet")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(120) {
        seen = temp_files(&out);
        if seen.iter().any(|n| n.starts_with(".train.bin.tokens.")) {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let left = temp_files(&out);
    assert!(
        left.iter().any(|n| n.starts_with(".train.bin.tokens.")),
        "the kill must leave the store's temporary files (saw {seen:?}, left {left:?})"
    );
    // A file of the same shape owned by a running process (pid 1) must survive.
    std::fs::write(out.join(".train.bin.bits.1-0.tmp"), b"live").unwrap();

    let rerun = prepare(&args);
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    let stdout = String::from_utf8_lossy(&rerun.stdout);
    assert!(stdout.contains(&format!("removed    {} stale temporary files", left.len())), "{stdout}");
    assert_eq!(temp_files(&out), [".train.bin.bits.1-0.tmp"], "only the dead run's files were removed");
}

#[test]
fn out_of_range_prepare_flags_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "In the beginning\n").unwrap();
    let tok = s(&data("tokenizers/gpt2.tokenizer.json"));
    let out = s(&dir.path().join("out"));
    for (flag, value, want) in [
        ("--block-size", "4294967296", "--block-size 4294967296 is too large: allowed 1 to 1048576 tokens"),
        ("--vocab-size", "2147483648", "--vocab-size 2147483648 is too large to train: allowed 300 to 1048576"),
        ("--max-train-blocks", "0", "--max-train-blocks must be at least 1"),
        ("--validation-split", "NaN", "--validation-split must be in [0, 1), got NaN"),
    ] {
        let mut args = vec![s(&corpus), "-o".into(), out.clone(), flag.into(), value.into()];
        if flag != "--vocab-size" {
            args.extend(["--tokenizer".into(), tok.clone()]);
        }
        let o = prepare(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(want), "{stderr}");
    }
    assert!(!dir.path().join("out").join("train.bin").exists());
}

#[test]
fn the_summary_reports_skipped_split_and_padded_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("d.jsonl");
    let long = "word ".repeat(300_000); // 1.5 MB: two pieces
    std::fs::write(&jsonl, format!("{{\"text\": null}}\n{{\"text\": \"In the beginning\"}}\n{}\n", serde_json::json!({ "text": long })))
        .unwrap();
    let tok = s(&data("tokenizers/gpt2.tokenizer.json"));
    let o = prepare(&[s(&jsonl), "-o".into(), s(&dir.path().join("a")), "--tokenizer".into(), tok.clone()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("skipped    1 records whose text is null or blank"), "{stdout}");
    assert!(stdout.contains("split      1 documents longer than 1048576 bytes into 2 pieces"), "{stdout}");

    let txt = dir.path().join("l.txt");
    std::fs::write(&txt, "one\ntwo words\n").unwrap();
    let o = prepare(&[
        s(&txt),
        "-o".into(),
        s(&dir.path().join("b")),
        "--tokenizer".into(),
        tok,
        "--line-by-line".into(),
        "--block-size".into(),
        "8".into(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // "one<eos>" and "two words<eos>": 2 + 3 tokens in two blocks of 8.
    assert!(stdout.contains("2 blocks (0 tokens dropped, 11 padding)"), "{stdout}");
}
