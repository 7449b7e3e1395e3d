//! DeBERTa's disentangled self-attention: q/k/v projections (stacked into one product), the
//! content-to-content scores plus the content-to-position (`c2p`, keys projected from the
//! relative embeddings) and position-to-content (`p2c`, queries projected from them) terms over
//! the relative positions, and the output projection.
//!
//! The relative embeddings each layer sees (the model's table after its LayerNorm and this
//! layer's dropout) are an input the model writes into [`DisentangledSaved::rel_mut`] before the
//! forward; the backward leaves their gradient in [`DisentangledScratch::drel`].

use lmtrain_backend::{AttnShape, Backend, DisentangledShape, Dropout, RelPositions, Result};

use crate::nn::attention::Attention;
use crate::nn::linear::Linear;
use crate::params::{Grads, Weights};

/// The disentangled attention sub-layer.
#[derive(Clone, Copy, Debug)]
pub struct DisentangledAttention {
    /// `[c] -> [3c]`: `query_proj`, `key_proj`, `value_proj`.
    pub qkv: Linear,
    /// `attention.output.dense`.
    pub proj: Linear,
    /// Heads.
    pub n_head: usize,
    /// The c2p term's key projection of the relative embeddings (`pos_key_proj`, or `key_proj`
    /// with `share_att_key`); `None`: no c2p term.
    pub pos_key: Option<Linear>,
    /// The p2c term's query projection (`pos_query_proj`, or `query_proj`); `None`: no p2c.
    pub pos_query: Option<Linear>,
    /// Relative positions; `None` without `relative_attention` (no position terms).
    pub rel: Option<RelPositions>,
    /// `1 +` the position terms `pos_att_type` names.
    pub scale_factor: usize,
}

/// What the forward keeps for one layer.
pub struct DisentangledSaved<B: Backend> {
    qkv: B::Buf,
    state: B::AttnState,
    atty: B::Buf,
    rel: B::Buf,
    kr: Option<B::Buf>,
    qr: Option<B::Buf>,
}

impl<B: Backend> DisentangledSaved<B> {
    /// The relative embeddings `[2 * span, c]` this layer attends with (set before the forward).
    pub fn rel_mut(&mut self) -> &mut B::Buf {
        &mut self.rel
    }
}

/// Backward scratch.
pub struct DisentangledScratch<B: Backend> {
    datty: B::Buf,
    dqkv: B::Buf,
    dkr: Option<B::Buf>,
    dqr: Option<B::Buf>,
    drel: B::Buf,
    drel_q: B::Buf,
}

impl<B: Backend> DisentangledScratch<B> {
    /// The gradient of the layer's relative embeddings after the backward.
    pub fn drel(&mut self) -> &mut B::Buf {
        &mut self.drel
    }
}

impl DisentangledAttention {
    /// Rows of the relative-embedding table (0 without relative attention).
    pub fn rel_rows(&self) -> usize {
        self.rel.map_or(0, |r| 2 * r.span)
    }

    fn shape(&self, b: usize, t: usize) -> DisentangledShape {
        let attn = AttnShape { b, t, n_head: self.n_head, head_size: self.c() / self.n_head };
        // without relative attention no position term is computed: the positions are unused
        let rel = self.rel.unwrap_or(RelPositions { span: 0, buckets: 0, max_position: 0 });
        DisentangledShape { attn, rel, scale_factor: self.scale_factor }
    }
}

impl Attention for DisentangledAttention {
    type Saved<B: Backend> = DisentangledSaved<B>;
    type Scratch<B: Backend> = DisentangledScratch<B>;

    fn c(&self) -> usize {
        self.proj.n_out
    }

