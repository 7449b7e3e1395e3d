//! Input embeddings: word + optional absolute positions + optional token types, then an optional
//! LayerNorm (BERT family) and dropout.

use lmtrain_backend::{Backend, Dropout, EmbeddingTables, PaddingIdx, Result};

use crate::nn::layernorm::{LayerNorm, LnSaved};
use crate::params::{Grads, ParamRef, Weights};

/// The embedding layer of a model.
#[derive(Clone, Copy, Debug)]
pub struct Embeddings {
    /// Word embeddings `[vocab, c]` (also the tied output head's weight).
    pub word: ParamRef,
    /// Position embeddings `[positions, c]`.
    pub position: Option<ParamRef>,
    /// Token-type embeddings `[types, c]`.
    pub token_type: Option<ParamRef>,
    /// LayerNorm after the sum.
    pub ln: Option<LayerNorm>,
    /// Rows whose gradient the lookup backward skips (`padding_idx`).
    pub padding: PaddingIdx,
    /// Width.
    pub c: usize,
}

/// What the forward keeps.
pub struct EmbSaved<B: Backend> {
    /// The sum of the tables (the output when there is no LayerNorm).
    sum: B::Buf,
    ln: Option<LnSaved<B>>,
}

impl<B: Backend> EmbSaved<B> {
    /// The layer's output (after dropout).
    pub fn out(&self) -> B::View<'_> {
        B::view(self.ln.as_ref().map_or(&self.sum, |l| &l.out))
    }
}

impl Embeddings {
    fn refs(&self) -> Vec<ParamRef> {
        [Some(self.word), self.position, self.token_type].into_iter().flatten().collect()
    }

    /// Buffers for `rows` positions.
    pub fn alloc<B: Backend>(&self, be: &B, rows: usize) -> Result<EmbSaved<B>> {
        let ln = self.ln.map(|_| LnSaved::new(be, rows, self.c)).transpose()?;
        Ok(EmbSaved { sum: be.alloc(rows * self.c)?, ln })
    }

    /// Embeds the batch into `s` (`rows = b * t`), dropout `d` on the output.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut EmbSaved<B>,
        batch: &B::Batch,
        rows: usize,
        d: Dropout,
    ) -> Result<()> {
        let tables = EmbeddingTables {
            word: w.get(self.word),
            position: self.position.map(|r| w.get(r)),
            token_type: self.token_type.map(|r| w.get(r)),
        };
        be.embedding_forward(B::view_mut(&mut s.sum), tables, batch, self.c)?;
        match (&self.ln, &mut s.ln) {
            (Some(ln), Some(saved)) => {
                ln.forward(be, w, saved, B::view(&s.sum), rows)?;
                be.dropout_inplace(B::view_mut(&mut saved.out), d)
            }
            _ => be.dropout_inplace(B::view_mut(&mut s.sum), d),
        }
    }

    /// Backward from `dout` (the gradient at the output, consumed: dropout is applied to it in
    /// place) into the tables' gradients; `dsum` is scratch of `rows * c` when there is a
    /// LayerNorm.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        mut dout: B::ViewMut<'_>,
        mut dsum: B::ViewMut<'_>,
        s: &EmbSaved<B>,
        batch: &B::Batch,
        rows: usize,
        d: Dropout,
    ) -> Result<()> {
        be.dropout_inplace(B::reborrow(&mut dout), d)?;
        let dsum: B::View<'_> = match (&self.ln, &s.ln) {
            (Some(ln), Some(saved)) => {
                be.fill_zero(B::reborrow(&mut dsum))?;
                ln.backward(be, w, g, B::reborrow(&mut dsum), B::as_view(&dout), B::view(&s.sum), saved, rows)?;
                B::as_view(&dsum)
            }
            _ => B::as_view(&dout),
        };
        let mut views = g.many(&self.refs()).into_iter();
        let word = views.next().expect("word table");
        let position = self.position.map(|_| views.next().expect("position table"));
        let token_type = self.token_type.map(|_| views.next().expect("token-type table"));
        be.embedding_backward(EmbeddingTables { word, position, token_type }, dsum, batch, self.c, self.padding)
    }
}
