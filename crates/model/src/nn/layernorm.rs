//! LayerNorm over the last dimension, with the per-row statistics its backward needs.

use lmtrain_backend::{Backend, Result};

use crate::params::{Grads, Init, ParamBuilder, ParamRef, Weights};

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` per row.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    /// `weight [c]` (no weight decay, as HF Trainer).
    pub w: ParamRef,
    /// `bias [c]`.
    pub b: ParamRef,
    /// Width.
    pub c: usize,
    /// Epsilon inside the square root.
    pub eps: f32,
}

/// What a LayerNorm forward keeps: its output and the per-row statistics.
pub struct LnSaved<B: Backend> {
    /// Output `[rows, c]`.
    pub out: B::Buf,
    /// Per-row mean (f32 on every backend).
    pub mean: B::Master,
    /// Per-row `1 / std` (f32 on every backend).
    pub rstd: B::Master,
}

impl<B: Backend> LnSaved<B> {
    /// Buffers for `rows` rows of width `c`.
    pub fn new(be: &B, rows: usize, c: usize) -> Result<Self> {
        Ok(LnSaved { out: be.alloc(rows * c)?, mean: be.master_from_host(vec![0.0; rows])?, rstd: be.master_from_host(vec![0.0; rows])? })
    }
}

impl LayerNorm {
    /// Declares `weight` (ones) and `bias` (zeros) under `p`, neither decayed.
    pub fn new(p: &ParamBuilder, c: usize, eps: f64) -> Self {
        let w = p.tensor("weight", &[c], false, Init::Ones);
        let b = p.tensor("bias", &[c], false, Init::Zeros);
        LayerNorm { w, b, c, eps: eps as f32 }
    }

    /// Normalises the first `rows` rows of `x` into `s`.
    pub fn forward<B: Backend>(&self, be: &B, w: &Weights<'_, B>, s: &mut LnSaved<B>, x: B::View<'_>, rows: usize) -> Result<()> {
        let c = self.c;
        be.layernorm_forward(
            B::slice_mut(B::view_mut(&mut s.out), 0, rows * c),
            &mut s.mean,
            &mut s.rstd,
            x,
            w.get(self.w),
            w.get(self.b),
            rows,
            c,
            self.eps,
        )
    }

    /// `dx += ...`, `dweight += ...`, `dbias += ...` from `dout` and the forward's input `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        x: B::View<'_>,
        s: &LnSaved<B>,
        rows: usize,
    ) -> Result<()> {
        let (dw, db) = g.pair(self.w, self.b);
        be.layernorm_backward(dx, dw, db, dout, x, w.get(self.w), &s.mean, &s.rstd, rows, self.c)
    }
}
