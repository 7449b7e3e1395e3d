//! A transformer block in pre-LN (GPT-2: `x + attn(ln(x))`, then `+ mlp(ln(.))`) or post-LN
//! (BERT: `ln(x + attn(x))`, then `ln(. + mlp(.))`) order, with dropout after each branch.

use lmtrain_backend::{Backend, Result};

use crate::nn::Dropouts;
use crate::nn::attention::{Attention, SelfAttention};
use crate::nn::layernorm::{LayerNorm, LnSaved};
use crate::nn::mlp::{Mlp, MlpSaved, MlpScratch};
use crate::params::{Grads, Weights};

/// Where the LayerNorms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// LayerNorm before each branch, the residual stream un-normalised (GPT-2).
    PreLn,
    /// LayerNorm after each residual sum (BERT family).
    PostLn,
}

/// One transformer block with attention `A`.
#[derive(Clone, Copy, Debug)]
pub struct Block<A: Attention = SelfAttention> {
    /// LayerNorm order.
    pub order: Order,
    /// Pre-LN: before attention. Post-LN: after the attention residual.
    pub ln1: LayerNorm,
    /// Self-attention.
    pub attn: A,
    /// Pre-LN: before the MLP. Post-LN: after the MLP residual.
    pub ln2: LayerNorm,
    /// Feed-forward.
    pub mlp: Mlp,
    /// Dropout on the attention probabilities.
    pub attn_pdrop: f32,
    /// Dropout after the attention branch and after the MLP branch (DistilBERT has none after
    /// attention).
    pub resid_pdrop: [f32; 2],
    /// Dropout site ids: attention probabilities, attention branch, MLP branch.
    pub sites: [u64; 3],
}

/// What the forward keeps for one block.
pub struct BlockSaved<B: Backend, A: Attention = SelfAttention> {
    ln1: LnSaved<B>,
    attn: A::Saved<B>,
    res_attn: B::Buf,
    ln2: LnSaved<B>,
    mlp: MlpSaved<B>,
    res_mlp: B::Buf,
}

/// Scratch shared by every block of a model (forward branch outputs and backward gradients).
pub struct BlockScratch<B: Backend, A: Attention = SelfAttention> {
    tmp: B::Buf,
    dln: B::Buf,
    dr: B::Buf,
    attn: A::Scratch<B>,
    mlp: MlpScratch<B>,
}

impl<B: Backend, A: Attention> BlockScratch<B, A> {
    /// The branch buffer `[bt, c]` (free between block calls).
    pub fn tmp(&mut self) -> &mut B::Buf {
        &mut self.tmp
    }
    /// The attention's scratch (what its backward left there).
    pub fn attn(&mut self) -> &mut A::Scratch<B> {
        &mut self.attn
    }
}

impl<B: Backend, A: Attention> BlockSaved<B, A> {
    /// What the attention keeps (a model may set inputs there before the forward).
    pub fn attn_mut(&mut self) -> &mut A::Saved<B> {
        &mut self.attn
    }
}

impl<A: Attention> Block<A> {
    /// Buffers for a `b x t` batch.
    pub fn alloc<B: Backend>(&self, be: &B, b: usize, t: usize) -> Result<BlockSaved<B, A>> {
        let (bt, c) = (b * t, self.attn.c());
        Ok(BlockSaved {
            ln1: LnSaved::new(be, bt, c)?,
            attn: self.attn.alloc(be, b, t)?,
            res_attn: be.alloc(bt * c)?,
            ln2: LnSaved::new(be, bt, c)?,
            mlp: self.mlp.alloc(be, bt)?,
            res_mlp: be.alloc(bt * c)?,
        })
    }

    /// Scratch for `bt` rows.
    pub fn alloc_scratch<B: Backend>(&self, be: &B, bt: usize) -> Result<BlockScratch<B, A>> {
        let c = self.attn.c();
        Ok(BlockScratch {
            tmp: be.alloc(bt * c)?,
            dln: be.alloc(bt * c)?,
            dr: be.alloc(bt * c)?,
            attn: self.attn.alloc_scratch(be, bt)?,
            mlp: self.mlp.alloc_scratch(be, bt)?,
        })
    }

