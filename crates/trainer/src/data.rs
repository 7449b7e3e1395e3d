//! Causal-LM batches from a block store: `input_ids` are the blocks, `labels` equal them
//! (the model shifts labels by one position inside its loss, as Hugging Face does).

use lmtrain_store::{BlockStore, EpochOrder};

/// One batch of `b` blocks of `t` tokens, row-major.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Token ids `[b, t]`.
    pub input_ids: Vec<u32>,
    /// Labels `[b, t]` (ids as `i32`; -100 would be ignored, causal LM blocks have none).
    pub labels: Vec<i32>,
    /// Rows in this batch (the last batch of an epoch may be short).
    pub b: usize,
    /// Tokens per row (the store's block size).
    pub t: usize,
}

impl Batch {
    /// Fills the batch with the blocks `ids` of `store`.
    pub fn fill(&mut self, store: &BlockStore, ids: impl ExactSizeIterator<Item = usize>) {
        let t = store.block_size();
        let b = ids.len();
        self.b = b;
        self.t = t;
        self.input_ids.resize(b * t, 0);
        self.labels.resize(b * t, 0);
        for (row, id) in ids.enumerate() {
            store.read_block(id, &mut self.input_ids[row * t..(row + 1) * t]);
        }
        for (l, &x) in self.labels.iter_mut().zip(&self.input_ids) {
            *l = x as i32;
        }
    }

    /// Fills the batch with the blocks at positions `lo..hi` of the shuffled `order`.
    pub fn fill_ordered(&mut self, store: &BlockStore, order: &EpochOrder, lo: usize, hi: usize) {
        self.fill(store, (lo..hi).map(|p| order.get(p)));
    }

    /// Tokens in this batch.
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }
}
