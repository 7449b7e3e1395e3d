//! The layers every model family is composed of, each with its forward and backward against the
//! op interface, the activations it keeps (`*Saved`) and its backward scratch (`*Scratch`):
//!
//! | layer | file |
//! | --- | --- |
//! | [`Linear`] (`Conv1D` or `nn.Linear` layout, bias and GELU epilogues, stacked q/k/v) | `linear.rs` |
//! | [`LayerNorm`] | `layernorm.rs` |
//! | [`Embeddings`] (word + positions + token types, optional LayerNorm) | `embedding.rs` |
//! | [`SelfAttention`] (fused q/k/v, causal and/or key-padding mask) | `attention.rs` |
//! | [`DisentangledAttention`] (DeBERTa: c2c + c2p + p2c over relative positions) | `disentangled.rs` |
//! | [`Mlp`] | `mlp.rs` |
//! | [`Block`] (over any [`Attention`]) in pre-LN or post-LN [`Order`] | `block.rs` |
//! | [`TiedLmHead`] and [`MlmHead`] | `head.rs` |
//!
//! Parameters are declared by each layer's constructor through a
//! [`ParamBuilder`](crate::params::ParamBuilder) path; a model is a short composition.

pub mod attention;
pub mod block;
pub mod disentangled;
pub mod embedding;
pub mod head;
pub mod layernorm;
pub mod linear;
pub mod mlp;

pub use attention::{Attention, SelfAttention};
pub use block::{Block, Order};
pub use disentangled::DisentangledAttention;
pub use embedding::Embeddings;
pub use head::{MlmHead, TiedLmHead};
pub use layernorm::LayerNorm;
pub use linear::{Layout, Linear};
pub use mlp::Mlp;

use lmtrain_backend::{Dropout, mix_seed};

/// The dropout masks of one forward/backward pass: `None` = eval mode (no dropout); with a seed
/// each site's mask is a pure function of (seed, site id, element index), so backward redraws
/// the forward's masks and a resumed run draws the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropouts(pub Option<u64>);

impl Dropouts {
    /// The dropout of site `id` with probability `p`.
    pub fn site(&self, id: u64, p: f32) -> Dropout {
        match self.0 {
            Some(s) if p > 0.0 => Dropout { p, seed: mix_seed(s, id) },
            _ => Dropout::NONE,
        }
    }
}
