//! Hostile corpora and tokenizers for `prepare`: over-long lines and documents, binary
//! files, null texts, broken post-processors, absurd flags, stale temporary files, and
//! `--line-by-line` (padded stores).

use std::io::Write;
use std::path::{Path, PathBuf};

use lmtrain_store::BlockStore;
use lmtrain_text::{MAX_PIECE_BYTES, ModelType, PrepareOptions, TextError, TxtDocuments, check_store_tokenizer, prepare};
use tokenizers::Tokenizer;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data").join(rel)
}

fn gpt2() -> PathBuf {
    data("tokenizers/gpt2.tokenizer.json")
}

fn bert() -> PathBuf {
    data("tokenizers/bert-base-uncased.tokenizer.json")
}

fn opts(inputs: Vec<PathBuf>, out: &Path, tokenizer: PathBuf) -> PrepareOptions {
    let mut o = PrepareOptions::new(inputs, out);
    o.tokenizer = Some(tokenizer);
    o
}

fn blocks(path: &Path) -> (BlockStore, Vec<Vec<u32>>) {
    let store = BlockStore::open(path).unwrap();
    let mut out = vec![0u32; store.block_size()];
    let all = (0..store.len())
        .map(|i| {
            store.read_block(i, &mut out);
            out.clone()
        })
        .collect();
    (store, all)
}

/// Deterministic English-like words.
fn words(n_bytes: usize, seed: u64) -> String {
    const W: [&str; 12] = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "and", "cats", "Émile", "42"];
    let mut s = String::with_capacity(n_bytes + 8);
    let mut x = seed;
    while s.len() < n_bytes {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(W[(x >> 33) as usize % W.len()]);
        s.push(if (x >> 20).is_multiple_of(17) { '\t' } else { ' ' });
    }
    s
}

#[test]
fn an_over_long_line_is_cut_into_pieces_without_changing_causal_ids() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("long.txt");
    let line = words(MAX_PIECE_BYTES * 5 / 2, 1);
    std::fs::write(&corpus, format!("a short first line\n{line}\nlast line\n")).unwrap();
    let mut o = opts(vec![corpus], &dir.path().join("out"), gpt2());
    o.block_size = 64;
    let s = prepare(&o).unwrap();
    assert_eq!((s.train.documents, s.split_documents, s.split_pieces), (3, 1, 3));

    // The ids equal tokenizing each whole line (one end-of-text token per line).
    let tok = Tokenizer::from_file(gpt2()).unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let mut want = Vec::new();
    for d in ["a short first line", line.trim_end(), "last line"] {
        // The reader keeps trailing whitespace of a line; so does this reference.
        let d = if d == line.trim_end() { line.as_str() } else { d };
        want.extend_from_slice(tok.encode(d, false).unwrap().get_ids());
        want.push(eos);
    }
    let (_, got) = blocks(&dir.path().join("out/train.bin"));
    let got: Vec<u32> = got.concat();
    assert_eq!(got.len(), want.len() / 64 * 64);
    assert!(got == want[..got.len()], "pieces must tokenize like the whole line");
}

#[test]
fn over_long_paragraphs_and_jsonl_texts_are_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    // A paragraph of many short lines, longer than one piece.
    let para: Vec<String> = (0..30_000).map(|i| words(60, i)).collect();
    let txt = dir.path().join("p.txt");
    std::fs::write(&txt, format!("first\n\n{}\n\nlast\n", para.join("\n"))).unwrap();
    let mut o = opts(vec![txt], &dir.path().join("out1"), gpt2());
    o.read.txt_documents = TxtDocuments::Paragraphs;
    let s = prepare(&o).unwrap();
    assert_eq!((s.train.documents, s.split_documents), (3, 1));
    assert!(s.split_pieces >= 2);

    let jsonl = dir.path().join("d.jsonl");
    let text = words(MAX_PIECE_BYTES * 2 + 10, 3);
    std::fs::write(&jsonl, format!("{}\n{{\"text\": \"ok\"}}\n", serde_json::json!({ "text": text }))).unwrap();
    let s = prepare(&opts(vec![jsonl], &dir.path().join("out2"), gpt2())).unwrap();
    assert_eq!((s.train.documents, s.split_documents, s.split_pieces), (2, 1, 3));
}

