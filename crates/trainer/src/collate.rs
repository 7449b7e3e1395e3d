//! Collators turn blocks of a store into the batch a model takes (`input_ids`, `labels`,
//! `attention_mask`, `token_type_ids`), as Hugging Face's data collators do. Which one a run
//! uses follows from the model family's [`Objective`](lmtrain_model::Objective).

use lmtrain_model::{IGNORE_INDEX, Input};
use lmtrain_store::BlockStore;

use crate::masking::{MaskVocab, MaskingConfig, MaskingError, eval_key, mask_rows, train_key};

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
    /// Reads the blocks `ids` of `store` into `input_ids` and, for a padded store
    /// (`train prepare --line-by-line`), the attention mask (labels untouched).
    pub fn read_blocks(&mut self, store: &BlockStore, ids: &[usize]) {
        let t = store.block_size();
        self.b = ids.len();
        self.t = t;
        self.input_ids.resize(self.b * t, 0);
        for (row, &id) in ids.iter().enumerate() {
            store.read_block(id, &mut self.input_ids[row * t..(row + 1) * t]);
        }
        self.attention_mask = store.is_padded().then(|| {
            let mut m = vec![0u8; self.b * t];
            for (row, &id) in ids.iter().enumerate() {
                store.attention_mask(id, &mut m[row * t..(row + 1) * t]);
            }
            m.into_iter().map(|x| x != 0).collect()
        });
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

/// Which batch of a run is being made: a collator that draws random numbers (masking) draws
/// them as a pure function of this, so a resumed run draws what the uninterrupted one would
/// have, and every evaluation draws the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKey {
    /// Micro-batch `micro` of optimizer step `step` (0-based).
    Train {
        /// Optimizer steps taken before this one.
        step: u64,
        /// Micro-batch index within the epoch.
        micro: u64,
    },
    /// An evaluation batch (its draws depend on the blocks only).
    Eval,
}

/// Makes batches from blocks.
pub trait Collator: Send + Sync {
    /// Fills `batch` with the blocks `ids` of `store`.
    fn collate(&self, store: &BlockStore, ids: &[usize], key: BatchKey, batch: &mut Batch);
}

/// Causal LM: labels are the input ids (the model shifts them by one position inside its loss,
/// as Hugging Face does).
#[derive(Clone, Copy, Debug, Default)]
pub struct CausalCollator;

impl Collator for CausalCollator {
    fn collate(&self, store: &BlockStore, ids: &[usize], _key: BatchKey, batch: &mut Batch) {
        batch.read_blocks(store, ids);
        batch.labels.clear();
        batch.labels.extend(batch.input_ids.iter().map(|&x| x as i32));
        // padding predicts nothing (HF sets the labels of pad positions to -100)
        if let Some(m) = &batch.attention_mask {
            batch.labels.iter_mut().zip(m).filter(|(_, real)| !**real).for_each(|(l, _)| *l = IGNORE_INDEX);
        }
        batch.token_type_ids = None;
    }
}

/// Masked LM (Hugging Face `DataCollatorForLanguageModeling(mlm=True)`): fresh masks for every
/// training batch, fixed masks for evaluation (see [`crate::masking`]); labels only at the
/// chosen positions.
pub struct MaskingCollator {
    config: MaskingConfig,
    vocab: MaskVocab,
    seed: u64,
}

impl MaskingCollator {
    /// A collator with the run's masking setting, the tokenizer's special and mask ids, and the
    /// run's seed.
    pub fn new(config: MaskingConfig, vocab: MaskVocab, seed: u64) -> Result<Self, MaskingError> {
        config.validate()?;
        Ok(MaskingCollator { config, vocab, seed })
    }
}

impl Collator for MaskingCollator {
    fn collate(&self, store: &BlockStore, ids: &[usize], key: BatchKey, batch: &mut Batch) {
        batch.read_blocks(store, ids);
        let t = batch.t;
        let word_starts = self.config.whole_word.then(|| {
            let mut w = vec![false; ids.len() * t];
            for (row, &id) in ids.iter().enumerate() {
                store.word_starts(id, &mut w[row * t..(row + 1) * t]);
            }
            w
        });
        let tokens = std::mem::take(&mut batch.input_ids);
        batch.input_ids.resize(tokens.len(), 0);
        batch.labels.resize(tokens.len(), 0);
        let key_of_row = |r: usize| match key {
            BatchKey::Train { step, micro } => train_key(self.seed, step, micro, r as u64),
            BatchKey::Eval => eval_key(self.seed, ids[r] as u64),
        };
        // padding is never chosen
        let mask: Option<Vec<u8>> = batch.attention_mask.as_ref().map(|m| m.iter().map(|&x| x as u8).collect());
        mask_rows(
            &self.config,
            &self.vocab,
            t,
            &tokens,
            word_starts.as_deref(),
            mask.as_deref(),
            key_of_row,
            &mut batch.input_ids,
            &mut batch.labels,
        );
        batch.token_type_ids = None;
    }
}
