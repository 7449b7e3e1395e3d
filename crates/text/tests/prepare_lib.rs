//! `prepare` as a library: output matches a straightforward re-computation, every input
//! format gives the same blocks, the split is deterministic, bad input is refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lmtrain_store::BlockStore;
use lmtrain_text::{ModelType, PrepareOptions, TextError, TxtDocuments, is_validation_doc, prepare, tokenizer_fingerprint};
use tokenizers::Tokenizer;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data").join(rel)
}

fn gpt2() -> PathBuf {
    data("tokenizers/gpt2.tokenizer.json")
}

/// The first `n` verses of the embedded King James Bible.
fn kjv_lines(n: usize) -> Vec<String> {
    let gz = std::fs::read(data("corpus/kjv.txt.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    text.lines().take(n).map(str::to_owned).collect()
}

fn write_txt(path: &Path, docs: &[String]) {
    std::fs::write(path, docs.join("\n") + "\n").unwrap();
}

fn all_blocks(path: &Path) -> Vec<Vec<u32>> {
    let store = BlockStore::open(path).unwrap();
    store.verify().unwrap();
    let mut out = vec![0u32; store.block_size()];
    (0..store.len())
        .map(|i| {
            store.read_block(i, &mut out);
            out.clone()
        })
        .collect()
}

#[test]
fn causal_blocks_equal_naive_tokenize_concat_cut() {
    let dir = tempfile::tempdir().unwrap();
    let docs = kjv_lines(300);
    let corpus = dir.path().join("kjv.txt");
    write_txt(&corpus, &docs);
    let mut opts = PrepareOptions::new(vec![corpus], dir.path().join("out"));
    opts.tokenizer = Some(gpt2());
    opts.block_size = 50;
    opts.chunk_bytes = 1000; // many chunks: block boundaries must not depend on chunking
    let summary = prepare(&opts).unwrap();

    let tok = Tokenizer::from_file(gpt2()).unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let mut stream = Vec::new();
    let mut stream_starts = Vec::new();
    for d in &docs {
        let enc = tok.encode(d.as_str(), false).unwrap();
        stream.extend_from_slice(enc.get_ids());
        // A token starts a word when its word id differs from the previous token's.
        let words = enc.get_word_ids();
        stream_starts.extend((0..words.len()).map(|k| k == 0 || words[k] != words[k - 1]));
        stream.push(eos);
        stream_starts.push(true);
    }
    let want: Vec<Vec<u32>> = stream.chunks_exact(50).map(<[u32]>::to_vec).collect();
    let got = all_blocks(&dir.path().join("out/train.bin"));
    assert_eq!(got, want);
    assert_eq!(summary.train.documents, 300);
    assert_eq!(summary.train.tokens, stream.len() as u64);
    assert_eq!(summary.train.blocks, want.len() as u64);
    assert_eq!(summary.train.dropped_tokens, (stream.len() % 50) as u64);
    assert!(summary.validation.is_none());
    assert!(!dir.path().join("out/validation.bin").exists());

    let store = BlockStore::open(&dir.path().join("out/train.bin")).unwrap();
    let h = store.header();
    assert_eq!((h.vocab_size, h.eos, h.block_size), (50257, Some(eos), 50));
    let saved = std::fs::read(dir.path().join("out/tokenizer.json")).unwrap();
    assert_eq!(saved, std::fs::read(gpt2()).unwrap(), "a given tokenizer is copied verbatim");
    assert_eq!(h.tokenizer_fingerprint, tokenizer_fingerprint(&saved));
    // Word-start flags equal the tokenizer's word boundaries, token for token.
    let mut starts = vec![false; 50];
    let mut got_starts = Vec::new();
    for b in 0..store.len() {
        store.word_starts(b, &mut starts);
        got_starts.extend_from_slice(&starts);
    }
    assert_eq!(got_starts, stream_starts[..got_starts.len()]);
    assert!(got_starts.iter().any(|&s| !s), "some tokens continue a word");
}

#[test]
fn masked_documents_are_wrapped_in_cls_sep() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("kjv.txt");
    let docs = kjv_lines(100);
    write_txt(&corpus, &docs);
    let mut opts = PrepareOptions::new(vec![corpus], dir.path().join("out"));
    opts.tokenizer = Some(data("tokenizers/bert-base-uncased.tokenizer.json"));
    opts.model_type = ModelType::Masked;
    opts.block_size = 64;
    prepare(&opts).unwrap();
    let tok = Tokenizer::from_file(data("tokenizers/bert-base-uncased.tokenizer.json")).unwrap();
    let (cls, sep) = (tok.token_to_id("[CLS]").unwrap(), tok.token_to_id("[SEP]").unwrap());
    let blocks = all_blocks(&dir.path().join("out/train.bin"));
    let flat: Vec<u32> = blocks.concat();
    assert_eq!(flat[0], cls);
    let n_cls = flat.iter().filter(|&&t| t == cls).count();
    let n_sep = flat.iter().filter(|&&t| t == sep).count();
    assert!(n_cls >= 90 && n_cls.abs_diff(n_sep) <= 1, "one [CLS] and one [SEP] per document: {n_cls} {n_sep}");
    let store = BlockStore::open(&dir.path().join("out/train.bin")).unwrap();
    assert_eq!((store.header().cls, store.header().sep), (Some(cls), Some(sep)));
    // "##" continuation pieces never start a word; everything else in BERT does.
    let mut starts = vec![false; 64];
    let mut ids = vec![0u32; 64];
    for b in 0..store.len() {
        store.read_block(b, &mut ids);
        store.word_starts(b, &mut starts);
        for (id, s) in ids.iter().zip(&starts) {
            let piece = tok.id_to_token(*id).unwrap();
            assert_eq!(*s, !piece.starts_with("##"), "token {piece}");
        }
    }
}

/// Writes the same documents in every supported format.
fn write_all_formats(dir: &Path, docs: &[String]) -> Vec<PathBuf> {
    let txt = dir.join("c.txt");
    write_txt(&txt, docs);
    let jsonl = dir.join("c.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for (i, d) in docs.iter().enumerate() {
        writeln!(f, "{}", serde_json::json!({"id": i, "text": d})).unwrap();
    }
    let csv = dir.join("c.csv");
    let mut w = csv::Writer::from_path(&csv).unwrap();
    w.write_record(["id", "text"]).unwrap();
    for (i, d) in docs.iter().enumerate() {
        w.write_record([i.to_string().as_str(), d.as_str()]).unwrap();
    }
    w.flush().unwrap();
    let gz = dir.join("c.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&csv).unwrap()).unwrap();
    enc.finish().unwrap();
    let parquet = dir.join("c.parquet");
    write_parquet(&parquet, docs);
    vec![txt, jsonl, csv, gz, parquet]
}

/// A Parquet file with an int column, the text column (nullable, snappy) and a null row.
fn write_parquet(path: &Path, docs: &[String]) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message doc { REQUIRED INT64 id; OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY title (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).set_max_row_group_row_count(Some(64)).build(),
    );
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    // Two row groups, and a null between documents (skipped, like a blank line).
    let halves = [&docs[..docs.len() / 2], &docs[docs.len() / 2..]];
    for (g, part) in halves.iter().enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let n = part.len() + usize::from(g == 0);
        let ids: Vec<i64> = (0..n as i64).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
        col.close().unwrap();
        let values: Vec<ByteArray> = part.iter().map(|d| ByteArray::from(d.as_str())).collect();
        let mut defs = vec![1i16; part.len()];
        if g == 0 {
            defs.insert(1, 0);
        }
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
        col.close().unwrap();
        let titles: Vec<ByteArray> = (0..n).map(|_| ByteArray::from("t")).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&titles, None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn every_format_gives_the_same_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = kjv_lines(200);
    docs[3] = "a \"quoted\", comma-separated\tverse".into();
    let files = write_all_formats(dir.path(), &docs);
    let mut reference = None;
    for (k, file) in files.iter().enumerate() {
        let out = dir.path().join(format!("out{k}"));
        let mut opts = PrepareOptions::new(vec![file.clone()], &out);
        opts.tokenizer = Some(gpt2());
        opts.block_size = 32;
        let s = prepare(&opts).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(s.train.documents, 200, "{}", file.display());
        let blocks = all_blocks(&out.join("train.bin"));
        match &reference {
            None => reference = Some(blocks),
            Some(r) => assert!(r == &blocks, "{} differs from the .txt result", file.display()),
        }
    }
    // An unknown extension is read as plain text unless --format says otherwise.
    let data_file = dir.path().join("c.data");
    std::fs::copy(dir.path().join("c.jsonl"), &data_file).unwrap();
    let mut opts = PrepareOptions::new(vec![data_file], dir.path().join("forced"));
    opts.tokenizer = Some(gpt2());
    opts.block_size = 32;
    opts.read.format = Some(lmtrain_text::CorpusFormat::Jsonl);
    prepare(&opts).unwrap();
    assert!(reference.as_ref() == Some(&all_blocks(&dir.path().join("forced/train.bin"))));

    // A directory holding the corpus twice (.txt and .csv.gz) reads both, in name order,
    // and skips files of unknown extension.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    write_txt(&sub.join("a.txt"), &docs);
    std::fs::copy(dir.path().join("c.csv.gz"), sub.join("b.csv.gz")).unwrap();
    std::fs::write(sub.join("notes.md"), "ignored: unknown extension inside a directory").unwrap();
    let mut opts = PrepareOptions::new(vec![sub], dir.path().join("outdir"));
    opts.tokenizer = Some(gpt2());
    opts.block_size = 32;
    assert_eq!(prepare(&opts).unwrap().train.documents, 400);
}

#[test]
fn paragraph_mode_joins_lines() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("p.txt");
    std::fs::write(&corpus, "one a\none b\n\n\n two\n  \nthree\r\n").unwrap();
    let mut opts = PrepareOptions::new(vec![corpus.clone()], dir.path().join("o1"));
    opts.tokenizer = Some(gpt2());
    opts.block_size = 2;
    assert_eq!(prepare(&opts).unwrap().train.documents, 4);
    opts.read.txt_documents = TxtDocuments::Paragraphs;
    opts.output_dir = dir.path().join("o2");
    let s = prepare(&opts).unwrap();
    assert_eq!(s.train.documents, 3);
    let tok = Tokenizer::from_file(gpt2()).unwrap();
    let want: usize = ["one a\none b", " two", "three"].iter().map(|d| tok.encode(*d, false).unwrap().len() + 1).sum();
    assert_eq!(s.train.tokens, want as u64);
}

