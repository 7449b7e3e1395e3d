//! The feed-forward sub-layer: `proj(gelu(fc(x)))`, the GELU fused into `fc`'s epilogue.

use lmtrain_backend::{Backend, GeluKind, Result};

use crate::ModelError;

use crate::nn::linear::Linear;
use crate::params::{Grads, Weights};

/// The MLP of a transformer block.
#[derive(Clone, Copy, Debug)]
pub struct Mlp {
    /// `[c] -> [f]`.
    pub fc: Linear,
    /// `[f] -> [c]`.
    pub proj: Linear,
    /// Activation.
    pub gelu: GeluKind,
}

/// What the forward keeps for one layer.
pub struct MlpSaved<B: Backend> {
    /// Pre-activation `[bt, f]`.
    pub pre: B::Buf,
    /// `gelu(pre)` `[bt, f]` (the projection's input).
    pub act: B::Buf,
}

/// Backward scratch.
pub struct MlpScratch<B: Backend> {
    /// `d act`.
    pub dact: B::Buf,
    /// `d pre`.
    pub dpre: B::Buf,
}

impl Mlp {
    /// Buffers for `bt` rows.
    pub fn alloc<B: Backend>(&self, be: &B, bt: usize) -> Result<MlpSaved<B>> {
        Ok(MlpSaved { pre: be.alloc(bt * self.fc.n_out)?, act: be.alloc(bt * self.fc.n_out)? })
    }

    /// Backward scratch for `bt` rows.
    pub fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<MlpScratch<B>> {
        Ok(MlpScratch { dact: be.alloc(bt * self.fc.n_out)?, dpre: be.alloc(bt * self.fc.n_out)? })
    }

    /// `out = proj(gelu(fc(x)))` over `bt` rows.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut MlpSaved<B>,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        bt: usize,
    ) -> Result<()> {
        self.fc.forward_gelu(be, w, B::view_mut(&mut s.act), B::view_mut(&mut s.pre), x, bt, self.gelu)?;
        self.proj.forward(be, w, out, B::view(&s.act), bt)
    }

    /// Backward from `dout`: parameter gradients accumulate, `dx` is overwritten.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        sc: &mut MlpScratch<B>,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        x: B::View<'_>,
        s: &MlpSaved<B>,
        bt: usize,
    ) -> Result<()> {
        self.proj.backward(be, w, g, Some(B::view_mut(&mut sc.dact)), B::view(&s.act), dout, bt)?;
        be.fill_zero(B::view_mut(&mut sc.dpre))?;
        be.gelu_backward(B::view_mut(&mut sc.dpre), B::view(&s.pre), B::view(&sc.dact), self.gelu)?;
        self.fc.backward(be, w, g, Some(dx), x, B::view(&sc.dpre), bt)
    }
}

/// The GELU form of a Hugging Face activation name (`key` names the config field in the
/// error): `gelu` is the erf form, `gelu_new` / `gelu_pytorch_tanh` the tanh form.
pub fn gelu_of(name: &str, key: &str) -> std::result::Result<GeluKind, ModelError> {
    match name {
        "gelu" => Ok(GeluKind::Erf),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(GeluKind::Tanh),
        other => Err(ModelError::Config(format!("{key} {other:?} is not supported (gelu, gelu_new or gelu_pytorch_tanh)"))),
    }
}
