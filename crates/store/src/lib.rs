//! lmtrain-store: the pre-tokenized block store that training reads.
//!
//! A store is one file of fixed-size blocks of token ids (u16 when the vocabulary fits,
//! else u32) behind a small versioned header (see [`format`](mod@format)), plus one "starts a word"
//! bit per token for whole-word masking. [`BlockWriter`] writes it incrementally to a
//! temporary name and renames it into place only when complete; [`BlockStore`] reads it
//! zero-copy through a memory map without ever pulling the file into RAM; and
//! [`EpochOrder`] gives a seeded, resumable shuffled order of blocks.
//!
//! [`BlockStore::open`] checks the whole file (header limits with checked arithmetic, file
//! length, payload checksum, every token id below the header's vocabulary), so ids read from
//! an opened store are trustworthy; a caller compares the vocabulary with its model's once
//! ([`BlockStore::check_vocab`]). Padded stores (`train prepare --line-by-line`, format
//! version 2) record each block's real length ([`BlockStore::block_len`],
//! [`BlockStore::attention_mask`]); see [`format`](mod@format) for the layout.

mod atomic;
mod epoch;
pub mod format;
mod reader;
mod writer;

use std::path::PathBuf;

pub use atomic::{sync_parent, write_atomic};
pub use epoch::EpochOrder;
pub use format::{
    HEADER_LEN, Header, Layout, MAGIC, MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_VOCAB_SIZE, MIN_VERSION, SpecialTokens, TokenDtype, VERSION,
};
pub use reader::BlockStore;
pub use writer::{BlockWriter, FinishedStore, StoreSpec, remove_stale_temp_files};

/// Everything that can go wrong writing or reading a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system error on a store file. (The error is printed in the message and
    /// deliberately not chained as a `source`, so `{:#}` chains print it once.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The path is a directory or a device, not a store file.
    #[error("{}: not a block store file (it is a directory or a device)", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{}: not an lmtrain block store (bad magic bytes)", path.display())]
    NotAStore {
        /// The file involved.
        path: PathBuf,
    },
    /// The file was written by a different version of the format.
    #[error(
        "{}: block store format version {found}, this build reads versions 1 to {supported}; re-run `train prepare`",
        path.display()
    )]
    UnsupportedVersion {
        /// The file involved.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// The header is damaged.
    #[error("{}: corrupt block store header ({detail}); re-run `train prepare`", path.display())]
    CorruptHeader {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file is shorter (truncated) or longer than its header says.
    #[error(
        "{}: block store is {actual} bytes but its header describes {expected} (truncated or damaged file); re-run `train prepare`",
        path.display()
    )]
    SizeMismatch {
        /// The file involved.
        path: PathBuf,
        /// Length implied by the header.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The payload does not match the checksum in the header.
    #[error(
        "{}: block store payload checksum mismatch (header {stored:08x}, data {computed:08x}); the file is corrupt, re-run `train prepare`",
        path.display()
    )]
    ChecksumMismatch {
        /// The file involved.
        path: PathBuf,
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the data.
        computed: u32,
    },
    /// A token id in the payload is not below the header's vocabulary.
    #[error(
        "{}: token id {id} in block {block} is outside the store's vocabulary of {vocab_size} tokens (damaged file); re-run `train prepare`",
        path.display()
    )]
    PayloadTokenOutOfRange {
        /// The file involved.
        path: PathBuf,
        /// The first offending id.
        id: u32,
        /// Its block.
        block: u64,
        /// The header's vocabulary size.
        vocab_size: u32,
    },
    /// The store's ids do not fit the vocabulary of the model that reads it.
    #[error(
        "{}: holds token ids up to {max_id} (store vocabulary {store_vocab}) but the model's vocabulary has {vocab_size} tokens; re-run `train prepare` with the model's tokenizer",
        path.display()
    )]
    VocabMismatch {
        /// The file involved.
        path: PathBuf,
        /// Largest id in the store.
        max_id: u32,
        /// Vocabulary in the store's header.
        store_vocab: u32,
        /// The model's vocabulary.
        vocab_size: usize,
    },
    /// A store would hold more blocks than the format allows.
    #[error("{}: more than {max} blocks; use a larger block size or --max-train-blocks", path.display())]
    TooManyBlocks {
        /// The file being written.
        path: PathBuf,
        /// [`format::MAX_BLOCKS`].
        max: u64,
    },
    /// A [`StoreSpec`] outside the format's limits.
    #[error("cannot write a block store: {0}")]
    BadSpec(String),
    /// A block of the wrong length was written.
    #[error("block of {got} tokens written to a store with block size {expected}")]
    BlockLength {
        /// The store's block size.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A token id does not fit the vocabulary declared in the header.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Declared vocabulary size.
        vocab_size: u32,
    },
    /// Word-start bits were given to a store that does not record them, or missing for one that does.
    #[error("word-start bits must be given with every block exactly when the store records them")]
    WordStartsMismatch,
    /// A block size of zero was requested.
    #[error("block size must be at least 1")]
    ZeroBlockSize,
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |error| StoreError::Io { path, error }
    }
}
