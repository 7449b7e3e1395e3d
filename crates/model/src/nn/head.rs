//! Output heads: the LM head tied to the word embeddings (GPT-2; with its own bias it is the BERT
//! family's decoder), fused with softmax cross-entropy, and the masked-LM head (dense -> GELU ->
//! LayerNorm -> tied decoder) that runs on the labelled rows only.

use lmtrain_backend::{Backend, GeluKind, HeadGrads, Result, Rows};

use crate::nn::layernorm::{LayerNorm, LnSaved};
use crate::nn::linear::Linear;
use crate::params::{Grads, ParamRef, Weights};

/// `logits = x · wte^T (+ bias)` with the loss fused in.
#[derive(Clone, Copy, Debug)]
pub struct TiedLmHead {
    /// The tied word embeddings `[vocab, c]`.
    pub wte: ParamRef,
    /// The decoder's own bias `[vocab]` (BERT family), if any.
    pub bias: Option<ParamRef>,
    /// Vocabulary.
    pub vocab: usize,
    /// Width.
    pub c: usize,
}

impl TiedLmHead {
    /// The logits scratch for `rows` rows.
    pub fn alloc<B: Backend>(&self, be: &B, rows: usize) -> Result<B::Buf> {
        be.alloc(rows * self.vocab)
    }

    /// Adds the mean loss over the batch's labels (times `weight`) to `stats`; with
    /// `grad = Some((dx, dloss))` also writes `dx` and accumulates the head's gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn loss<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: Option<&mut Grads<'_, B>>,
        scratch: &mut B::Buf,
        x: B::View<'_>,
        batch: &B::Batch,
        rows: Rows,
        grad: Option<(B::ViewMut<'_>, f32)>,
        stats: &mut B::Stats,
        weight: f64,
    ) -> Result<()> {
        let bias = self.bias.map(|b| w.get(b));
        let (wte, sc) = (w.get(self.wte), B::view_mut(scratch));
        match (g, grad) {
            (Some(g), Some((mut dx, dloss))) => {
                let dx = B::reborrow(&mut dx);
                let refs: Vec<ParamRef> = [Some(self.wte), self.bias].into_iter().flatten().collect();
                let mut views = g.many(&refs).into_iter();
                let dwte = views.next().expect("wte gradient");
                let dbias = views.next();
                let hg = HeadGrads { dx, dwte, dbias, dloss };
                be.lm_head_loss(sc, x, wte, bias, batch, rows, self.c, Some(hg), stats, weight)
            }
            _ => be.lm_head_loss(sc, x, wte, bias, batch, rows, self.c, None, stats, weight),
        }
    }

    /// `out = x · wte^T (+ bias)` for `rows` rows (eval logits).
    pub fn logits<B: Backend>(&self, be: &B, w: &Weights<'_, B>, out: B::ViewMut<'_>, x: B::View<'_>, rows: usize) -> Result<()> {
        let s = lmtrain_backend::GemmShape { m: rows, n: self.vocab, k: self.c, trans_a: false, trans_b: true, accumulate: false };
        let epi = match self.bias {
            Some(b) => lmtrain_backend::Epilogue::Bias(w.get(b)),
            None => lmtrain_backend::Epilogue::None,
        };
        be.gemm(out, x, w.get(self.wte), &s.into(), epi)
    }
}

/// The masked-LM head: `decoder(ln(gelu(dense(x))))` with the decoder tied to the word
/// embeddings plus a bias (`dense` may narrow the width to the embeddings', as DeBERTa's legacy
/// head with `embedding_size` does). It runs on the labelled rows only (gathered first): on ~15% of the
/// positions, which is where nearly all of a BERT step's output-head FLOPs would go.
#[derive(Clone, Copy, Debug)]
pub struct MlmHead {
    /// The transform's dense layer `[c] -> [c]`.
    pub dense: Linear,
    /// Its activation.
    pub gelu: GeluKind,
    /// The transform's LayerNorm.
    pub ln: LayerNorm,
    /// The tied decoder with its bias.
    pub decoder: TiedLmHead,
}

/// What the MLM head keeps: the transform's buffers sized for every row (the labelled ones use a
/// prefix), the `[rows, vocab]` logits scratch grown on demand to the rows a call needs, so a
/// training step holds ~15% of the full-size logits (at a 128k vocabulary, batch 8 x 128: 80 MB
/// instead of 525 MB).
pub struct MlmSaved<B: Backend> {
    sel: B::Buf,
    dsel: B::Buf,
    t: TransformSaved<B>,
}

/// The transform's activations and gradients.
struct TransformSaved<B: Backend> {
    pre: B::Buf,
    act: B::Buf,
    ln: LnSaved<B>,
    logits: B::Buf,
    dact: B::Buf,
    dpre: B::Buf,
    dln: B::Buf,
}

impl<B: Backend> MlmSaved<B> {
    /// The logits scratch (after [`MlmHead::logits`]: `[rows, vocab]`).
    pub fn logits(&self) -> &B::Buf {
        &self.t.logits
    }
}

/// Rows the logits scratch grows by (so batches with a few more labels than the last do not
/// reallocate).
const LOGIT_ROWS_STEP: usize = 64;

impl<B: Backend> TransformSaved<B> {
    /// Makes the logits scratch hold at least `rows` rows of `vocab`.
    fn reserve_logits(&mut self, be: &B, decoder: &TiedLmHead, rows: usize) -> Result<()> {
        if B::buf_len(&self.logits) < rows * decoder.vocab {
            self.logits = decoder.alloc(be, rows.next_multiple_of(LOGIT_ROWS_STEP))?;
        }
        Ok(())
    }
}

