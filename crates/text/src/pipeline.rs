//! `prepare`: corpus -> tokenizer -> tokens -> blocks -> store files, streamed.
//!
//! A reader thread parses documents into chunks of about `chunk_bytes` of text and passes
//! them through a bounded channel; the calling thread tokenizes each chunk in parallel
//! (rayon, all cores), groups the tokens into blocks and appends them to the store being
//! written. Memory stays bounded by a few chunks whatever the corpus size.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use lmtrain_store::{BlockStore, BlockWriter, FinishedStore, Layout, MAX_BLOCK_SIZE, SpecialTokens, StoreSpec};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::TextError;
use crate::corpus::{CorpusFile, Documents, Piece, ReadCounts, ReadOptions, resolve_inputs};
use crate::fastbpe::FastByteLevelBpe;
use crate::group::{Grouper, word_starts_from_ids};
use crate::tok::{
    MAX_TRAIN_WORD_BYTES, ModelType, find_special_tokens, load_tokenizer, split_long_words, tokenizer_fingerprint, train_tokenizer,
};

/// Everything `prepare` needs. Build with [`PrepareOptions::new`] and adjust the fields.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Corpus files or directories.
    pub inputs: Vec<PathBuf>,
    /// Where `train.bin`, `validation.bin` and `tokenizer.json` are written.
    pub output_dir: PathBuf,
    /// How documents are read.
    pub read: ReadOptions,
    /// A Hugging Face `tokenizer.json`; `None` trains one on the training documents.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer.
    pub vocab_size: usize,
    /// Causal (GPT-2 style) or masked (BERT style).
    pub model_type: ModelType,
    /// Tokens per block.
    pub block_size: usize,
    /// Separate validation corpus (same read options); overrides `validation_split`.
    pub validation_files: Vec<PathBuf>,
    /// Fraction of documents held out for validation, chosen by a hash of (seed, document
    /// index): reproducible and streaming, so the held-out share is close to, not exactly,
    /// this fraction.
    pub validation_split: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Stop after this many training blocks (the first ones of the corpus).
    pub max_train_blocks: Option<u64>,
    /// Replace an existing store even if it was made with another tokenizer or block size.
    pub overwrite: bool,
    /// End-of-text token to insert between documents (causal); found automatically if `None`.
    pub eos_token: Option<String>,
    /// Text per chunk handed to the tokenizer.
    pub chunk_bytes: usize,
    /// One sequence per document (Hugging Face `run_mlm.py --line_by_line`): each document
    /// becomes one block, truncated to the block size and padded, with its length stored
    /// (a padded, version 2 store) instead of being concatenated and cut.
    pub line_by_line: bool,
}

impl PrepareOptions {
    /// Defaults of the tutorials: causal LM, block size 128, no validation split, seed 42,
    /// tokenizer trained with 8,192 entries unless `tokenizer` is set.
    pub fn new(inputs: Vec<PathBuf>, output_dir: impl Into<PathBuf>) -> PrepareOptions {
        PrepareOptions {
            inputs,
            output_dir: output_dir.into(),
            read: ReadOptions::default(),
            tokenizer: None,
            vocab_size: 8192,
            model_type: ModelType::Causal,
            block_size: 128,
            validation_files: Vec::new(),
            validation_split: 0.0,
            seed: 42,
            max_train_blocks: None,
            overwrite: false,
            eos_token: None,
            chunk_bytes: 1 << 20,
            line_by_line: false,
        }
    }
}

/// Counts for one split.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitSummary {
    /// Documents tokenized.
    pub documents: u64,
    /// Tokens produced (special tokens included).
    pub tokens: u64,
    /// Blocks written.
    pub blocks: u64,
    /// Tokens not written: the incomplete last block, or everything after `max_train_blocks`
    /// (line by line: the tokens cut off by truncation).
    pub dropped_tokens: u64,
    /// Pad tokens written (line by line only).
    pub padding_tokens: u64,
    /// The store file.
    pub path: PathBuf,
}

