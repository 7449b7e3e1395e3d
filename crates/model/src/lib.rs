//! lmtrain-model: transformer language models with hand-written forward and backward passes,
//! written once against the [`lmtrain_backend::Backend`] op interface.
//!
//! A model is a short composition of the shared layers in [`nn`] plus its config. Its
//! parameters are declared once through a [`params::ParamBuilder`]: the declarations give every
//! tensor its Hugging Face name, shape, decay flag, initialiser and its view into ONE flat
//! parameter buffer (and the same view into the flat gradient buffer), so checkpoints map 1:1
//! onto `model.safetensors` and the optimizer treats the model as a single vector. Gradients
//! ACCUMULATE across calls until [`LanguageModel::zero_grad`].
//!
//! Every family implements [`LanguageModel`]; the trainer, evaluation, checkpoints and Hugging
//! Face import/export are generic over it.

pub mod bert;
pub mod deberta;
pub mod distilbert;
pub mod encoder;
pub mod gpt2;
pub mod limits;
pub mod nn;
pub mod params;

use lmtrain_backend::{Backend, BackendError, StepStats};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use limits::Footprint;
pub use lmtrain_backend::IGNORE_INDEX;
pub use params::{Init, ParamInfo, ParamRef, ParamStore};

/// Invalid model configuration, input or a failed backend op.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A size or option the model cannot be built with.
    #[error("invalid config: {0}")]
    Config(String),
    /// A batch the model cannot take (a token id beyond the vocabulary, a sequence too long).
    #[error("{0}")]
    Input(String),
    /// The model does not fit the machine's memory.
    #[error("{0}")]
    Memory(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What a family is trained to do; the trainer picks the collator from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Predict the next token (labels = input ids, shifted inside the model).
    CausalLm,
    /// Predict masked tokens (labels only at masked positions).
    MaskedLm,
}

impl Objective {
    /// The tokens a batch's loss averages over: the labelled positions, for a causal LM after
    /// the shift by one (the first label of each row is never a target).
    pub fn predicted_tokens(self, input: &Input<'_>) -> usize {
        let Some(labels) = input.labels else { return 0 };
        let skip = match self {
            Objective::CausalLm => 1,
            Objective::MaskedLm => 0,
        };
        labels.chunks(input.t.max(1)).map(|row| row.iter().skip(skip).filter(|&&y| y != IGNORE_INDEX).count()).sum()
    }
}

/// One batch as a model's `forward()` takes it in Hugging Face (`[b, t]` row-major).
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// Rows.
    pub b: usize,
    /// Positions per row.
    pub t: usize,
    /// Token ids.
    pub input_ids: &'a [u32],
    /// Labels as Hugging Face takes them (`-100` = no loss): a causal model shifts them itself.
    pub labels: Option<&'a [i32]>,
    /// `true` = real token, `false` = padding.
    pub attention_mask: Option<&'a [bool]>,
    /// Token-type ids.
    pub token_type_ids: Option<&'a [u32]>,
}

/// The per-family facts Hugging Face import and export need, as data.
#[derive(Clone, Copy, Debug)]
pub struct HfSpec {
    /// `architectures[0]` written into `config.json`.
    pub architecture: &'static str,
    /// Tensors Hugging Face may store that are tied to one of ours: never written, ignored when
    /// present.
    pub tied: &'static [&'static str],
    /// A name prefix older checkpoints may lack (GPT-2 from the OpenAI release: no
    /// `transformer.`).
    pub optional_prefix: Option<&'static str>,
    /// Name suffixes of non-parameter buffers Hugging Face may store (ignored).
    pub buffers: &'static [&'static str],
    /// Prefixes of our tensors that a checkpoint of the base model lacks (the task head):
    /// initialised fresh by `--init-from`.
    pub head: &'static [&'static str],
    /// Old tensor names and what they are called now (`(old suffix, new suffix)`).
    pub renames: &'static [(&'static str, &'static str)],
}

/// A family's `config.json`.
pub trait ModelConfig: Clone + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync {
    /// Check that a model can be built from it.
    fn validate(&self) -> Result<(), ModelError>;
    /// Rows of the word embeddings.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model takes.
    fn max_positions(&self) -> usize;
    /// The config as lmtrain writes it (`model_type`, `architectures` set).
    fn for_saving(&self, spec: &HfSpec) -> Self;
}