#[test]
fn split_is_deterministic_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("kjv.txt");
    write_txt(&corpus, &kjv_lines(2000));
    let run = |seed: u64, name: &str| {
        let mut opts = PrepareOptions::new(vec![corpus.clone()], dir.path().join(name));
        opts.tokenizer = Some(gpt2());
        opts.block_size = 64;
        opts.validation_split = 0.1;
        opts.seed = seed;
        let s = prepare(&opts).unwrap();
        let v = s.validation.clone().unwrap();
        assert_eq!(s.train.documents + v.documents, 2000);
        assert!((150..250).contains(&v.documents), "about 10% held out: {}", v.documents);
        (
            std::fs::read(dir.path().join(name).join("train.bin")).unwrap(),
            std::fs::read(dir.path().join(name).join("validation.bin")).unwrap(),
        )
    };
    let a = run(1, "a");
    let b = run(1, "b");
    let c = run(2, "c");
    assert!(a == b, "same seed, same bytes");
    assert!(a.1 != c.1, "another seed holds out other documents");
    // The split function itself.
    let held: Vec<u64> = (0..1000).filter(|&i| is_validation_doc(7, i, 0.05)).collect();
    assert_eq!(held, (0..1000).filter(|&i| is_validation_doc(7, i, 0.05)).collect::<Vec<_>>());
    assert!((25..80).contains(&held.len()));
    assert!(!(0..1000).any(|i| is_validation_doc(7, i, 0.0)));
}

