//! lmtrain-trainer: the training loop with Hugging Face `Trainer` semantics, generic over the
//! model family ([`LanguageModel`]) and the backend.
//!
//! Blocks come from a memory-mapped [`lmtrain_store::BlockStore`] in a seeded per-epoch order;
//! a [`collate::Collator`] turns them into batches (causal LM: labels = ids); micro-batches
//! accumulate gradients inside the model and their losses in the backend's step scalars;
//! [`lmtrain_optim::AdamW`] clips and updates; the host reads the step's loss and gradient norm
//! once per step; evaluation reports loss and perplexity; checkpoints (`checkpoint-STEP/`) hold
//! the Hugging Face model files plus everything needed to resume the run bit for bit; metrics go
//! to `metrics.jsonl`; a progress bar shows step, loss, tokens/s and ETA.
//!
//! The loop ([`Trainer::train`]) reads top to bottom as its parts: [`Trainer`]'s `step` (one
//! optimizer step), `log`, `evaluate_now` and `save_now`.

pub mod args;
pub mod checkpoint;
pub mod collate;
pub mod masking;
pub mod memory;
pub mod metrics;
mod trainer;

use std::path::{Path, PathBuf};

use lmtrain_backend::Backend;
use lmtrain_model::{LanguageModel, ModelConfig, ModelError};
use lmtrain_store::BlockStore;

pub use args::{IntervalStrategy, TrainingArgs};
pub use checkpoint::TrainerState;
pub use collate::{Batch, BatchKey, CausalCollator, Collator, MaskingCollator};
pub use trainer::{TrainOutcome, Trainer};

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Invalid or contradictory arguments.
    #[error("{0}")]
    Args(String),
    /// The data does not fit the model (block size, vocabulary, tokenizer).
    #[error("{0}")]
    Mismatch(String),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (not a `source`: it is printed here, once).
        error: std::io::Error,
    },
    /// A checkpoint or log file is malformed.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Hugging Face model files could not be read or written.
    #[error(transparent)]
    Hf(#[from] lmtrain_hf::HfError),
    /// Optimizer state does not fit, or its backend failed.
    #[error(transparent)]
    Optim(#[from] lmtrain_optim::OptimError),
    /// The model could not run a batch (a bad token id, a failed backend op).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The loss or gradient norm became NaN or infinite.
    #[error(
        "{what} is {value} at step {step} (learning rate {lr:.3e}); training stopped and nothing was saved after it; {}; try a lower --learning-rate (or --max-grad-norm / more --warmup-steps)",
        match last_checkpoint { Some(p) => format!("the last good checkpoint is {}", p.display()), None => "no checkpoint had been written yet".to_string() }
    )]
    NonFinite {
        /// "loss" or "gradient norm".
        what: &'static str,
        /// The offending value.
        value: f32,
        /// Optimizer step (1-based) that produced it.
        step: u64,
        /// Learning rate of that step.
        lr: f64,
        /// The newest checkpoint on disk.
        last_checkpoint: Option<PathBuf>,
    },
}

impl TrainerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainerError::Io { path: path.to_path_buf(), error: source }
    }
}

/// Result of an evaluation pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Blocks evaluated.
    pub blocks: usize,
}

/// Checks that a block store can feed a model with `config`: block size within its positions,
/// token ids within the vocabulary and, when the tokenizer is known, the same tokenizer.
pub fn check_store_fits<C: ModelConfig>(store: &BlockStore, config: &C, tokenizer_json: Option<&[u8]>) -> Result<(), TrainerError> {
    let h = store.header();
    let name = store.path().display();
    let (positions, vocab) = (config.max_positions(), config.vocab_size());
    if h.block_size as usize > positions {
        return Err(TrainerError::Mismatch(format!(
            "{name}: block size {} exceeds the model's n_positions {positions}; re-run `train prepare` with --block-size {positions} or less",
            h.block_size
        )));
    }
    if h.vocab_size as usize > vocab {
        return Err(TrainerError::Mismatch(format!(
            "{name}: the store's vocabulary ({} tokens) is larger than the model's vocab_size {vocab}",
            h.vocab_size
        )));
    }
    if let Some(tok) = tokenizer_json {
        let fp = lmtrain_text::tokenizer_fingerprint(tok);
        if fp != h.tokenizer_fingerprint {
            return Err(TrainerError::Mismatch(format!(
                "{name} was tokenized with a different tokenizer than the model's tokenizer.json (fingerprint {:016x} vs {fp:016x}); re-run `train prepare` with the model's tokenizer",
                h.tokenizer_fingerprint
            )));
        }
    }
    if store.is_empty() {
        return Err(TrainerError::Mismatch(format!("{name} holds no blocks")));
    }
    Ok(())
}

/// Mean loss and perplexity of `model` over every block of `store` (eval mode: no dropout),
/// batches of `batch` blocks: the mean cross-entropy over every predicted token of the store
/// (each batch's mean weighted by its predicted tokens), so a batch with few masked tokens
/// weighs as little as it holds, and one with none adds nothing instead of a NaN. With blocks
/// of equal length and no padding (causal LM) this equals Hugging Face's average of batch means
/// weighted by batch size. The batch losses accumulate in the backend; the host reads them once,
/// at the end.
pub fn evaluate<B: Backend, M: LanguageModel<B>>(
    model: &mut M,
    store: &BlockStore,
    batch: usize,
    collator: &dyn Collator,
) -> Result<EvalResult, TrainerError> {
    let n = store.len();
    let mut stats = model.backend().new_stats().map_err(ModelError::from)?;
    let mut b = Batch::default();
    let ids: Vec<usize> = (0..n).collect();
    let mut predicted = 0usize;
    for chunk in ids.chunks(batch.max(1)) {
        collator.collate(store, chunk, collate::BatchKey::Eval, &mut b);
        let tokens = M::OBJECTIVE.predicted_tokens(&b.input());
        if tokens > 0 {
            model.accumulate_loss(&b.input(), &mut stats, tokens as f64)?;
            predicted += tokens;
        }
    }
    let sum = model.backend().read_stats(&stats).map_err(ModelError::from)?.loss;
    // no predicted token at all: NaN, which the callers report
    let loss = if predicted == 0 { f64::NAN } else { sum / predicted as f64 };
    Ok(EvalResult { loss, perplexity: loss.exp(), blocks: n })
}