/// A model family on backend `B`.
pub trait LanguageModel<B: Backend>: Sized + Send {
    /// Its configuration.
    type Config: ModelConfig;
    /// What it is trained to do.
    const OBJECTIVE: Objective;
    /// Hugging Face naming facts.
    const HF: HfSpec;

    /// The parameter table of a configuration (the flat buffer's layout), without allocating it.
    fn param_table(config: &Self::Config) -> Result<Vec<ParamInfo>, ModelError>;
    /// A model holding `params` (laid out as [`LanguageModel::param_table`]).
    fn from_params(backend: B, config: Self::Config, params: Vec<f32>) -> Result<Self, ModelError>;
    /// The configuration.
    fn config(&self) -> &Self::Config;
    /// The backend.
    fn backend(&self) -> &B;
    /// Parameters and gradients.
    fn store(&self) -> &ParamStore<B>;
    /// The backend and the parameters and gradients, writable (an optimizer step).
    fn parts_mut(&mut self) -> (&B, &mut ParamStore<B>);
    /// Forward and backward on one batch: the mean loss over its labels (times 1) is added to
    /// `stats`, gradients ACCUMULATE. `dropout_seed: None` = eval mode.
    fn accumulate_gradients(&mut self, input: &Input<'_>, dropout_seed: Option<u64>, stats: &mut B::Stats) -> Result<(), ModelError>;
    /// Forward only (eval mode): adds `weight` times the mean loss over the labels to `stats`.
    fn accumulate_loss(&mut self, input: &Input<'_>, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError>;
    /// Logits `[b, t, vocab]` at every position (eval mode; labels unused), copied to the host.
    fn logits(&mut self, input: &Input<'_>) -> Result<Vec<f32>, ModelError>;
    /// Recompute every MLP's GELU output in the backward instead of keeping it per layer
    /// (`train --recompute`): less activation memory, the same results.
    fn set_recompute(&mut self, on: bool);

    /// Refuses, before anything is allocated, a configuration with more parameters than
    /// [`limits::MAX_PARAMS`] or whose `footprint` does not fit the machine's memory
    /// ([`limits::check_params`]).
    fn check_memory(config: &Self::Config, footprint: Footprint) -> Result<(), ModelError> {
        let table = Self::param_table(config)?;
        limits::check_params(table.last().map_or(0, |p| p.offset + p.len), footprint)
    }
    /// A randomly initialised model (Hugging Face's initialisation, seeded).
    fn new(backend: B, config: Self::Config, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        Self::check_memory(&config, Footprint::Inference)?;
        let table = Self::param_table(&config)?;
        let host = params::init_params(&table, seed);
        Self::from_params(backend, config, host)
    }
    /// Every parameter tensor.
    fn param_infos(&self) -> &[ParamInfo] {
        self.store().infos()
    }
    /// Total parameters (tied tensors counted once).
    fn num_params(&self) -> usize {
        self.store().len()
    }
    /// Set every gradient to zero.
    fn zero_grad(&mut self) -> Result<(), ModelError> {
        let (be, store) = self.parts_mut();
        store.zero_grad(be)
    }
    /// The parameters, copied to the host as f32.
    fn params_to_host(&self) -> Result<Vec<f32>, ModelError> {
        Ok(self.backend().to_host(B::view(self.store().params()))?)
    }
    /// Forward and backward on one batch, returning its mean loss (one sync; for tests and
    /// tools — the trainer reads its stats once per step instead).
    fn loss_and_gradients(&mut self, input: &Input<'_>, dropout_seed: Option<u64>) -> Result<f32, ModelError> {
        let mut stats = self.backend().new_stats()?;
        self.accumulate_gradients(input, dropout_seed, &mut stats)?;
        Ok(self.backend().read_stats(&stats)?.loss as f32)
    }
    /// The mean loss of one batch in eval mode.
    fn eval_loss(&mut self, input: &Input<'_>) -> Result<f32, ModelError> {
        let mut stats = self.backend().new_stats()?;
        self.accumulate_loss(input, &mut stats, 1.0)?;
        let StepStats { loss, .. } = self.backend().read_stats(&stats)?;
        Ok(loss as f32)
    }
}