    /// The block's output after [`Block::forward`].
    pub fn output<'s, B: Backend>(&self, s: &'s BlockSaved<B, A>) -> B::View<'s> {
        match self.order {
            Order::PreLn => B::view(&s.res_mlp),
            Order::PostLn => B::view(&s.ln2.out),
        }
    }

    /// Forward over `x` (`[b*t, c]`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        s: &mut BlockSaved<B, A>,
        sc: &mut BlockScratch<B, A>,
        x: B::View<'_>,
        batch: &B::Batch,
        bt: (usize, usize),
        drop: &Dropouts,
    ) -> Result<()> {
        let rows = bt.0 * bt.1;
        let [site_p, site_a, site_m] = self.sites;
        let pre = self.order == Order::PreLn;
        if pre {
            self.ln1.forward(be, w, &mut s.ln1, x, rows)?;
        }
        let d = drop.site(site_p, self.attn_pdrop);
        if pre {
            self.attn.forward(be, w, &mut s.attn, B::view_mut(&mut sc.tmp), B::view(&s.ln1.out), batch, bt, d)?;
        } else {
            self.attn.forward(be, w, &mut s.attn, B::view_mut(&mut sc.tmp), x, batch, bt, d)?;
        }
        be.dropout_inplace(B::view_mut(&mut sc.tmp), drop.site(site_a, self.resid_pdrop[0]))?;
        be.residual_forward(B::view_mut(&mut s.res_attn), x, B::view(&sc.tmp))?;
        // the MLP's input: ln2(res_attn) before, ln1(res_attn) after
        let (mlp_ln, mlp_ln_saved) = if pre { (&self.ln2, &mut s.ln2) } else { (&self.ln1, &mut s.ln1) };
        mlp_ln.forward(be, w, mlp_ln_saved, B::view(&s.res_attn), rows)?;
        let mlp_in = B::view(if pre { &s.ln2.out } else { &s.ln1.out });
        self.mlp.forward(be, w, &mut s.mlp, Some(&mut sc.mlp), B::view_mut(&mut sc.tmp), mlp_in, rows)?;
        be.dropout_inplace(B::view_mut(&mut sc.tmp), drop.site(site_m, self.resid_pdrop[1]))?;
        let skip = if pre { B::view(&s.res_attn) } else { B::view(&s.ln1.out) };
        be.residual_forward(B::view_mut(&mut s.res_mlp), skip, B::view(&sc.tmp))?;
        if !pre {
            self.ln2.forward(be, w, &mut s.ln2, B::view(&s.res_mlp), rows)?;
        }
        Ok(())
    }

    /// Backward: `dres` holds the gradient at the block's output and receives the gradient at
    /// its input `x`; parameter gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        s: &BlockSaved<B, A>,
        sc: &mut BlockScratch<B, A>,
        mut dres: B::ViewMut<'_>,
        x: B::View<'_>,
        batch: &B::Batch,
        bt: (usize, usize),
        drop: &Dropouts,
    ) -> Result<()> {
        let rows = bt.0 * bt.1;
        let [site_p, site_a, site_m] = self.sites;
        let BlockScratch { tmp, dln, dr, attn: attn_sc, mlp: mlp_sc } = sc;
        match self.order {
            Order::PreLn => {
                // res_mlp = res_attn + drop(mlp(ln2(res_attn))): dres is already the skip share
                be.copy(B::view_mut(tmp), B::as_view(&dres))?;
                be.dropout_inplace(B::view_mut(tmp), drop.site(site_m, self.resid_pdrop[1]))?;
                self.mlp.backward(be, w, g, mlp_sc, B::view_mut(dln), B::view(tmp), B::view(&s.ln2.out), &s.mlp, rows)?;
                self.ln2.backward(be, w, g, B::reborrow(&mut dres), B::view(dln), B::view(&s.res_attn), &s.ln2, rows)?;
                // res_attn = x + drop(attn(ln1(x)))
                be.copy(B::view_mut(tmp), B::as_view(&dres))?;
                be.dropout_inplace(B::view_mut(tmp), drop.site(site_a, self.resid_pdrop[0]))?;
                let d = drop.site(site_p, self.attn_pdrop);
                self.attn.backward(be, w, g, attn_sc, B::view_mut(dln), B::view(tmp), B::view(&s.ln1.out), &s.attn, batch, bt, d)?;
                self.ln1.backward(be, w, g, dres, B::view(dln), x, &s.ln1, rows)
            }
            Order::PostLn => {
                // out = ln2(res_mlp), res_mlp = h + drop(mlp(h)), h = ln1(res_attn)
                be.fill_zero(B::view_mut(dr))?;
                self.ln2.backward(be, w, g, B::view_mut(dr), B::as_view(&dres), B::view(&s.res_mlp), &s.ln2, rows)?;
                be.copy(B::reborrow(&mut dres), B::view(dr))?;
                be.copy(B::view_mut(tmp), B::view(dr))?;
                be.dropout_inplace(B::view_mut(tmp), drop.site(site_m, self.resid_pdrop[1]))?;
                self.mlp.backward(be, w, g, mlp_sc, B::view_mut(dln), B::view(tmp), B::view(&s.ln1.out), &s.mlp, rows)?;
                be.add_inplace(B::reborrow(&mut dres), B::view(dln))?;
                // h = ln1(res_attn), res_attn = x + drop(attn(x))
                be.fill_zero(B::view_mut(dr))?;
                self.ln1.backward(be, w, g, B::view_mut(dr), B::as_view(&dres), B::view(&s.res_attn), &s.ln1, rows)?;
                be.copy(B::reborrow(&mut dres), B::view(dr))?;
                be.copy(B::view_mut(tmp), B::view(dr))?;
                be.dropout_inplace(B::view_mut(tmp), drop.site(site_a, self.resid_pdrop[0]))?;
                let d = drop.site(site_p, self.attn_pdrop);
                self.attn.backward(be, w, g, attn_sc, B::view_mut(dln), B::view(tmp), x, &s.attn, batch, bt, d)?;
                be.add_inplace(dres, B::view(dln))
            }
        }
    }
}

