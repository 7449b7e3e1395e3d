//! Seeded fuzzing of `train prepare` and `train` with hostile inputs: damaged and
//! hand-crafted block stores, corpora (binary, compressed, malformed JSON Lines / CSV,
//! over-long lines), mutated tokenizer.json files, out-of-range flag values, and damaged or
//! edited checkpoints (config.json, trainer_state.json, the weights, the optimizer moments, the
//! tokenizer, checksums.json) given to resume, `--init-from`, `train eval` and `train generate`.
//!
//! Every case runs the built binary as a child process under an address-space limit
//! (`ulimit -v`) and a wall-clock limit, and must end with exit code 0, 1 or 2; when it fails,
//! stderr must hold exactly one line starting with `error:` and no panic text; it must not
//! die from a signal, run past the time limit or exceed the memory limit.
//!
//! `FUZZ_SEED` (default 1) picks the cases and `FUZZ_CASES` (default 1000) how many
//! (with `--n-head`/`--n-embd`/`--n-positions`/`--n-layer` values):
//! `FUZZ_SEED=$RANDOM cargo test --release --test fuzz_hostile -- --nocapture` tries new ones.
//! A failing case prints its seed, index, command line and output; its files are kept
//! under the printed directory.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lmtrain_store::{BlockWriter, HEADER_LEN, SpecialTokens, StoreSpec};
use train_support::tokenizer_json;

/// SplitMix64: a small seeded generator (the root package has no RNG dependency).
struct Rng64(u64);