#[test]
fn a_jsonl_line_beyond_the_record_limit_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("huge.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl).unwrap());
    f.write_all(b"{\"text\": \"ok\"}\n{\"text\": \"").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..65 {
        f.write_all(&chunk).unwrap();
    }
    f.write_all(b"\"}\n").unwrap();
    drop(f);
    let err = prepare(&opts(vec![jsonl], &dir.path().join("out"), gpt2())).unwrap_err();
    assert!(err.to_string().contains("huge.jsonl:2: line longer than 67108864 bytes"), "{err}");
}

#[test]
fn binary_files_are_refused_and_gzip_is_recognised_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: [(&str, &[u8], &str); 6] = [
        ("report.docx", b"PK\x03\x04\x14\x00\x06\x00rest of a zip", "is a ZIP archive"),
        ("paper.txt", b"%PDF-1.7\n%binary", "is a PDF document"),
        ("data.jsonl", b"{\"text\": \"a\x00b\"}\n", "NUL byte at offset 11"),
        ("wide.txt", b"\xFF\xFEh\x00i\x00", "is UTF-16 text"),
        ("train.bin", b"LMTBLOCK\x01\x00\x00\x00", "is an lmtrain block store"),
        ("x.csv", b"\xFD7zXZ\x00\x00", "xz, bzip2 or zstd"),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = prepare(&opts(vec![path], &out, gpt2())).unwrap_err();
        assert!(matches!(err, TextError::NotText { .. }) && err.to_string().contains(want), "{name}: {err}");
    }
    // gzip data without a .gz name is read as the text it holds.
    let gz = dir.path().join("plain-name.txt");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(words(5000, 9).as_bytes()).unwrap();
    enc.finish().unwrap();
    let s = prepare(&opts(vec![gz], &out, gpt2())).unwrap();
    assert_eq!(s.train.documents, 1);
    #[cfg(target_os = "linux")]
    {
        let err = prepare(&opts(vec!["/dev/zero".into()], &dir.path().join("out2"), gpt2())).unwrap_err();
        assert!(err.to_string().contains("/dev/zero: is a device, not a corpus file"), "{err}");
    }
}

#[test]
fn null_and_blank_texts_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("n.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": null}\n{\"text\": \"In the beginning God created\"}\n{\"text\": \"  \"}\n\n{\"text\": \"the heaven and the earth\"}\n",
    )
    .unwrap();
    let csv = dir.path().join("c.csv");
    std::fs::write(&csv, "id,text\n1,\n2,And the earth was without form\n3,\" \"\n").unwrap();
    let mut o = opts(vec![jsonl, csv], &dir.path().join("out"), gpt2());
    o.block_size = 4;
    let s = prepare(&o).unwrap();
    assert_eq!((s.train.documents, s.skipped_empty), (3, 4));
}

/// The BERT tokenizer with a TemplateProcessing post-processor built from `special_tokens`.
fn template_tokenizer(dir: &Path, special_tokens: serde_json::Value) -> PathBuf {
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(bert()).unwrap()).unwrap();
    let sp = |id: &str| serde_json::json!({ "SpecialToken": { "id": id, "type_id": 0 } });
    let seq = |id: &str| serde_json::json!({ "Sequence": { "id": id, "type_id": 0 } });
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [sp("[CLS]"), seq("A"), sp("[SEP]")],
        "pair": [sp("[CLS]"), seq("A"), sp("[SEP]"), seq("B"), sp("[SEP]")],
        "special_tokens": special_tokens,
    });
    let path = dir.join(format!("tok-{}.json", std::fs::read_dir(dir).unwrap().count()));
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

#[test]
fn a_template_naming_an_undefined_or_out_of_range_token_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, words(3000, 4)).unwrap();
    let cls = serde_json::json!({ "id": "[CLS]", "ids": [101], "tokens": ["[CLS]"] });
    let cases = [
        (serde_json::json!({ "[CLS]": cls }), "uses the special token \"[SEP]\", which its special_tokens do not define"),
        (
            serde_json::json!({ "[CLS]": cls, "[SEP]": { "id": "[SEP]", "ids": [999999], "tokens": ["[SEP]"] } }),
            "special token \"[SEP]\" has id 999999, outside the vocabulary of 30522 tokens",
        ),
        (serde_json::json!({ "[CLS]": cls, "[SEP]": { "id": "[SEP]", "ids": [102, 103], "tokens": ["[SEP]"] } }), "has 2 ids and 1 tokens"),
    ];
    for (special, want) in cases {
        let tok = template_tokenizer(dir.path(), special);
        let mut o = opts(vec![corpus.clone()], &dir.path().join("out"), tok);
        o.model_type = ModelType::Masked;
        let err = prepare(&o).unwrap_err();
        assert!(matches!(err, TextError::BadTokenizer { .. }) && err.to_string().contains(want), "{err}");
    }
    // A correct template works.
    let ok =
        template_tokenizer(dir.path(), serde_json::json!({ "[CLS]": cls, "[SEP]": { "id": "[SEP]", "ids": [102], "tokens": ["[SEP]"] } }));
    let mut o = opts(vec![corpus], &dir.path().join("out"), ok);
    o.model_type = ModelType::Masked;
    o.block_size = 16;
    prepare(&o).unwrap();
}