/// What `prepare` did.
#[derive(Clone, Debug)]
pub struct PrepareSummary {
    /// The training store.
    pub train: SplitSummary,
    /// The validation store, when there is one.
    pub validation: Option<SplitSummary>,
    /// Documents skipped for invalid UTF-8 (`--skip-invalid`).
    pub skipped_invalid: u64,
    /// JSON Lines / CSV / Parquet records skipped because their text is null or blank.
    pub skipped_empty: u64,
    /// Documents longer than [`MAX_PIECE_BYTES`](crate::corpus::MAX_PIECE_BYTES) that were cut
    /// into pieces, and how many pieces they made.
    pub split_documents: u64,
    /// Pieces of the split documents.
    pub split_pieces: u64,
    /// Stale temporary files of killed earlier runs removed from the output directory.
    pub removed_temp_files: Vec<PathBuf>,
    /// Where the tokenizer was saved.
    pub tokenizer_path: PathBuf,
    /// Whether the tokenizer was trained here (rather than loaded).
    pub tokenizer_trained: bool,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Fingerprint stored in the headers.
    pub tokenizer_fingerprint: u64,
    /// Seconds spent training the tokenizer (0 when loaded).
    pub tokenizer_seconds: f64,
    /// Seconds spent reading, tokenizing, grouping and writing.
    pub tokenize_seconds: f64,
}

impl PrepareSummary {
    /// Tokens per second of the tokenize-group-write phase.
    pub fn tokens_per_second(&self) -> f64 {
        let tokens = self.train.tokens + self.validation.as_ref().map_or(0, |v| v.tokens);
        tokens as f64 / self.tokenize_seconds.max(1e-9)
    }
}

/// Phases reported to the progress callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the training documents to train a tokenizer.
    TrainingTokenizer,
    /// Tokenizing the training corpus.
    Train,
    /// Tokenizing the validation corpus (`validation_files`).
    Validation,
}

/// A progress report.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Bytes of the phase's files read from disk so far.
    pub bytes_done: u64,
    /// Total bytes of the phase's files on disk.
    pub bytes_total: u64,
    /// Tokens produced so far (all splits).
    pub tokens: u64,
}

/// Runs the pipeline without progress reports.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, TextError> {
    prepare_with_progress(opts, &|_| {})
}

