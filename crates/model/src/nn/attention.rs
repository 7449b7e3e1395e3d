//! Multi-head self-attention: a fused q/k/v projection (one `Conv1D`, or separate `Linear`
//! layers stacked into one product), scaled dot-product attention with causal and/or
//! key-padding masks and dropout on the probabilities, and the output projection.

use lmtrain_backend::{AttnShape, Backend, Dropout, Result};

use crate::nn::linear::Linear;
use crate::params::{Grads, Weights};

/// An attention sub-layer a [`Block`](crate::nn::Block) holds: [`SelfAttention`], or DeBERTa's
/// [`DisentangledAttention`](crate::nn::DisentangledAttention). `forward` maps the block's input
/// `x` (`[bt, c]`) to the branch output before the residual dropout; `backward` overwrites `dx`
/// and accumulates the parameter gradients.
pub trait Attention: Copy + std::fmt::Debug + Send + Sync {
    /// What the forward keeps for one layer.
    type Saved<B: Backend>: Send + Sync;
    /// Backward scratch (shared by the layers of a model).
    type Scratch<B: Backend>: Send + Sync;
    /// Width.
    fn c(&self) -> usize;
    /// Buffers for a `b x t` batch.
    fn alloc<B: Backend>(&self, be: &B, b: usize, t: usize) -> Result<Self::Saved<B>>;
    /// Backward scratch for `bt` rows.
    fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<Self::Scratch<B>>;
    /// `out = attention(x)` (`out`: `[bt, c]`), dropout `d` on the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut Self::Saved<B>,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        batch: &B::Batch,
        bt: (usize, usize),
        d: Dropout,
    ) -> Result<()>;
    /// Backward from `dout` (the branch's gradient after the residual dropout).
    #[allow(clippy::too_many_arguments)]
    fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        sc: &mut Self::Scratch<B>,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        x: B::View<'_>,
        s: &Self::Saved<B>,
        batch: &B::Batch,
        bt: (usize, usize),
        d: Dropout,
    ) -> Result<()>;
}

/// The attention sub-layer.
#[derive(Clone, Copy, Debug)]
pub struct SelfAttention {
    /// `[c] -> [3c]`: q, then k, then v.
    pub qkv: Linear,
    /// `[c] -> [c]` output projection.
    pub proj: Linear,
    /// Heads.
    pub n_head: usize,
    /// Query `i` sees only keys `j <= i`.
    pub causal: bool,
}

/// What the forward keeps for one layer.
pub struct AttnSaved<B: Backend> {
    /// The fused q/k/v activation `[bt, 3c]`.
    pub qkv: B::Buf,
    /// Backend-chosen attention state (probabilities, or row log-sum-exp).
    pub state: B::AttnState,
    /// Attention output `[bt, c]`, heads concatenated (the projection's input).
    pub atty: B::Buf,
}

/// Backward scratch for the attention sub-layer.
pub struct AttnScratch<B: Backend> {
    /// `d atty` `[bt, c]`.
    pub datty: B::Buf,
    /// `d qkv` `[bt, 3c]`.
    pub dqkv: B::Buf,
}

impl SelfAttention {
    /// The op shape for a `b x t` batch.
    pub fn shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape { b, t, n_head: self.n_head, head_size: self.c() / self.n_head }
    }
}

impl Attention for SelfAttention {
    type Saved<B: Backend> = AttnSaved<B>;
    type Scratch<B: Backend> = AttnScratch<B>;

    fn c(&self) -> usize {
        self.proj.n_out
    }

    fn alloc<B: Backend>(&self, be: &B, b: usize, t: usize) -> Result<AttnSaved<B>> {
        let bt = b * t;
        Ok(AttnSaved { qkv: be.alloc(bt * 3 * self.c())?, state: be.alloc_attn_state(self.shape(b, t))?, atty: be.alloc(bt * self.c())? })
    }

    fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<AttnScratch<B>> {
        Ok(AttnScratch { datty: be.alloc(bt * self.c())?, dqkv: be.alloc(bt * 3 * self.c())? })
    }

    /// `out = proj(attention(qkv(x)))` (`out`: `[bt, c]`, before the residual dropout).
    fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut AttnSaved<B>,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        batch: &B::Batch,
        (b, t): (usize, usize),
        d: Dropout,
    ) -> Result<()> {
        let bt = b * t;
        self.qkv.forward(be, w, B::view_mut(&mut s.qkv), x, bt)?;
        be.attention_forward(B::view_mut(&mut s.atty), &mut s.state, B::view(&s.qkv), self.shape(b, t), self.causal, batch, d)?;
        self.proj.forward(be, w, out, B::view(&s.atty), bt)
    }

    /// Backward from `dout` (the branch's gradient after the residual dropout): parameter
    /// gradients accumulate, `dx` (the gradient at `x`) is overwritten.
    fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        sc: &mut AttnScratch<B>,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        x: B::View<'_>,
        s: &AttnSaved<B>,
        batch: &B::Batch,
        (b, t): (usize, usize),
        d: Dropout,
    ) -> Result<()> {
        let bt = b * t;
        self.proj.backward(be, w, g, Some(B::view_mut(&mut sc.datty)), B::view(&s.atty), dout, bt)?;
        be.fill_zero(B::view_mut(&mut sc.dqkv))?;
        let (qkv, atty) = (B::view(&s.qkv), B::view(&s.atty));
        be.attention_backward(B::view_mut(&mut sc.dqkv), B::view(&sc.datty), qkv, atty, &s.state, self.shape(b, t), self.causal, batch, d)?;
        self.qkv.backward(be, w, g, Some(dx), x, B::view(&sc.dqkv), bt)
    }
}