impl Rng64 {
    fn seed_from_u64(seed: u64) -> Rng64 {
        Rng64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// CRC-32 (IEEE), as the store format uses, bit by bit (the files here are tiny).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Address-space limit of every child, in KiB (the binary maps its worker stacks and the
/// store; a runaway allocation fails against this instead of taking the machine).
const MEMORY_LIMIT_KIB: u64 = 3 << 20;
/// Wall-clock limit of every child.
const TIME_LIMIT: Duration = Duration::from_secs(60);
const VOCAB: usize = 40;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one case ran and how it ended.
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    seconds: f64,
    timed_out: bool,
}

/// Runs `train ARGS` under the limits, in `cwd`.
fn run_train(args: &[String], cwd: &Path) -> Outcome {
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if started.elapsed() > TIME_LIMIT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    use std::os::unix::process::ExitStatusExt;
    Outcome {
        code: status.code(),
        signal: status.signal(),
        stderr: reader.join().unwrap_or_default(),
        seconds: started.elapsed().as_secs_f64(),
        timed_out,
    }
}

/// Why an outcome breaks the contract, if it does.
fn violation(o: &Outcome) -> Option<String> {
    if o.timed_out {
        return Some(format!("ran past {} s", TIME_LIMIT.as_secs()));
    }
    if let Some(sig) = o.signal {
        return Some(format!("killed by signal {sig}"));
    }
    let lower = o.stderr.to_lowercase();
    for bad in ["panicked", "rust_backtrace", "memory allocation of", "stack overflow", "capacity overflow"] {
        if lower.contains(bad) {
            return Some(format!("stderr mentions {bad:?}"));
        }
    }
    match o.code {
        Some(0) => None,
        Some(1 | 2) => {
            let errors = o.stderr.lines().filter(|l| l.starts_with("error:")).count();
            (errors != 1).then(|| format!("{errors} `error:` lines"))
        }
        other => Some(format!("exit code {other:?}")),
    }
}

/// A small valid data directory: word-level tokenizer and stores (`train_support`).
fn base_data(dir: &Path) -> PathBuf {
    train_support::make_data(dir, VOCAB, 8, 6, 2)
}

/// A corpus of tokenizer words (`w0 .. w39`).
fn word_corpus(rng: &mut Rng64, lines: usize) -> String {
    let mut s = String::new();
    for _ in 0..lines {
        let n = 1 + rng.next_u64() % 12;
        let words: Vec<String> = (0..n).map(|_| format!("w{}", rng.next_u64() % VOCAB as u64)).collect();
        s.push_str(&words.join(" "));
        s.push('\n');
    }
    s
}

const HOSTILE_NUMBERS: [&str; 24] = [
    "0",
    "-1",
    "1",
    "2",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "-1e308",
    "1e-320",
    "4294967295",
    "4294967296",
    "2147483648",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775808",
    "",
    " ",
    "abc",
    "0x10",
    "1.5",
    "-0",
    "1e9",
];

fn pick<'a, T>(rng: &mut Rng64, xs: &'a [T]) -> &'a T {
    &xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn hostile_number(rng: &mut Rng64) -> String {
    if rng.next_u64().is_multiple_of(4) {
        // A random magnitude, sometimes negative or fractional.
        let v = rng.next_u64() >> (rng.next_u64() % 64);
        match rng.next_u64() % 3 {
            0 => format!("-{v}"),
            1 => format!("{}.{}", v, rng.next_u64() % 1000),
            _ => v.to_string(),
        }
    } else {
        pick(rng, &HOSTILE_NUMBERS).to_string()
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `train prepare` with one hostile flag value.
fn case_prepare_flag(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    let corpus = dir.join("c.txt");
    std::fs::write(&corpus, word_corpus(rng, 40)).unwrap();
    let flag =
        *pick(rng, &["--block-size", "--vocab-size", "--validation-split", "--max-train-blocks", "--seed", "--text-field", "--eos-token"]);
    let mut args: Vec<String> = vec!["prepare".into(), "--quiet".into(), s(&corpus), "-o".into(), s(&dir.join("out"))];
    // --vocab-size only matters when a tokenizer is trained; otherwise use the tiny one.
    if flag != "--vocab-size" {
        args.extend(["--tokenizer".into(), s(&data.join("tokenizer.json")), "--eos-token".into(), "w0".into()]);
    }
    if flag == "--eos-token" || flag == "--text-field" {
        args.extend([flag.into(), pick(rng, &["", "w999", "<|endoftext|>", "w1", "\u{1}", "text"]).to_string()]);
    } else {
        args.extend([flag.into(), hostile_number(rng)]);
    }
    if rng.next_u64().is_multiple_of(3) {
        args.push("--line-by-line".into());
    }
    if rng.next_u64().is_multiple_of(3) {
        args.extend(["--model-type".into(), "masked".into()]);
    }
    args
}

/// `train prepare` on a hostile corpus file.
fn case_corpus(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    let kind = rng.next_u64() % 12;
    let (name, bytes): (&str, Vec<u8>) = match kind {
        0 => ("random.txt", (0..rng.next_u64() % 5000).map(|_| rng.next_u64() as u8).collect()),
        1 => ("zip.docx", [b"PK\x03\x04".as_slice(), &word_corpus(rng, 5).into_bytes()].concat()),
        2 => ("doc.pdf", b"%PDF-1.4\n".to_vec()),
        3 => {
            // The embedded corpus, gzip'd, cut short (sometimes inside the header).
            let mut gz = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/kjv.txt.gz")).unwrap();
            let cut = (rng.next_u64() % 20_000) as usize;
            gz.truncate(cut.max(1));
            (*pick(rng, &["c.txt.gz", "c.jsonl.gz", "noext"]), gz)
        }
        4 => {
            // JSON Lines with hostile records.
            let recs = [
                "{\"text\": null}",
                "{\"text\": 5}",
                "[1,2]",
                "{\"text\": \"w1 w2\"}",
                "{\"text\": \"\"}",
                "{",
                "null",
                "{\"other\": \"x\"}",
                "{\"text\": \"w3\\u0000w4\"}",
                "{\"text\": {\"a\": 1}}",
                "\"just a string\"",
            ];
            let n = 1 + rng.next_u64() % 8;
            let body: Vec<&str> = (0..n).map(|_| *pick(rng, &recs)).collect();
            ("d.jsonl", (body.join("\n") + "\n").into_bytes())
        }
        5 => {
            let rows = ["text\n", "a,text\n1,w1\n", "\"unterminated\n", "text\nw1,w2,w3\n", "text\n\"w1\"\"w2\"\n", "\n\n", "a,b\n1,2\n"];
            ("d.csv", pick(rng, &rows).as_bytes().to_vec())
        }
        6 => ("d.parquet", (0..rng.next_u64() % 300).map(|_| rng.next_u64() as u8).collect()),
        7 => {
            // One long line of tokenizer words (cut into pieces by the reader).
            let mut line = String::new();
            while line.len() < (1 << 20) + 5000 {
                line.push_str("w7 w8 ");
            }
            ("long.txt", (line + "\n").into_bytes())
        }
        8 => ("nul.txt", [word_corpus(rng, 3).into_bytes(), vec![0u8; 16]].concat()),
        9 => ("empty.txt", Vec::new()),
        10 => ("utf16.txt", b"\xFF\xFEw\x001\x00".to_vec()),
        _ => ("store.txt", std::fs::read(data.join("train.bin")).unwrap()),
    };
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let mut args = vec![
        "prepare".into(),
        "--quiet".into(),
        s(&path),
        "-o".into(),
        s(&dir.join("out")),
        "--tokenizer".into(),
        s(&data.join("tokenizer.json")),
        "--eos-token".into(),
        "w0".into(),
        "--block-size".into(),
        "4".into(),
    ];
    if rng.next_u64().is_multiple_of(4) {
        args.push("--skip-invalid".into());
    }
    if rng.next_u64().is_multiple_of(4) {
        args.push("--paragraphs".into());
    }
    if rng.next_u64().is_multiple_of(5) {
        args.extend(["--format".into(), pick(rng, &["txt", "jsonl", "csv", "parquet"]).to_string()]);
    }
    args
}

/// A random JSON value for tokenizer mutation.
fn hostile_json(rng: &mut Rng64) -> serde_json::Value {
    use serde_json::json;
    match rng.next_u64() % 12 {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(4294967296u64),
        3 => json!("w999"),
        4 => json!([]),
        5 => json!({}),
        6 => {
            json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[X]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}})
        }
        7 => json!({"type": "BertProcessing", "sep": ["w1", 99999], "cls": ["w2", 2]}),
        8 => {
            json!([{"id": 99999, "content": "<x>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}])
        }
        9 => json!({"type": "WordLevel", "vocab": {"w0": 0, "w1": 70000}, "unk_token": "w0"}),
        10 => json!({"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false}),
        _ => json!({"max_length": 0, "stride": 5, "strategy": "LongestFirst", "direction": "Right"}),
    }
}

/// `train prepare` with a mutated tokenizer.json.
fn case_tokenizer(rng: &mut Rng64, dir: &Path, _data: &Path) -> Vec<String> {
    let mut json: serde_json::Value = serde_json::from_str(&tokenizer_json(VOCAB, "a")).unwrap();
    let keys = ["post_processor", "added_tokens", "model", "truncation", "padding", "normalizer", "pre_tokenizer", "decoder"];
    for _ in 0..1 + rng.next_u64() % 2 {
        let key = *pick(rng, &keys);
        json[key] = hostile_json(rng);
    }
    let mut bytes = serde_json::to_vec(&json).unwrap();
    if rng.next_u64().is_multiple_of(5) && !bytes.is_empty() {
        let at = (rng.next_u64() % bytes.len() as u64) as usize;
        bytes[at] = rng.next_u64() as u8; // and a damaged byte
    }
    let tok = dir.join("tok.json");
    std::fs::write(&tok, bytes).unwrap();
    let corpus = dir.join("c.txt");
    std::fs::write(&corpus, word_corpus(rng, 30)).unwrap();
    let mut args = vec!["prepare".into(), "--quiet".into(), s(&corpus), "-o".into(), s(&dir.join("out")), "--tokenizer".into(), s(&tok)];
    args.extend(["--block-size".into(), "4".into()]);
    if rng.next_u64().is_multiple_of(2) {
        args.extend(["--model-type".into(), "masked".into()]);
    } else {
        args.extend(["--eos-token".into(), "w0".into()]);
    }
    if rng.next_u64().is_multiple_of(3) {
        args.push("--line-by-line".into());
    }
    args
}

fn put(b: &mut [u8], at: usize, v: u64, width: usize) {
    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

/// A block store damaged at random, or with a hostile header resealed so only its values are
/// judged; then `train` (one step of a tiny model) reads it.
fn case_store(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(data.join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
    let source = if rng.next_u64().is_multiple_of(4) { data.join("../padded.bin") } else { data.join("train.bin") };
    let mut b = std::fs::read(source).unwrap();
    match rng.next_u64() % 5 {
        0 => {
            let at = (rng.next_u64() % b.len() as u64) as usize;
            b[at] ^= 1 << (rng.next_u64() % 8);
        }
        1 => b.truncate((rng.next_u64() % b.len() as u64) as usize),
        2 => b.extend((0..1 + rng.next_u64() % 64).map(|_| rng.next_u64() as u8)),
        _ => {
            // A header field set to a hostile value, header checksum recomputed (and the
            // payload one too, half of the time, after a payload token is changed).
            let fields: [(usize, usize); 8] = [(16, 4), (20, 4), (24, 8), (32, 8), (40, 4), (44, 4), (56, 4), (8, 4)];
            let (at, width) = *pick(rng, &fields);
            let v = match rng.next_u64() % 6 {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << 31,
                3 => 1 << 56,
                4 => rng.next_u64() % 100,
                _ => rng.next_u64(),
            };
            put(&mut b, at, v, width);
            if rng.next_u64().is_multiple_of(2) && b.len() > HEADER_LEN + 2 {
                put(&mut b, HEADER_LEN, rng.next_u64() % 70_000, 2);
                let crc = crc32(&b[HEADER_LEN..]);
                put(&mut b, 84, crc as u64, 4);
            }
            let crc = crc32(&b[..124]);
            put(&mut b, 124, crc as u64, 4);
        }
    }
    std::fs::write(d.join("train.bin"), &b).unwrap();
    let mut args: Vec<String> = vec!["--data".into(), s(&d), "--output-dir".into(), s(&dir.join("run"))];
    args.extend(
        ["--max-steps", "1", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--save-strategy", "no", "--no-progress"]
            .map(String::from),
    );
    args
}

/// A JSON value for an edited checkpoint field.
fn hostile_field(rng: &mut Rng64) -> serde_json::Value {
    use serde_json::json;
    match rng.next_u64() % 12 {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1u64 << 31),
        3 => json!(1u64 << 32),
        4 => json!(1u64 << 40),
        5 => json!(u64::MAX),
        6 => json!(1e308),
        7 => json!(null),
        8 => json!("gpt2"),
        9 => json!([]),
        10 => json!(1.5),
        _ => json!(rng.next_u64() % 100),
    }
}

/// Arguments of the run that wrote the base checkpoint (`--max-steps 2`, one per checkpoint);
/// a resume must give the same.
const CHECKPOINT_RUN: [&str; 13] =
    ["--max-steps", "2", "--save-steps", "1", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--seed", "3", "--no-progress"];

/// A copy of the base run's checkpoint-1 with one file damaged or edited (and half of the time
/// without its checksums.json, so the damage reaches the parsers), then resumed, evaluated,
/// generated from or used by `--init-from`.
fn case_checkpoint(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    let out = dir.join("ck");
    let ck = out.join("checkpoint-1");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(data.join("../ckrun/checkpoint-1")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    let edit_json = |rng: &mut Rng64, file: &str, keys: &[&str]| {
        let path = ck.join(file);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for _ in 0..1 + rng.next_u64() % 2 {
            let key = *pick(rng, keys);
            v[key] = hostile_field(rng);
        }
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    let what = rng.next_u64() % 5;
    match what {
        0 => edit_json(
            rng,
            "config.json",
            &[
                "n_embd",
                "n_layer",
                "n_head",
                "n_positions",
                "vocab_size",
                "n_inner",
                "layer_norm_epsilon",
                "eos_token_id",
                "model_type",
                "activation_function",
            ],
        ),
        1 => edit_json(
            rng,
            "trainer_state.json",
            &["global_step", "epoch", "step_in_epoch", "max_steps", "tokens_seen", "seed", "best_metric", "args"],
        ),
        2 => {
            let path = ck.join(*pick(rng, &["model.safetensors", "optimizer.safetensors"]));
            let mut b = std::fs::read(&path).unwrap();
            match rng.next_u64() % 4 {
                0 => {
                    let at = (rng.next_u64() % b.len() as u64) as usize;
                    b[at] ^= 1 << (rng.next_u64() % 8);
                }
                1 => b.truncate((rng.next_u64() % b.len() as u64) as usize),
                2 => b.extend((0..1 + rng.next_u64() % 64).map(|_| rng.next_u64() as u8)),
                _ => put(&mut b, 0, *pick(rng, &[0, 1, 7, 1 << 31, 1 << 40, u64::MAX]), 8), // the header length
            }
            std::fs::write(&path, b).unwrap();
        }
        3 => {
            let path = ck.join("tokenizer.json");
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            v[*pick(rng, &["model", "added_tokens", "post_processor", "normalizer"])] = hostile_json(rng);
            std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        }
        _ => {
            let path = ck.join("checksums.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let edited = match rng.next_u64() % 3 {
                0 => text.replace("crc32\"", "sha1\""),
                1 => text.replacen("\"bytes\": ", "\"bytes\": 1", 1),
                _ => text[..(rng.next_u64() % text.len() as u64) as usize].to_string(),
            };
            std::fs::write(&path, edited).unwrap();
        }
    }
    if what != 4 && rng.next_u64().is_multiple_of(2) {
        std::fs::remove_file(ck.join("checksums.json")).unwrap();
    }
    let (d, c) = (s(data), s(&ck));
    let mut args: Vec<String> = match rng.next_u64() % 4 {
        0 => vec!["--data".into(), d, "--output-dir".into(), s(&out), "--resume-from-checkpoint".into(), c],
        1 => vec!["eval".into(), "--checkpoint".into(), c, "--data".into(), d],
        2 => vec!["generate".into(), "--checkpoint".into(), c, "--prompt".into(), "w1 w2".into(), "--max-new-tokens".into(), "3".into()],
        _ => vec![
            "--data".into(),
            d,
            "--output-dir".into(),
            s(&dir.join("run")),
            "--init-from".into(),
            c,
            "--max-steps".into(),
            "1".into(),
            "--no-progress".into(),
        ],
    };
    if args[0] == "--data" && args[4] == "--resume-from-checkpoint" {
        args.extend(CHECKPOINT_RUN.map(String::from));
    }
    args
}

/// Model-shape flags (a third of the train-flag cases).
const MODEL_FLAGS: [&str; 4] = ["--n-head", "--n-embd", "--n-positions", "--n-layer"];

/// `train` with one hostile numeric flag on a valid store.
fn case_train_flag(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    if rng.next_u64().is_multiple_of(3) {
        let flag = *pick(rng, &MODEL_FLAGS);
        let mut args: Vec<String> = vec!["--data".into(), s(data), "--output-dir".into(), s(&dir.join("run"))];
        let mut shape = vec![("--n-layer", "1"), ("--n-head", "1"), ("--n-embd", "8")];
        shape.retain(|(f, _)| *f != flag);
        for (f, v) in shape {
            args.extend([f.to_string(), v.to_string()]);
        }
        args.extend(["--max-steps", "1", "--save-strategy", "no", "--no-progress"].map(String::from));
        args.extend([flag.to_string(), hostile_number(rng)]);
        return args;
    }
    let flag = *pick(
        rng,
        &[
            "--learning-rate",
            "--adam-epsilon",
            "--weight-decay",
            "--max-grad-norm",
            "--num-train-epochs",
            "--warmup-steps",
            "--warmup-ratio",
            "--adam-beta1",
            "--per-device-train-batch-size",
            "--gradient-accumulation-steps",
        ],
    );
    let mut value = hostile_number(rng);
    // Values that are valid and large would train for real: these flags stay small then.
    let big_and_valid = |v: &str| v.parse::<f64>().is_ok_and(|x| x.is_finite() && x >= 3.0);
    if matches!(flag, "--per-device-train-batch-size" | "--gradient-accumulation-steps") && big_and_valid(&value) {
        value = "0".into();
    }
    let mut args: Vec<String> = vec!["--data".into(), s(data), "--output-dir".into(), s(&dir.join("run"))];
    args.extend(
        ["--max-steps", "1", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--save-strategy", "no", "--no-progress"]
            .map(String::from),
    );
    args.extend([flag.to_string(), value]);
    args
}

/// The masked-LM paths: `fill-mask` with hostile prompts and `--top-k`, `train eval` and
/// training with hostile masking flags (every family), and the objectives crossed (a causal
/// model on the masked store, fill-mask on the causal checkpoint). `../mlmdata` is a WordPiece
/// store of the word corpus and `../mlmrun` a BERT trained on it for one step.
fn case_masked(rng: &mut Rng64, dir: &Path, data: &Path) -> Vec<String> {
    let (mdata, mrun) = (data.join("../mlmdata"), data.join("../mlmrun"));
    let out = s(&dir.join("run"));
    match rng.next_u64() % 4 {
        0 => {
            let prompt = match rng.next_u64() % 5 {
                0 => String::new(),
                1 => "[MASK] ".repeat((rng.next_u64() % 100) as usize),
                2 => {
                    let lines = 1 + (rng.next_u64() % 300) as usize;
                    word_corpus(rng, lines).replace('\n', " [MASK] ")
                }
                3 => "[CLS] [SEP] [PAD] [UNK] \u{7}\t\u{202e}".to_string(),
                _ => format!(
                    "w1 w2 [MASK] {}",
                    (0..(rng.next_u64() % 50))
                        .map(|_| char::from_u32(1 + rng.next_u64() as u32 % 0x10_FFFF).unwrap_or('?'))
                        .collect::<String>()
                ),
            };
            let mut args = vec!["fill-mask".to_string(), "--checkpoint".into(), s(&mrun), prompt];
            if rng.next_u64().is_multiple_of(2) {
                args.extend(["--top-k".to_string(), hostile_number(rng)]);
            }
            if rng.next_u64().is_multiple_of(2) {
                args.push("--json".into());
            }
            args
        }
        1 => {
            let flag = *pick(
                rng,
                &["--mlm-probability", "--mask-replace-prob", "--random-replace-prob", "--seed", "--per-device-eval-batch-size"],
            );
            vec!["eval".into(), "--checkpoint".into(), s(&mrun), "--data".into(), s(&mdata), flag.into(), hostile_number(rng)]
        }
        2 => {
            let family = *pick(rng, &["bert", "roberta", "distilbert", "deberta-v2"]);
            let mut args: Vec<String> = vec!["--data".into(), s(&mdata), "--output-dir".into(), out, "--model-type".into(), family.into()];
            args.extend(
                ["--max-steps", "1", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--save-strategy", "no", "--no-progress"]
                    .map(String::from),
            );
            let flag =
                *pick(rng, &["--mlm-probability", "--mask-replace-prob", "--random-replace-prob", "--whole-word-masking", "--objective"]);
            let value = match flag {
                "--whole-word-masking" => pick(rng, &["true", "false", "maybe"]).to_string(),
                "--objective" => pick(rng, &["mlm", "causal", "clm", ""]).to_string(),
                _ => hostile_number(rng),
            };
            args.extend([flag.to_string(), value]);
            args
        }
        _ => match rng.next_u64() % 3 {
            0 => vec![
                "--data".into(),
                s(&mdata),
                "--output-dir".into(),
                out,
                "--model-type".into(),
                "gpt2".into(),
                "--max-steps".into(),
                "1".into(),
            ],
            1 => vec!["fill-mask".into(), "--checkpoint".into(), s(&data.join("../ckrun")), "w1 [MASK]".into()],
            _ => vec![
                "--data".into(),
                s(data),
                "--output-dir".into(),
                out,
                "--model-type".into(),
                "bert".into(),
                "--max-steps".into(),
                "1".into(),
            ],
        },
    }
}

#[test]
fn hostile_inputs_give_one_clean_error_line_and_never_crash() {
    let seed = env_u64("FUZZ_SEED", 1);
    let cases = env_u64("FUZZ_CASES", 1000) as usize;
    let root = tempfile::Builder::new().prefix("lmtrain-fuzz-").tempdir().unwrap();
    let data = base_data(&root.path().join("base"));
    // A valid padded store too, so that `case_store` sees version 2 files as well.
    {
        let spec = StoreSpec {
            block_size: 8,
            vocab_size: VOCAB as u32,
            tokenizer_fingerprint: 0,
            special: SpecialTokens { eos: Some(0), pad: Some(0), ..Default::default() },
            word_starts: false,
            layout: Default::default(),
        };
        let mut w = BlockWriter::create_padded(&root.path().join("padded.bin"), spec).unwrap();
        w.push_padded_block(&[1, 2, 3], None).unwrap();
        w.finish().unwrap().persist().unwrap();
    }
    // The checkpoints `case_checkpoint` damages.
    let mut ckrun = vec!["--data".to_string(), s(&data), "--output-dir".into(), s(&root.path().join("ckrun"))];
    ckrun.extend(CHECKPOINT_RUN.map(String::from));
    let o = run_train(&ckrun, root.path());
    assert_eq!(o.code, Some(0), "the base checkpoint run failed: {}", o.stderr);
    // The masked store and model `case_masked` uses.
    let corpus = root.path().join("words.txt");
    std::fs::write(&corpus, word_corpus(&mut Rng64::seed_from_u64(5), 400)).unwrap();
    let mdata = s(&root.path().join("mlmdata"));
    let prep = [
        "prepare",
        &s(&corpus),
        "--model-type",
        "masked",
        "--vocab-size",
        "300",
        "--block-size",
        "16",
        "--validation-split",
        "0.1",
        "-o",
        &mdata,
    ];
    let o = run_train(&prep.map(String::from), root.path());
    assert_eq!(o.code, Some(0), "preparing the masked store failed: {}", o.stderr);
    let mrun = [
        "--data",
        &mdata,
        "--output-dir",
        &s(&root.path().join("mlmrun")),
        "--model-type",
        "bert",
        "--n-layer",
        "1",
        "--n-head",
        "1",
        "--n-embd",
        "8",
        "--max-steps",
        "1",
        "--no-progress",
    ];
    let o = run_train(&mrun.map(String::from), root.path());
    assert_eq!(o.code, Some(0), "the masked-LM base run failed: {}", o.stderr);
    type Gen = fn(&mut Rng64, &Path, &Path) -> Vec<String>;
    let gens: [(&str, Gen, u64); 7] = [
        ("prepare-flag", case_prepare_flag, 25),
        ("corpus", case_corpus, 25),
        ("tokenizer", case_tokenizer, 20),
        ("store", case_store, 20),
        ("train-flag", case_train_flag, 10),
        ("checkpoint", case_checkpoint, 20),
        ("masked", case_masked, 10),
    ];
    let total_weight: u64 = gens.iter().map(|g| g.2).sum();
    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let tally: Mutex<std::collections::BTreeMap<(&str, &str), usize>> = Mutex::default();
    let slowest = Mutex::new((0.0f64, String::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cases {
                        break;
                    }
                    let mut rng = Rng64::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let mut w = rng.next_u64() % total_weight;
                    let &(name, generate, _) = gens
                        .iter()
                        .find(|g| {
                            let hit = w < g.2;
                            w = w.saturating_sub(g.2);
                            hit
                        })
                        .expect("weights cover the range");
                    let dir = root.path().join(format!("case-{i}"));
                    std::fs::create_dir_all(&dir).unwrap();
                    let args = generate(&mut rng, &dir, &data);
                    let o = run_train(&args, &dir);
                    let kind = match (o.code, violation(&o)) {
                        (_, Some(_)) => "VIOLATION",
                        (Some(0), None) => "ok",
                        _ => "clean error",
                    };
                    *tally.lock().unwrap().entry((name, kind)).or_default() += 1;
                    {
                        let mut sl = slowest.lock().unwrap();
                        if o.seconds > sl.0 {
                            *sl = (o.seconds, format!("{name} {args:?}"));
                        }
                    }
                    if let Some(why) = violation(&o) {
                        let keep = dir.with_extension("kept");
                        let _ = std::fs::rename(&dir, &keep);
                        failures.lock().unwrap().push(format!(
                            "seed {seed} case {i} ({name}): {why}\n  train {}\n  files: {}\n  stderr: {}",
                            args.join(" "),
                            keep.display(),
                            o.stderr.trim_end()
                        ));
                    } else {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            });
        }
    });
    let tally = tally.into_inner().unwrap();
    println!("fuzz seed {seed}: {cases} cases in {:.0} s", started.elapsed().as_secs_f64());
    for ((name, kind), n) in &tally {
        println!("  {name:<13} {kind:<12} {n}");
    }
    let (secs, what) = slowest.into_inner().unwrap();
    println!("  slowest case {secs:.1} s: {what}");
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        // Keep the files of the failing cases for inspection.
        let kept = root.keep();
        panic!("{} of {cases} cases broke the contract (files under {}):\n{}", failures.len(), kept.display(), failures.join("\n"));
    }
}