#[test]
fn validation_file_and_max_train_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let lines = kjv_lines(600);
    let (train, valid) = (dir.path().join("train.txt"), dir.path().join("valid.txt"));
    write_txt(&train, &lines[..500]);
    write_txt(&valid, &lines[500..]);
    let mut opts = PrepareOptions::new(vec![train], dir.path().join("out"));
    opts.tokenizer = Some(gpt2());
    opts.block_size = 16;
    opts.validation_files = vec![valid];
    opts.max_train_blocks = Some(10);
    let s = prepare(&opts).unwrap();
    assert_eq!(s.train.blocks, 10);
    assert_eq!(s.validation.as_ref().unwrap().documents, 100);
    assert_eq!(BlockStore::open(&dir.path().join("out/train.bin")).unwrap().len(), 10);
    let full = all_blocks(&dir.path().join("out/validation.bin"));
    assert_eq!(full.len() as u64, s.validation.unwrap().blocks);
}

#[test]
fn trains_a_tokenizer_when_none_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("kjv.txt");
    write_txt(&corpus, &kjv_lines(1000));
    for (model_type, name) in [(ModelType::Causal, "causal"), (ModelType::Masked, "masked")] {
        let out = dir.path().join(name);
        let mut opts = PrepareOptions::new(vec![corpus.clone()], &out);
        opts.vocab_size = 500;
        opts.model_type = model_type;
        let s = prepare(&opts).unwrap();
        assert!(s.tokenizer_trained);
        let saved = std::fs::read(out.join("tokenizer.json")).unwrap();
        let tok = Tokenizer::from_bytes(&saved).unwrap();
        assert!(tok.get_vocab_size(true) <= 500);
        let store = BlockStore::open(&out.join("train.bin")).unwrap();
        assert_eq!(store.header().tokenizer_fingerprint, tokenizer_fingerprint(&saved));
        assert_eq!(store.header().vocab_size as usize, tok.get_vocab_size(true));
        match model_type {
            ModelType::Causal => assert_eq!(store.header().eos, tok.token_to_id("<|endoftext|>")),
            ModelType::Masked => assert_eq!(store.header().mask, tok.token_to_id("[MASK]")),
        }
    }
}