    fn alloc<B: Backend>(&self, be: &B, b: usize, t: usize) -> Result<DisentangledSaved<B>> {
        let (bt, c, rows) = (b * t, self.c(), self.rel_rows());
        Ok(DisentangledSaved {
            qkv: be.alloc(bt * 3 * c)?,
            state: be.alloc_disentangled_state(self.shape(b, t))?,
            atty: be.alloc(bt * c)?,
            rel: be.alloc(rows * c)?,
            kr: self.pos_key.map(|_| be.alloc(rows * c)).transpose()?,
            qr: self.pos_query.map(|_| be.alloc(rows * c)).transpose()?,
        })
    }

    fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<DisentangledScratch<B>> {
        let (c, rows) = (self.c(), self.rel_rows());
        Ok(DisentangledScratch {
            datty: be.alloc(bt * c)?,
            dqkv: be.alloc(bt * 3 * c)?,
            dkr: self.pos_key.map(|_| be.alloc(rows * c)).transpose()?,
            dqr: self.pos_query.map(|_| be.alloc(rows * c)).transpose()?,
            drel: be.alloc(rows * c)?,
            drel_q: be.alloc(rows * c)?,
        })
    }

    fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut DisentangledSaved<B>,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        batch: &B::Batch,
        (b, t): (usize, usize),
        d: Dropout,
    ) -> Result<()> {
        let (bt, rows) = (b * t, self.rel_rows());
        self.qkv.forward(be, w, B::view_mut(&mut s.qkv), x, bt)?;
        for (lin, buf) in [(self.pos_key, &mut s.kr), (self.pos_query, &mut s.qr)] {
            if let (Some(lin), Some(buf)) = (lin, buf) {
                lin.forward(be, w, B::view_mut(buf), B::view(&s.rel), rows)?;
            }
        }
        let (kr, qr) = (s.kr.as_ref().map(B::view), s.qr.as_ref().map(B::view));
        be.disentangled_attention_forward(B::view_mut(&mut s.atty), &mut s.state, B::view(&s.qkv), kr, qr, self.shape(b, t), batch, d)?;
        self.proj.forward(be, w, out, B::view(&s.atty), bt)
    }

    fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        sc: &mut DisentangledScratch<B>,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        x: B::View<'_>,
        s: &DisentangledSaved<B>,
        batch: &B::Batch,
        (b, t): (usize, usize),
        d: Dropout,
    ) -> Result<()> {
        let (bt, rows) = (b * t, self.rel_rows());
        self.proj.backward(be, w, g, Some(B::view_mut(&mut sc.datty)), B::view(&s.atty), dout, bt)?;
        be.fill_zero(B::view_mut(&mut sc.dqkv))?;
        for buf in [&mut sc.dkr, &mut sc.dqr].into_iter().flatten() {
            be.fill_zero(B::view_mut(buf))?;
        }
        let (kr, qr) = (s.kr.as_ref().map(B::view), s.qr.as_ref().map(B::view));
        let (dkr, dqr) = (sc.dkr.as_mut().map(B::view_mut), sc.dqr.as_mut().map(B::view_mut));
        let shape = self.shape(b, t);
        be.disentangled_attention_backward(
            B::view_mut(&mut sc.dqkv),
            dkr,
            dqr,
            B::view(&sc.datty),
            B::view(&s.qkv),
            kr,
            qr,
            &s.state,
            shape,
            batch,
            d,
        )?;
        self.qkv.backward(be, w, g, Some(dx), x, B::view(&sc.dqkv), bt)?;
        // the relative embeddings' gradient: through the key projection, then the query one
        be.fill_zero(B::view_mut(&mut sc.drel))?;
        if let (Some(lin), Some(dkr)) = (self.pos_key, &sc.dkr) {
            lin.backward(be, w, g, Some(B::view_mut(&mut sc.drel)), B::view(&s.rel), B::view(dkr), rows)?;
        }
        if let (Some(lin), Some(dqr)) = (self.pos_query, &sc.dqr) {
            lin.backward(be, w, g, Some(B::view_mut(&mut sc.drel_q)), B::view(&s.rel), B::view(dqr), rows)?;
            be.add_inplace(B::view_mut(&mut sc.drel), B::view(&sc.drel_q))?;
        }
        Ok(())
    }
}