/// Whether document `index` is held out for validation: a SplitMix64 hash of the seed and
/// the index, compared with the split fraction.
pub fn is_validation_doc(seed: u64, index: u64, split: f64) -> bool {
    if split <= 0.0 {
        return false;
    }
    let h = splitmix64(seed ^ splitmix64(index));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < split
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the pipeline, calling `progress` from time to time (possibly from several threads).
pub fn prepare_with_progress(opts: &PrepareOptions, progress: &(dyn Fn(&Progress) + Sync)) -> Result<PrepareSummary, TextError> {
    if opts.block_size == 0 {
        return Err(TextError::ZeroBlockSize);
    }
    if opts.block_size > MAX_BLOCK_SIZE as usize {
        return Err(TextError::BadFlag(format!("--block-size {} is too large: allowed 1 to {MAX_BLOCK_SIZE} tokens", opts.block_size)));
    }
    if opts.max_train_blocks == Some(0) {
        return Err(TextError::BadFlag("--max-train-blocks must be at least 1".into()));
    }
    if opts.tokenizer.is_none() && opts.vocab_size > crate::tok::MAX_TRAIN_VOCAB {
        // Checked again by the trainer; failing here is before any reading.
        return Err(TextError::BadFlag(format!(
            "--vocab-size {} is too large to train: allowed {} to {}",
            opts.vocab_size,
            crate::tok::MIN_TRAIN_VOCAB,
            crate::tok::MAX_TRAIN_VOCAB
        )));
    }
    if !(0.0..1.0).contains(&opts.validation_split) {
        return Err(TextError::BadSplit(opts.validation_split));
    }
    let train_files = resolve_inputs(&opts.inputs, opts.read.format)?;
    let val_files = if opts.validation_files.is_empty() { Vec::new() } else { resolve_inputs(&opts.validation_files, opts.read.format)? };
    // The split only applies when no validation file is given.
    let split = if val_files.is_empty() { opts.validation_split } else { 0.0 };
    let has_validation = !val_files.is_empty() || split > 0.0;

    if opts.output_dir.exists() && !opts.output_dir.is_dir() {
        return Err(TextError::BadFlag(format!("--output-dir {}: exists and is not a directory", opts.output_dir.display())));
    }
    std::fs::create_dir_all(&opts.output_dir).map_err(TextError::io(&opts.output_dir))?;
    let train_path = opts.output_dir.join("train.bin");
    let val_path = opts.output_dir.join("validation.bin");
    let tok_path = opts.output_dir.join("tokenizer.json");
    // Temporary files of an earlier run that was killed: ours by name, and their writer is gone.
    let mut removed_temp_files = Vec::new();
    for path in [&train_path, &val_path] {
        removed_temp_files.extend(lmtrain_store::remove_stale_temp_files(path)?);
    }
    removed_temp_files.extend(remove_stale_tokenizer_temps(&tok_path)?);
    let existing = |fp: Option<u64>| -> Result<(), TextError> {
        if opts.overwrite {
            return Ok(());
        }
        for path in [&train_path, &val_path] {
            check_existing_store(path, opts.block_size, fp)?;
        }
        Ok(())
    };
    // Fail before any expensive work when the block size alone already conflicts.
    existing(None)?;

    let started = Instant::now();
    let (tokenizer, tok_json, trained) = match &opts.tokenizer {
        Some(path) => {
            let (tok, bytes) = load_tokenizer(path)?;
            (tok, bytes, false)
        }
        None => {
            let tok = train_on_corpus(opts, &train_files, split, progress)?;
            let json = tok.to_string(true).map_err(|e| TextError::TokenizerTraining(e.to_string()))?;
            (tok, json.into_bytes(), true)
        }
    };
    let tokenizer_seconds = if trained { started.elapsed().as_secs_f64() } else { 0.0 };
    let fingerprint = tokenizer_fingerprint(&tok_json);
    existing(Some(fingerprint))?;

    let mut special = find_special_tokens(&tokenizer);
    if let Some(name) = &opts.eos_token {
        special.eos = Some(tokenizer.token_to_id(name).ok_or_else(|| TextError::UnknownToken(name.clone()))?);
    }
    if opts.model_type == ModelType::Causal && special.eos.is_none() {
        return Err(TextError::NoEos { looked_for: "<|endoftext|>, </s>, <eos>, [EOS]".into() });
    }
    if opts.line_by_line && special.pad.is_none() {
        // Causal tokenizers (GPT-2) have no pad token; the usual choice is end-of-text.
        match (opts.model_type, special.eos) {
            (ModelType::Causal, Some(eos)) => special.pad = Some(eos),
            _ => return Err(TextError::NoPadToken { causal: opts.model_type == ModelType::Causal }),
        }
    }
    let vocab_size = tokenizer.get_vocab_size(true) as u32;
    let layout = match opts.model_type {
        ModelType::Causal => Layout::Causal,
        ModelType::Masked => Layout::Masked,
    };
    let spec = StoreSpec {
        block_size: opts.block_size as u32,
        vocab_size,
        tokenizer_fingerprint: fingerprint,
        special,
        word_starts: true,
        layout,
    };

    let tokenize_started = Instant::now();
    let fast = match opts.model_type {
        ModelType::Causal => FastByteLevelBpe::new(&tokenizer),
        ModelType::Masked => None,
    };
    // Line by line, masked: the tokenizer truncates (keeping [CLS] ... [SEP]), as
    // `run_mlm.py`'s `tokenizer(..., truncation=True, max_length=block_size)` does.
    let truncating = match (opts.line_by_line, opts.model_type) {
        (true, ModelType::Masked) => {
            let mut t = tokenizer.clone();
            t.with_truncation(Some(tokenizers::TruncationParams { max_length: opts.block_size, ..Default::default() }))
                .map_err(|e| TextError::Encode(e.to_string()))?;
            Some(t)
        }
        _ => None,
    };
    let encoder = Encoder {
        tokenizer: truncating.as_ref().unwrap_or(&tokenizer),
        fast,
        model_type: opts.model_type,
        special,
        line_by_line: opts.line_by_line,
        untruncated: truncating.as_ref().map(|_| &tokenizer),
        block_size: opts.block_size,
    };
    let mut train = SplitWriter::create(&train_path, spec.clone(), opts.max_train_blocks, opts.line_by_line)?;
    let mut val = if has_validation { Some(SplitWriter::create(&val_path, spec.clone(), None, opts.line_by_line)?) } else { None };
    let mut tokens_so_far = 0u64;

    let mut counts = stream_corpus(opts, &train_files, Phase::Train, progress, &mut |chunk| {
        let encoded = encoder.encode_chunk(&chunk)?;
        for (piece, enc) in chunk.iter().zip(&encoded) {
            let target = match &mut val {
                Some(v) if is_validation_doc(opts.seed, piece.doc, split) => v,
                _ => &mut train,
            };
            if let Some((ids, starts, cut)) = enc {
                target.push_piece(ids, starts, *cut, piece.last)?;
                tokens_so_far += ids.len() as u64;
            } else {
                target.skip_piece(piece.last);
            }
        }
        Ok((tokens_so_far, !train.is_full()))
    })?;
    if let Some(v) = &mut val
        && !val_files.is_empty()
    {
        let c = stream_corpus(opts, &val_files, Phase::Validation, progress, &mut |chunk| {
            let encoded = encoder.encode_chunk(&chunk)?;
            for (piece, enc) in chunk.iter().zip(&encoded) {
                if let Some((ids, starts, cut)) = enc {
                    v.push_piece(ids, starts, *cut, piece.last)?;
                    tokens_so_far += ids.len() as u64;
                } else {
                    v.skip_piece(piece.last);
                }
            }
            Ok((tokens_so_far, true))
        })?;
        counts.skipped_invalid += c.skipped_invalid;
        counts.skipped_empty += c.skipped_empty;
        counts.split_documents += c.split_documents;
        counts.split_pieces += c.split_pieces;
    }

    let describe = |files: &[CorpusFile]| -> String {
        let names: Vec<String> = files.iter().take(3).map(|f| f.path.display().to_string()).collect();
        if files.len() > 3 { format!("{} and {} more files", names.join(", "), files.len() - 3) } else { names.join(", ") }
    };
    if train.summary.documents + val.as_ref().map_or(0, |v| v.summary.documents) == 0 {
        return Err(TextError::EmptyCorpus { what: describe(&train_files) });
    }
    let (train_store, train_summary) = train.finish("training", opts.block_size)?;
    let val_done = match val {
        Some(v) => {
            if v.summary.documents == 0 && !val_files.is_empty() {
                return Err(TextError::EmptyCorpus { what: describe(&val_files) });
            }
            Some(v.finish("validation", opts.block_size)?)
        }
        None => None,
    };
    let tokenize_seconds = tokenize_started.elapsed().as_secs_f64();

    // Everything is complete under temporary names: move it into place.
    lmtrain_store::write_atomic(&tok_path, &tok_json).map_err(TextError::io(&tok_path))?;
    let validation = match val_done {
        Some((store, summary)) => {
            store.persist()?;
            Some(summary)
        }
        None => {
            // A stale validation store from an earlier run would not match this one.
            if val_path.exists() {
                std::fs::remove_file(&val_path).map_err(TextError::io(&val_path))?;
            }
            None
        }
    };
    train_store.persist()?;
    Ok(PrepareSummary {
        train: train_summary,
        validation,
        skipped_invalid: counts.skipped_invalid,
        skipped_empty: counts.skipped_empty,
        split_documents: counts.split_documents,
        split_pieces: counts.split_pieces,
        removed_temp_files,
        tokenizer_path: tok_path,
        tokenizer_trained: trained,
        vocab_size,
        tokenizer_fingerprint: fingerprint,
        tokenizer_seconds,
        tokenize_seconds,
    })
}

/// Refuses to replace a store that was made with another block size or tokenizer (when
/// `fingerprint` is known), or a file that is not a store at all.
fn check_existing_store(path: &Path, block_size: usize, fingerprint: Option<u64>) -> Result<(), TextError> {
    if !path.exists() {
        return Ok(());
    }
    let incompatible = |reason: String| TextError::IncompatibleStore { path: path.to_path_buf(), reason };
    // Only the header matters here (the file is about to be replaced).
    let store =
        BlockStore::open_unverified(path).map_err(|e| incompatible(format!("exists and is not a readable lmtrain block store ({e})")))?;
    let h = store.header();
    if h.block_size as usize != block_size {
        return Err(incompatible(format!("holds a store with block size {}, not {block_size}", h.block_size)));
    }
    if let Some(fp) = fingerprint
        && h.tokenizer_fingerprint != fp
    {
        return Err(incompatible("holds a store made with a different tokenizer".into()));
    }
    Ok(())
}

/// Removes `.tokenizer.json.<pid>.tmp` files (the naming of [`lmtrain_store::write_atomic`]) whose
/// process is gone (see [`lmtrain_store::remove_stale_temp_files`] for the rule).
fn remove_stale_tokenizer_temps(path: &Path) -> Result<Vec<PathBuf>, TextError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().map(|n| n.to_string_lossy().into_owned())) else {
        return Ok(Vec::new());
    };
    if !Path::new("/proc/self").exists() {
        return Ok(Vec::new());
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(TextError::io(dir))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = file
            .strip_prefix('.')
            .and_then(|r| r.strip_prefix(name.as_str()))
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".tmp"))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let Some(pid) = pid else { continue };
        if Path::new("/proc").join(pid).exists() || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let p = entry.path();
        std::fs::remove_file(&p).map_err(TextError::io(&p))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Checks that a store and the tokenizer next to it belong together: the store's header
