//! Collators turn blocks of a store into the batch a model takes (`input_ids`, `labels`,
//! `attention_mask`, `token_type_ids`), as Hugging Face's data collators do. Which one a run
//! uses follows from the model family's [`Objective`](lmtrain_model::Objective).

use lmtrain_model::Input;
use lmtrain_store::BlockStore;

/// One batch of `b` blocks of `t` tokens, row-major.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Token ids `[b, t]`.
    pub input_ids: Vec<u32>,
    /// Labels `[b, t]` (`-100` = no loss).
    pub labels: Vec<i32>,
    /// `true` = real token, `false` = padding (`None`: no padding).
    pub attention_mask: Option<Vec<bool>>,
    /// Token-type ids (`None`: all 0).
    pub token_type_ids: Option<Vec<u32>>,
    /// Rows in this batch (the last batch of an epoch may be short).
    pub b: usize,
    /// Tokens per row (the store's block size).
    pub t: usize,
}

impl Batch {
    /// Reads the blocks `ids` of `store` into `input_ids` (labels untouched).
    pub fn read_blocks(&mut self, store: &BlockStore, ids: &[usize]) {
        let t = store.block_size();
        self.b = ids.len();
        self.t = t;
        self.input_ids.resize(self.b * t, 0);
        for (row, &id) in ids.iter().enumerate() {
            store.read_block(id, &mut self.input_ids[row * t..(row + 1) * t]);
        }
    }

    /// The batch as the model's input.
    pub fn input(&self) -> Input<'_> {
        Input {
            b: self.b,
            t: self.t,
            input_ids: &self.input_ids,
            labels: Some(&self.labels),
            attention_mask: self.attention_mask.as_deref(),
            token_type_ids: self.token_type_ids.as_deref(),
        }
    }

    /// Tokens in this batch.
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }
}

/// Makes batches from blocks.
pub trait Collator: Send + Sync {
    /// Fills `batch` with the blocks `ids` of `store`. `stream` identifies the batch within the
    /// run (a pure function of the position in the run), so a collator that draws random numbers
    /// (masking) draws the same ones after a resume.
    fn collate(&self, store: &BlockStore, ids: &[usize], stream: u64, batch: &mut Batch);
}

/// Causal LM: labels are the input ids (the model shifts them by one position inside its loss,
/// as Hugging Face does).
#[derive(Clone, Copy, Debug, Default)]
pub struct CausalCollator;

impl Collator for CausalCollator {
    fn collate(&self, store: &BlockStore, ids: &[usize], _stream: u64, batch: &mut Batch) {
        batch.read_blocks(store, ids);
        batch.labels.clear();
        batch.labels.extend(batch.input_ids.iter().map(|&x| x as i32));
        batch.attention_mask = None;
        batch.token_type_ids = None;
    }
}