#[test]
fn bad_inputs_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let base = |inputs: Vec<PathBuf>| {
        let mut o = PrepareOptions::new(inputs, &out);
        o.tokenizer = Some(gpt2());
        o
    };
    let missing = base(vec![dir.path().join("nope.txt")]);
    assert!(matches!(prepare(&missing), Err(TextError::MissingPath { .. })));

    let bad_utf8 = dir.path().join("bad.txt");
    std::fs::write(&bad_utf8, b"fine line\nbad \xff byte\nlast\n").unwrap();
    let err = prepare(&base(vec![bad_utf8.clone()])).unwrap_err();
    assert!(matches!(err, TextError::InvalidUtf8 { offset: 14, decompressed: false, .. }), "{err}");
    let mut skip = base(vec![bad_utf8]);
    skip.read.skip_invalid = true;
    skip.block_size = 2;
    let s = prepare(&skip).unwrap();
    assert_eq!((s.skipped_invalid, s.train.documents), (1, 2));
    std::fs::remove_dir_all(&out).unwrap();

    // In a gzip file the offset counts decompressed bytes, and the message says so.
    let gz = dir.path().join("bad.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(b"{\"text\": \"ok\"}\n{\"text\": \"\xc3(\"}\n").unwrap();
    enc.finish().unwrap();
    let err = prepare(&base(vec![gz])).unwrap_err();
    assert!(matches!(err, TextError::InvalidUtf8 { offset: 25, decompressed: true, .. }), "{err}");
    assert!(err.to_string().contains("of the decompressed data"), "{err}");

    let typed = dir.path().join("typed.jsonl");
    std::fs::write(&typed, "{\"text\": 12}\n").unwrap();
    let err = prepare(&base(vec![typed])).unwrap_err();
    assert!(err.to_string().contains("typed.jsonl:1: field \"text\" is a number, not a string"), "{err}");

    let blank = dir.path().join("blank.txt");
    std::fs::write(&blank, "\n  \n\n").unwrap();
    assert!(matches!(prepare(&base(vec![blank])), Err(TextError::EmptyCorpus { .. })));

    let jsonl = dir.path().join("d.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"a\"}\n{\"body\": \"b\", \"id\": 1}\n").unwrap();
    let err = prepare(&base(vec![jsonl])).unwrap_err();
    assert!(err.to_string().contains("d.jsonl:2: no field \"text\" (fields: body, id)"), "{err}");

    let mut zero = base(vec![data("corpus/kjv.txt.gz")]);
    zero.block_size = 0;
    assert!(matches!(prepare(&zero), Err(TextError::ZeroBlockSize)));

    let small = dir.path().join("small.txt");
    std::fs::write(&small, "In the beginning\n").unwrap();
    assert!(matches!(prepare(&base(vec![small])), Err(TextError::TooSmall { tokens: 4, .. })));

    let mut bad_tok = base(vec![data("corpus/kjv.txt.gz")]);
    let not_json = dir.path().join("tok.json");
    std::fs::write(&not_json, "{\"model\": 3}").unwrap();
    bad_tok.tokenizer = Some(not_json);
    assert!(matches!(prepare(&bad_tok), Err(TextError::BadTokenizer { .. })));

    // Nothing was left behind by any failure.
    let leftovers: Vec<_> = std::fs::read_dir(&out).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