impl MlmHead {
    /// Buffers for up to `rows` rows.
    pub fn alloc<B: Backend>(&self, be: &B, rows: usize) -> Result<MlmSaved<B>> {
        let (c, e) = (self.dense.n_in, self.dense.n_out);
        let buf = |n| be.alloc(n);
        let t = TransformSaved {
            pre: buf(rows * e)?,
            act: buf(rows * e)?,
            ln: LnSaved::new(be, rows, e)?,
            logits: self.decoder.alloc(be, rows.min(LOGIT_ROWS_STEP))?,
            dact: buf(rows * e)?,
            dpre: buf(rows * e)?,
            dln: buf(rows * e)?,
        };
        Ok(MlmSaved { sel: buf(rows * c)?, dsel: buf(rows * c)?, t })
    }

    /// `ln(gelu(dense(x)))` for the `n` rows of `x`, into `t.ln.out`.
    fn transform<B: Backend>(&self, be: &B, w: &Weights<'_, B>, t: &mut TransformSaved<B>, x: B::View<'_>, n: usize) -> Result<()> {
        let e = self.dense.n_out;
        let act = B::slice_mut(B::view_mut(&mut t.act), 0, n * e);
        let pre = B::slice_mut(B::view_mut(&mut t.pre), 0, n * e);
        self.dense.forward_gelu(be, w, act, pre, x, n, self.gelu)?;
        self.ln.forward(be, w, &mut t.ln, B::slice(B::view(&t.act), 0, n * e), n)
    }

    /// Logits `[rows, vocab]` of every row of `x` into `s.logits()` (eval).
    pub fn logits<B: Backend>(&self, be: &B, w: &Weights<'_, B>, s: &mut MlmSaved<B>, x: B::View<'_>, rows: usize) -> Result<()> {
        s.t.reserve_logits(be, &self.decoder, rows)?;
        self.transform(be, w, &mut s.t, x, rows)?;
        let h = B::slice(B::view(&s.t.ln.out), 0, rows * self.dense.n_out);
        self.decoder.logits(be, w, B::view_mut(&mut s.t.logits), h, rows)
    }

    /// Adds the mean loss over the batch's labels (times `weight`) to `stats`; with
    /// `grad = Some((dx, dloss))` also accumulates `dx += d loss / d x` and the head's parameter
    /// gradients. `rows` says where the head runs: [`Rows::Labelled`] (the default of every
    /// model: `n` = the batch's label count, those rows gathered from `x`) or [`Rows::All`]
    /// (Hugging Face's way, `n` = every position; equal results, the reference for tests and
    /// benchmarks).
    #[allow(clippy::too_many_arguments)]
    pub fn loss<'a, B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: Option<&mut Grads<'_, B>>,
        s: &'a mut MlmSaved<B>,
        x: B::View<'a>,
        batch: &B::Batch,
        rows: Rows,
        n: usize,
        grad: Option<(B::ViewMut<'_>, f32)>,
        stats: &mut B::Stats,
        weight: f64,
    ) -> Result<()> {
        // c: the model's width; e: the transform's (DeBERTa's embedding size)
        let (c, e) = (self.dense.n_in, self.dense.n_out);
        let MlmSaved { sel, dsel, t } = s;
        t.reserve_logits(be, &self.decoder, n)?;
        let sel = match rows {
            Rows::Labelled => {
                be.gather_rows(B::slice_mut(B::view_mut(sel), 0, n * c), x, batch, c)?;
                B::slice(B::view(sel), 0, n * c)
            }
            Rows::All => x,
        };
        self.transform(be, w, t, sel, n)?;
        let h = B::slice(B::view(&t.ln.out), 0, n * e);
        let (Some(g), Some((mut dx, dloss))) = (g, grad) else {
            return self.decoder.loss(be, w, None, &mut t.logits, h, batch, rows, None, stats, weight);
        };
        let dln = B::slice_mut(B::view_mut(&mut t.dln), 0, n * e);
        self.decoder.loss(be, w, Some(&mut *g), &mut t.logits, h, batch, rows, Some((dln, dloss)), stats, weight)?;
        be.fill_zero(B::slice_mut(B::view_mut(&mut t.dact), 0, n * e))?;
        let (act, dln) = (B::slice(B::view(&t.act), 0, n * e), B::slice(B::view(&t.dln), 0, n * e));
        self.ln.backward(be, w, g, B::slice_mut(B::view_mut(&mut t.dact), 0, n * e), dln, act, &t.ln, n)?;
        be.fill_zero(B::slice_mut(B::view_mut(&mut t.dpre), 0, n * e))?;
        let pre = B::slice(B::view(&t.pre), 0, n * e);
        be.gelu_backward(B::slice_mut(B::view_mut(&mut t.dpre), 0, n * e), pre, B::slice(B::view(&t.dact), 0, n * e), self.gelu)?;
        let dsel_v = B::slice_mut(B::view_mut(dsel), 0, n * c);
        self.dense.backward(be, w, g, Some(dsel_v), sel, B::slice(B::view(&t.dpre), 0, n * e), n)?;
        let dsel = B::slice(B::view(dsel), 0, n * c);
        match rows {
            Rows::Labelled => be.scatter_add_rows(dx, dsel, batch, c),
            Rows::All => be.add_inplace(B::reborrow(&mut dx), dsel),
        }
    }
}