/// vocabulary must equal the tokenizer's (added tokens included) and, when the store records
/// one, the fingerprint must match. For `train` and `train eval` to call after opening a
/// store (`DIR/train.bin` with `DIR/tokenizer.json`).
pub fn check_store_tokenizer(store: &BlockStore, tokenizer_path: &Path) -> Result<(), TextError> {
    let (tok, bytes) = load_tokenizer(tokenizer_path)?;
    let h = store.header();
    let vocab = tok.get_vocab_size(true);
    if h.vocab_size as usize != vocab {
        return Err(TextError::IncompatibleStore {
            path: store.path().to_path_buf(),
            reason: format!(
                "its header vocabulary ({} tokens) differs from {}'s ({vocab} tokens); re-run `train prepare` with that tokenizer",
                h.vocab_size,
                tokenizer_path.display()
            ),
        });
    }
    if h.tokenizer_fingerprint != 0 && h.tokenizer_fingerprint != tokenizer_fingerprint(&bytes) {
        return Err(TextError::IncompatibleStore {
            path: store.path().to_path_buf(),
            reason: format!("it was made with a different tokenizer than {}; re-run `train prepare`", tokenizer_path.display()),
        });
    }
    Ok(())
}

/// Reads the training documents (validation ones excluded) once to train a tokenizer.
fn train_on_corpus(
    opts: &PrepareOptions,
    files: &[CorpusFile],
    split: f64,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Tokenizer, TextError> {
    let mut docs = Documents::new(files.to_vec(), opts.read.clone());
    let total = docs.total_bytes();
    let counter = docs.bytes_read.clone();
    // The trainer pulls documents through an iterator, which cannot return errors: the
    // first one is parked here and reported after training stops.
    let failure: Mutex<Option<TextError>> = Mutex::new(None);
    let mut pieces = 0u64;
    // Parts of the current piece, cut so that no word is longer than MAX_TRAIN_WORD_BYTES.
    let mut parts: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let iter = std::iter::from_fn(|| {
        loop {
            if let Some(part) = parts.pop_front() {
                return Some(part);
            }
            match docs.next_piece() {
                Ok(Some(piece)) => {
                    pieces += 1;
                    if pieces.is_multiple_of(4096) {
                        progress(&Progress {
                            phase: Phase::TrainingTokenizer,
                            bytes_done: counter.load(Ordering::Relaxed),
                            bytes_total: total,
                            tokens: 0,
                        });
                    }
                    if !is_validation_doc(opts.seed, piece.doc, split) {
                        split_long_words(piece.text, MAX_TRAIN_WORD_BYTES, &mut parts);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    *failure.lock().unwrap() = Some(e);
                    return None;
                }
            }
        }
    });
    let trained = train_tokenizer(opts.model_type, opts.vocab_size, iter);
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    trained
}

/// Streams `files` in chunks of pieces through `handle(chunk)`, which returns (tokens so
/// far, whether to continue). Returns what the reader skipped and cut.
fn stream_corpus(
    opts: &PrepareOptions,
    files: &[CorpusFile],
    phase: Phase,
    progress: &(dyn Fn(&Progress) + Sync),
    handle: &mut dyn FnMut(Vec<Piece>) -> Result<(u64, bool), TextError>,
) -> Result<ReadCounts, TextError> {
    let mut docs = Documents::new(files.to_vec(), opts.read.clone());
    let total = docs.total_bytes();
    let counter = docs.bytes_read.clone();
    let chunk_bytes = opts.chunk_bytes.max(1);
    std::thread::scope(|scope| {
        // Two chunks in flight: the reader stays ahead of the tokenizer without letting
        // memory grow with the corpus.
        let (tx, rx) = sync_channel::<Result<Vec<Piece>, TextError>>(2);
        let reader = scope.spawn(move || {
            loop {
                let mut chunk = Vec::new();
                let mut bytes = 0;
                let status = loop {
                    match docs.next_piece() {
                        Ok(Some(piece)) => {
                            bytes += piece.text.len();
                            chunk.push(piece);
                            if bytes >= chunk_bytes {
                                break Ok(true);
                            }
                        }
                        Ok(None) => break Ok(false),
                        Err(e) => break Err(e),
                    }
                };
                if !chunk.is_empty() && tx.send(Ok(chunk)).is_err() {
                    break; // the consumer stopped early
                }
                match status {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
            docs.counts
        });
        let consumed = consume(rx, handle, &|tokens| {
            progress(&Progress { phase, bytes_done: counter.load(Ordering::Relaxed), bytes_total: total, tokens })
        });
        let counts = reader.join().expect("corpus reader thread panicked");
        consumed.map(|()| counts)
    })
}

fn consume(
    rx: Receiver<Result<Vec<Piece>, TextError>>,
    handle: &mut dyn FnMut(Vec<Piece>) -> Result<(u64, bool), TextError>,
    report: &dyn Fn(u64),
) -> Result<(), TextError> {
    for msg in rx {
        let (tokens, more) = handle(msg?)?;
        report(tokens);
        if !more {
            break;
        }
    }
    Ok(())
}

/// A document's token ids, their word-start flags, and the tokens the tokenizer's own
/// truncation cut off (line by line, masked).
type EncodedDoc = (Vec<u32>, Vec<bool>, u64);

/// Turns documents into token ids and word-start flags.
struct Encoder<'t> {
    tokenizer: &'t Tokenizer,
    /// Same ids as `tokenizer`, faster, for GPT-2-style tokenizers (causal only).
    fast: Option<FastByteLevelBpe<'t>>,
    model_type: ModelType,
    special: SpecialTokens,
    /// Only the first piece of a document is encoded (it is truncated to one block anyway).
    line_by_line: bool,
    /// When `tokenizer` truncates (line by line, masked): the same without truncation.
    untruncated: Option<&'t Tokenizer>,
    block_size: usize,
}

impl Encoder<'_> {
    /// Tokenizes a chunk in parallel, keeping order; `None` for pieces that are not needed.
    fn encode_chunk(&self, pieces: &[Piece]) -> Result<Vec<Option<EncodedDoc>>, TextError> {
        pieces.par_iter().map(|p| if self.line_by_line && !p.first { Ok(None) } else { self.encode_piece(p).map(Some) }).collect()
    }

    /// A piece's ids; the end-of-text token (causal) follows the last piece of a document.
    fn encode_piece(&self, piece: &Piece) -> Result<EncodedDoc, TextError> {
        let doc = piece.text.as_str();
        // Line by line takes a document's first piece as the whole document.
        let ends_doc = piece.last || self.line_by_line;
        let eos = || self.special.eos.expect("checked before tokenizing");
        if let Some(fast) = &self.fast
            && !fast.needs_regular_path(doc)
        {
            let mut ids = Vec::with_capacity(doc.len() / 3 + 1);
            let mut starts = Vec::with_capacity(doc.len() / 3 + 1);
            fast.encode(doc, &mut ids, &mut starts).map_err(|e| TextError::Encode(e.to_string()))?;
            if ends_doc {
                ids.push(eos());
                starts.push(true);
            }
            return Ok((ids, starts, 0));
        }
        // Masked LM: the tokenizer's post-processor adds [CLS] ... [SEP] per document (per
        // piece of an over-long one), as Hugging Face's tokenize function does. Causal LM:
        // no special tokens from the tokenizer; an end-of-text token is appended after every
        // document so the model sees document boundaries (llm.c does this; HF's group_texts
        // does not).
        let add_special = self.model_type == ModelType::Masked;
        // `encode`, not `encode_fast`: the fast variant leaves out the word ids that the
        // word-start flags come from (and measured no faster here).
        let enc = self.tokenizer.encode(doc, add_special).map_err(|e| TextError::Encode(e.to_string()))?;
        let extra = usize::from(self.model_type == ModelType::Causal);
        let mut ids = Vec::with_capacity(enc.len() + extra);
        ids.extend_from_slice(enc.get_ids());
        let mut starts = Vec::with_capacity(enc.len() + extra);
        word_starts_from_ids(enc.get_word_ids(), &mut starts);
        if self.model_type == ModelType::Causal && ends_doc {
            ids.push(eos());
            starts.push(true);
        }
        // Line by line, masked: a sequence that fills its block may have been truncated; the
        // untruncated length says by how much (a second encode only for those).
        let cut = match self.untruncated {
            Some(full) if enc.len() >= self.block_size => {
                let n = full.encode(doc, add_special).map_err(|e| TextError::Encode(e.to_string()))?.len();
                n.saturating_sub(enc.len()) as u64
            }
            _ => 0,
        };
        Ok((ids, starts, cut))
    }
}

/// One output store being filled.
struct SplitWriter {
    writer: BlockWriter,
    grouper: Grouper,
    max_blocks: Option<u64>,
    summary: SplitSummary,
    line_by_line: bool,
}

impl SplitWriter {
    fn create(path: &Path, spec: StoreSpec, max_blocks: Option<u64>, line_by_line: bool) -> Result<SplitWriter, TextError> {
        let grouper = Grouper::new(spec.block_size as usize);
        let writer = if line_by_line { BlockWriter::create_padded(path, spec)? } else { BlockWriter::create(path, spec)? };
        Ok(SplitWriter {
            grouper,
            writer,
            max_blocks,
            summary: SplitSummary { path: path.to_path_buf(), ..Default::default() },
            line_by_line,
        })
    }

    fn is_full(&self) -> bool {
        self.max_blocks.is_some_and(|m| self.writer.n_blocks() >= m)
    }

    /// A piece not encoded (line by line: the rest of a long document).
    fn skip_piece(&mut self, last: bool) {
        if last && !self.is_full() {
            self.summary.documents += 1;
        }
    }

    fn push_piece(&mut self, ids: &[u32], starts: &[bool], cut: u64, last: bool) -> Result<(), TextError> {
        if self.is_full() {
            return Ok(());
        }
        if self.line_by_line {
            // Every document is one block (its first piece, truncated); documents whose
            // text gives no token at all are skipped.
            if last {
                self.summary.documents += 1;
            }
            self.summary.tokens += ids.len() as u64 + cut;
            if ids.is_empty() {
                return Ok(());
            }
            let bs = self.grouper.block_size();
            let n = ids.len().min(bs);
            self.summary.dropped_tokens += (ids.len() - n) as u64 + cut;
            self.summary.padding_tokens += (bs - n) as u64;
            self.writer.push_padded_block(&ids[..n], Some(&starts[..n]))?;
            return Ok(());
        }
        if last {
            self.summary.documents += 1;
        }
        self.summary.tokens += ids.len() as u64;
        self.grouper.push(ids, starts);
        let (writer, max) = (&mut self.writer, self.max_blocks);
        self.grouper.drain(|t, s| {
            writer.push_block(t, Some(s))?;
            Ok::<_, TextError>(max.is_none_or(|m| writer.n_blocks() < m))
        })
    }

    fn finish(self, split: &'static str, block_size: usize) -> Result<(FinishedStore, SplitSummary), TextError> {
        let mut summary = self.summary;
        summary.blocks = self.writer.n_blocks();
        if !self.line_by_line {
            summary.dropped_tokens = summary.tokens - summary.blocks * block_size as u64;
        }
        if summary.blocks == 0 {
            return Err(TextError::TooSmall { split, tokens: summary.tokens, block_size });
        }
        Ok((self.writer.finish()?, summary))
    }
}
