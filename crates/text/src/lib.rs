//! lmtrain-text: the data pipeline from a text corpus to a block store.
//!
//! Steps, in order: [`corpus`] reads documents (txt, jsonl, csv, each optionally gzip'd,
//! and Parquet; files or directories; streamed); [`tok`] loads a Hugging Face tokenizer
//! or trains one; [`group`] concatenates tokenized documents and cuts them into blocks;
//! [`pipeline`] runs the whole thing ([`prepare`]) and writes `train.bin`,
//! `validation.bin` and `tokenizer.json` with `lmtrain-store`.

pub mod corpus;
mod error;
mod fastbpe;
pub mod group;
pub mod pipeline;
pub mod tok;

pub use corpus::{CorpusFormat, MAX_PIECE_BYTES, MAX_RECORD_BYTES, ReadOptions, TxtDocuments};
pub use error::TextError;
pub use group::Grouper;
pub use pipeline::{
    Phase, PrepareOptions, PrepareSummary, Progress, SplitSummary, check_store_tokenizer, is_validation_doc, prepare, prepare_with_progress,
};
pub use tok::{MAX_TRAIN_VOCAB, MAX_TRAIN_WORD_BYTES, MIN_TRAIN_VOCAB, ModelType, tokenizer_fingerprint};
