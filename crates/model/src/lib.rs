//! lmtrain-model: transformer language models with hand-written forward and backward passes,
//! written once against the [`lmtrain_backend::Backend`] op interface.
//!
//! Parameters live in ONE flat buffer; [`ParamInfo`] names each tensor's view of it with its
//! Hugging Face name, so checkpoints map 1:1 onto `model.safetensors` and the optimizer can treat
//! the model as a single vector. Gradients live in a second buffer of the same layout and
//! ACCUMULATE across `forward_backward` calls.

pub mod gpt2;

/// One named tensor inside a model's flat parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// Hugging Face parameter name (e.g. `transformer.h.0.attn.c_attn.weight`).
    pub name: String,
    /// Shape as Hugging Face stores it.
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements (product of `shape`).
    pub len: usize,
    /// Whether weight decay applies (false for biases and LayerNorm weights, as HF Trainer).
    pub decay: bool,
}

/// Invalid model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A size or option the model cannot be built with.
    #[error("invalid config: {0}")]
    Config(String),
}
