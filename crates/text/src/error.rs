//! The pipeline's error type: every message is one line a user can act on.

use std::path::PathBuf;

/// Everything that can go wrong turning a corpus into a block store.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// No input path was given.
    #[error("no input files given")]
    NoInput,
    /// An input path does not exist.
    #[error("{}: no such file or directory", path.display())]
    MissingPath {
        /// The path.
        path: PathBuf,
    },
    /// A directory input holds no file of a known corpus format.
    #[error("{}: directory holds no .txt, .jsonl, .csv or .parquet file (optionally .gz)", path.display())]
    EmptyDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// Reading produced no document at all.
    #[error("the corpus is empty: no non-blank document in {what}")]
    EmptyCorpus {
        /// Which inputs.
        what: String,
    },
    /// The corpus yields fewer tokens than one block.
    #[error("the {split} set has {tokens} tokens, fewer than one block of {block_size}: give more text or a smaller --block-size")]
    TooSmall {
        /// "training" or "validation".
        split: &'static str,
        /// Tokens produced.
        tokens: u64,
        /// Requested block size.
        block_size: usize,
    },
    /// Bytes that are not UTF-8.
    #[error(
        "{}: invalid UTF-8 at byte offset {offset}{}; fix the file or pass --skip-invalid to skip such documents",
        path.display(),
        if *.decompressed { " of the decompressed data" } else { "" }
    )]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte (in the decompressed stream for .gz files).
        offset: u64,
        /// Whether the offset counts decompressed bytes.
        decompressed: bool,
    },
    /// An operating-system error. (Printed in the message and deliberately not chained as
    /// a `source`, so that `{:#}` prints it once.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// An input is not a text corpus (an archive, a PDF, binary data, a device).
    #[error("{}: {what}", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
        /// What it is and what to do.
        what: String,
    },
    /// A line (JSON Lines) or record (CSV) is longer than the reader accepts.
    #[error("{}:{line}: {kind} longer than {limit} bytes; split the file or use .txt, whose long lines are cut into pieces", path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
        /// 1-based line (JSON Lines) or record (CSV) number.
        line: u64,
        /// "line" or "record".
        kind: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// A flag value outside its allowed range.
    #[error("{0}")]
    BadFlag(String),
    /// A line of a JSON Lines file is not a JSON object.
    #[error("{}:{line}: not a JSON object: {msg}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Parser message.
        msg: String,
    },
    /// A JSON Lines record lacks the text field, or it is not a string.
    #[error("{}:{line}: {problem} (use --text-field to choose the field)", path.display())]
    BadField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong, naming the field.
        problem: String,
    },
    /// A CSV or Parquet file has no column of the requested name.
    #[error("{}: no column {column:?} (columns: {available}); use --text-column to choose one", path.display())]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The requested column.
        column: String,
        /// The columns the file has.
        available: String,
    },
    /// A CSV file could not be parsed (`msg` without the csv crate's own "CSV error: " prefix).
    #[error("{}: CSV error: {msg}", path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// Parser message.
        msg: String,
    },
    /// A Parquet file could not be read.
    #[error("{}: Parquet error: {msg}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// Reader message.
        msg: String,
    },
    /// The tokenizer file could not be read or parsed.
    #[error("{}: not a usable Hugging Face tokenizer.json: {msg}", path.display())]
    BadTokenizer {
        /// The file.
        path: PathBuf,
        /// Parser message.
        msg: String,
    },
    /// Training a tokenizer failed.
    #[error("training the tokenizer failed: {0}")]
    TokenizerTraining(String),
    /// The tokenizer failed on a document.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// A causal-LM store needs an end-of-text token.
    #[error("the tokenizer has no end-of-text token (looked for {looked_for}); pass --eos-token with the token that separates documents")]
    NoEos {
        /// The tokens looked for.
        looked_for: String,
    },
    /// A requested token is not in the vocabulary.
    #[error("token {0:?} is not in the tokenizer's vocabulary")]
    UnknownToken(String),
    /// A block size of zero.
    #[error("--block-size must be at least 1")]
    ZeroBlockSize,
    /// `--line-by-line` needs a padding token.
    #[error("--line-by-line pads every line to the block size and needs a padding token; the tokenizer has none ([PAD], <pad>, <|pad|>){}", if *.causal { " and no end-of-text token to pad with" } else { "" })]
    NoPadToken {
        /// Whether the end-of-text fallback was also missing (causal).
        causal: bool,
    },
    /// A validation split outside [0, 1).
    #[error("--validation-split must be in [0, 1), got {0}")]
    BadSplit(f64),
    /// A vocabulary size too small to train.
    #[error("--vocab-size {got} is too small: at least {min} are needed for the special tokens and the initial alphabet")]
    VocabTooSmall {
        /// Requested.
        got: usize,
        /// Minimum.
        min: usize,
    },
    /// The output directory holds a store that this run must not replace.
    #[error(
        "{}: {reason}; choose another --output-dir or pass --overwrite",
        path.display()
    )]
    IncompatibleStore {
        /// The existing store.
        path: PathBuf,
        /// Why it is incompatible.
        reason: String,
    },
    /// Writing the store failed.
    #[error(transparent)]
    Store(#[from] lmtrain_store::StoreError),
}

impl TextError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TextError {
        let path = path.into();
        move |error| TextError::Io { path, error }
    }

    /// A CSV error, with its message once.
    pub(crate) fn csv(path: &std::path::Path, e: &csv::Error) -> TextError {
        let msg = e.to_string();
        let msg = msg.strip_prefix("CSV error: ").unwrap_or(&msg).to_string();
        TextError::Csv { path: path.to_path_buf(), msg }
    }
}