/// Per-call buffers of [`Block::forward_cached`] for `n` new positions.
pub struct CachedScratch<B: Backend> {
    ln: LnSaved<B>,
    qkv: B::Buf,
    q: B::Buf,
    atty: B::Buf,
    tmp: B::Buf,
    mlp: MlpSaved<B>,
}

impl Block<SelfAttention> {
    /// Buffers for [`Block::forward_cached`] over `n` positions.
    pub fn alloc_cached<B: Backend>(&self, be: &B, n: usize) -> Result<CachedScratch<B>> {
        let c = self.attn.c();
        Ok(CachedScratch {
            ln: LnSaved::new(be, n, c)?,
            qkv: be.alloc(n * 3 * c)?,
            q: be.alloc(n * c)?,
            atty: be.alloc(n * c)?,
            tmp: be.alloc(n * c)?,
            mlp: self.mlp.alloc_keeping(be, n)?,
        })
    }

    /// Incremental decoding (pre-LN, causal, batch 1, eval mode): `x` (`[n, c]`) holds the new
    /// positions `start..start + n` and is updated in place to the block's output; their keys and
    /// values are appended to `k_cache` / `v_cache` (`[max_len, c]`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        sc: &mut CachedScratch<B>,
        mut x: B::ViewMut<'_>,
        k_cache: &mut B::Buf,
        v_cache: &mut B::Buf,
        start: usize,
        n: usize,
    ) -> Result<()> {
        debug_assert_eq!(self.order, Order::PreLn, "only decoders decode incrementally");
        let c = self.attn.c();
        self.ln1.forward(be, w, &mut sc.ln, B::as_view(&x), n)?;
        self.attn.qkv.forward(be, w, B::view_mut(&mut sc.qkv), B::view(&sc.ln.out), n)?;
        for i in 0..n {
            let row = |part: usize| B::slice(B::view(&sc.qkv), i * 3 * c + part * c, c);
            be.copy(B::slice_mut(B::view_mut(&mut sc.q), i * c, c), row(0))?;
            be.copy(B::slice_mut(B::view_mut(k_cache), (start + i) * c, c), row(1))?;
            be.copy(B::slice_mut(B::view_mut(v_cache), (start + i) * c, c), row(2))?;
        }
        let (h, hs) = (self.attn.n_head, c / self.attn.n_head);
        be.attention_cached(B::view_mut(&mut sc.atty), B::view(&sc.q), B::view(k_cache), B::view(v_cache), start, n, h, hs)?;
        self.attn.proj.forward(be, w, B::view_mut(&mut sc.tmp), B::view(&sc.atty), n)?;
        be.add_inplace(B::reborrow(&mut x), B::view(&sc.tmp))?;
        self.ln2.forward(be, w, &mut sc.ln, B::as_view(&x), n)?;
        self.mlp.forward(be, w, &mut sc.mlp, None, B::view_mut(&mut sc.tmp), B::view(&sc.ln.out), n)?;
        be.add_inplace(x, B::view(&sc.tmp))
    }
}