#[test]
fn flags_outside_their_range_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let corpus = dir.path().join("never-read.txt");
    std::fs::write(&corpus, "text\n").unwrap();
    let mut o = opts(vec![corpus.clone()], &out, gpt2());
    o.block_size = 1 << 32;
    assert!(prepare(&o).unwrap_err().to_string().contains("--block-size 4294967296 is too large: allowed 1 to 1048576"));
    let mut o = PrepareOptions::new(vec![corpus.clone()], &out);
    o.vocab_size = 1 << 31;
    assert!(prepare(&o).unwrap_err().to_string().contains("--vocab-size 2147483648 is too large to train: allowed 300 to 1048576"));
    let mut o = opts(vec![corpus.clone()], &out, gpt2());
    o.max_train_blocks = Some(0);
    assert!(prepare(&o).unwrap_err().to_string().contains("--max-train-blocks must be at least 1"));
    let err = prepare(&opts(vec![corpus.clone()], &corpus, gpt2())).unwrap_err().to_string();
    assert!(err.contains("never-read.txt: exists and is not a directory"), "{err}");
}

#[test]
fn io_and_csv_errors_print_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "some text\n").unwrap();
    let chain = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s += &format!(": {c}");
            cur = c.source();
        }
        s
    };
    let err = prepare(&opts(vec![corpus], &dir.path().join("out"), dir.path().to_path_buf())).unwrap_err();
    let msg = chain(&err);
    assert_eq!(msg.matches("Is a directory").count(), 1, "{msg}");
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "a,text\n1,2,3\n").unwrap();
    let msg = chain(&prepare(&opts(vec![csv], &dir.path().join("out"), gpt2())).unwrap_err());
    assert_eq!(msg.matches("CSV error").count(), 1, "{msg}");
}

#[test]
fn stale_temp_files_of_a_killed_run_are_removed_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let dead = 99_999_999;
    // Process 1 (init) is always running; this test's own id would be overwritten by the
    // tokenizer.json that prepare itself writes.
    let me = 1;
    let stale = [
        format!(".train.bin.tokens.{dead}-0.tmp"),
        format!(".train.bin.bits.{dead}-1.tmp"),
        format!(".validation.bin.tokens.{dead}-2.tmp"),
        format!(".tokenizer.json.{dead}.tmp"),
    ];
    let keep = [format!(".train.bin.tokens.{me}-0.tmp"), format!(".tokenizer.json.{me}.tmp"), "notes.txt".into()];
    for n in stale.iter().chain(&keep) {
        std::fs::write(out.join(n), b"left over").unwrap();
    }
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, words(4000, 5)).unwrap();
    let s = prepare(&opts(vec![corpus], &out, gpt2())).unwrap();
    let mut removed: Vec<String> = s.removed_temp_files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    removed.sort();
    let mut want = stale.to_vec();
    want.sort();
    assert_eq!(removed, want);
    for n in &stale {
        assert!(!out.join(n).exists(), "{n}");
    }
    for n in &keep {
        assert!(out.join(n).exists(), "{n} belongs to a live process or is not ours");
    }
}

