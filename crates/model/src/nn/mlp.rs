//! The feed-forward sub-layer: `proj(gelu(fc(x)))`, the GELU fused into `fc`'s epilogue.

use lmtrain_backend::{Backend, BackendError, GeluKind, Result};

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
    /// Keep no GELU output per layer: the backward recomputes `gelu(pre)` into the scratch
    /// shared by every layer (llm.c's `recompute`), saving `bt * f` elements per layer for one
    /// GELU per layer more. The results are the same bits.
    pub recompute: bool,
}

/// What the forward keeps for one layer.
pub struct MlpSaved<B: Backend> {
    /// Pre-activation `[bt, f]`.
    pub pre: B::Buf,
    /// `gelu(pre)` `[bt, f]` (the projection's input); `None` when it is recomputed.
    pub act: Option<B::Buf>,
}

/// Scratch shared by every layer.
pub struct MlpScratch<B: Backend> {
    /// `d act`.
    pub dact: B::Buf,
    /// `d pre`.
    pub dpre: B::Buf,
    /// `gelu(pre)` of the layer at hand, when the layers keep none.
    pub act: Option<B::Buf>,
}

impl Mlp {
    /// Buffers for `bt` rows.
    pub fn alloc<B: Backend>(&self, be: &B, bt: usize) -> Result<MlpSaved<B>> {
        let f = bt * self.fc.n_out;
        Ok(MlpSaved { pre: be.alloc(f)?, act: (!self.recompute).then(|| be.alloc(f)).transpose()? })
    }

    /// Buffers for `bt` rows that keep the GELU output whatever [`Mlp::recompute`] says (one-off
    /// forward passes with no scratch, such as incremental decoding).
    pub fn alloc_keeping<B: Backend>(&self, be: &B, bt: usize) -> Result<MlpSaved<B>> {
        Ok(MlpSaved { pre: be.alloc(bt * self.fc.n_out)?, act: Some(be.alloc(bt * self.fc.n_out)?) })
    }

    /// Scratch for `bt` rows.
    pub fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<MlpScratch<B>> {
        let f = bt * self.fc.n_out;
        Ok(MlpScratch { dact: be.alloc(f)?, dpre: be.alloc(f)?, act: self.recompute.then(|| be.alloc(f)).transpose()? })
    }

    /// `out = proj(gelu(fc(x)))` over `bt` rows; the GELU output goes to `s`, or to the shared
    /// scratch `sc` when `s` keeps none.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut MlpSaved<B>,
        sc: Option<&mut MlpScratch<B>>,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        bt: usize,
    ) -> Result<()> {
        let act = match (s.act.as_mut(), sc.and_then(|sc| sc.act.as_mut())) {
            (Some(act), _) | (None, Some(act)) => act,
            (None, None) => return Err(BackendError("mlp: neither the layer nor the scratch holds the GELU output".into())),
        };
        self.fc.forward_gelu(be, w, B::view_mut(act), B::view_mut(&mut s.pre), x, bt, self.gelu)?;
        self.proj.forward(be, w, out, B::view(act), bt)
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
        let MlpScratch { dact, dpre, act: shared } = sc;
        let act = match (&s.act, shared) {
            (Some(act), _) => B::view(act),
            (None, Some(act)) => {
                // the same op the forward's epilogue applies, so the same bits
                be.gelu_forward(B::view_mut(act), B::view(&s.pre), self.gelu)?;
                B::view(act)
            }
            (None, None) => return Err(BackendError("mlp: neither the layer nor the scratch holds the GELU output".into())),
        };
        self.proj.backward(be, w, g, Some(B::view_mut(dact)), act, dout, bt)?;
        be.fill_zero(B::view_mut(dpre))?;
        be.gelu_backward(B::view_mut(dpre), B::view(&s.pre), B::view(dact), self.gelu)?;
        self.fc.backward(be, w, g, Some(dx), x, B::view(dpre), bt)
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