#[test]
fn line_by_line_masked_is_one_truncated_padded_block_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let lines = ["In the beginning God created the heaven and the earth.", "And God said", &words(400, 6), "Amen."];
    let corpus = dir.path().join("l.txt");
    std::fs::write(&corpus, format!("{}\n\n   \n{}\n{}\n{}\n", lines[0], lines[1], lines[2], lines[3])).unwrap();
    let mut o = opts(vec![corpus], &dir.path().join("out"), bert());
    o.model_type = ModelType::Masked;
    o.line_by_line = true;
    o.block_size = 24;
    let s = prepare(&o).unwrap();
    assert_eq!((s.train.documents, s.train.blocks), (4, 4));
    let (store, got) = blocks(&dir.path().join("out/train.bin"));
    assert!(store.is_padded() && store.header().version == 2);
    let mut tok = Tokenizer::from_file(bert()).unwrap();
    tok.with_truncation(Some(tokenizers::TruncationParams { max_length: 24, ..Default::default() })).unwrap();
    let pad = tok.token_to_id("[PAD]").unwrap();
    assert_eq!(store.header().pad, Some(pad));
    let mut padding = 0;
    let mut dropped = 0;
    for (i, line) in lines.iter().enumerate() {
        let want = tok.encode(*line, true).unwrap();
        let ids = want.get_ids();
        assert_eq!(store.block_len(i), ids.len(), "line {i}");
        assert_eq!(&got[i][..ids.len()], ids, "line {i}: HF truncation keeps [CLS] ... [SEP]");
        assert!(got[i][ids.len()..].iter().all(|&t| t == pad));
        padding += 24 - ids.len();
        let mut full = Tokenizer::from_file(bert()).unwrap();
        full.with_truncation(None).unwrap();
        dropped += full.encode(*line, true).unwrap().len() - ids.len();
    }
    assert_eq!(store.block_len(2), 24, "the long line fills its block");
    assert_eq!(s.train.padding_tokens, padding as u64);
    assert!(dropped > 20, "{dropped}");
    assert_eq!(s.train.dropped_tokens, dropped as u64, "tokens cut off by truncation");
}

#[test]
fn line_by_line_causal_pads_with_end_of_text() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("l.txt");
    std::fs::write(&corpus, "one line\nanother somewhat longer line of text here\n").unwrap();
    let mut o = opts(vec![corpus], &dir.path().join("out"), gpt2());
    o.line_by_line = true;
    o.block_size = 8;
    prepare(&o).unwrap();
    let (store, got) = blocks(&dir.path().join("out/train.bin"));
    let tok = Tokenizer::from_file(gpt2()).unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(store.header().pad, Some(eos));
    let first: Vec<u32> = tok.encode("one line", false).unwrap().get_ids().iter().copied().chain([eos]).collect();
    assert_eq!(store.block_len(0), first.len());
    assert_eq!(&got[0][..first.len()], &first[..]);
    assert_eq!(store.block_len(1), 8, "truncated to the block size");
    let mut mask = vec![0u8; 8];
    store.attention_mask(0, &mut mask);
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), first.len());
}

#[test]
fn a_store_and_a_tokenizer_of_another_vocabulary_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, words(4000, 8)).unwrap();
    let out = dir.path().join("out");
    prepare(&opts(vec![corpus], &out, gpt2())).unwrap();
    let store = BlockStore::open(&out.join("train.bin")).unwrap();
    check_store_tokenizer(&store, &out.join("tokenizer.json")).unwrap();
    let err = check_store_tokenizer(&store, &bert()).unwrap_err().to_string();
    assert!(err.contains("header vocabulary (50257 tokens) differs from") && err.contains("(30522 tokens)"), "{err}");
}

#[test]
fn tokenizer_files_the_tokenizers_crate_would_panic_on_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, words(3000, 4)).unwrap();
    let json = String::from_utf8(std::fs::read(gpt2()).unwrap()).unwrap();
    // A raw control character inside the decoder's JSON (found by tests/fuzz_hostile.rs):
    // the tokenizers crate's decoder deserializer panics ("Helper") on it.
    let at = json.find("\"decoder\"").unwrap();
    let quote = at + json[at..].find(": {").unwrap() + 3;
    let broken = format!("{}\"x\u{1}\":1,{}", &json[..quote], &json[quote..]);
    // A Precompiled normalizer whose character map is not base64.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["normalizer"] = serde_json::json!({ "type": "Precompiled", "precompiled_charsmap": "%%% not base64 %%%" });
    for (k, bytes) in [broken.into_bytes(), serde_json::to_vec(&value).unwrap()].into_iter().enumerate() {
        let tok = dir.path().join(format!("t{k}.json"));
        std::fs::write(&tok, bytes).unwrap();
        let err = prepare(&opts(vec![corpus.clone()], &dir.path().join("out"), tok)).unwrap_err();
        assert!(matches!(err, TextError::BadTokenizer { .. }), "{err}");
    }
}
