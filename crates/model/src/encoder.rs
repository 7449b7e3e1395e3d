//! The BERT family's masked LM, written once: embeddings (word + positions + token types,
//! LayerNorm, dropout) -> post-LN blocks (no causal mask, key padding from `attention_mask`) ->
//! the MLM head on the labelled rows only. A family ([`bert`](crate::bert),
//! [`distilbert`](crate::distilbert)) is its config: names, sizes and quirks declared through an
//! [`EncoderConfig`].

use lmtrain_backend::{Backend, HostBatch, Rows};

use crate::nn::block::{BlockSaved, BlockScratch};
use crate::nn::embedding::EmbSaved;
use crate::nn::head::MlmSaved;
use crate::nn::{Block, Dropouts, Embeddings, MlmHead};
use crate::params::{ParamInfo, ParamStore};
use crate::{HfSpec, IGNORE_INDEX, Input, LanguageModel, ModelConfig, ModelError, Objective};

/// The layers of an encoder masked LM.
#[derive(Clone, Debug)]
pub struct EncoderLayers {
    /// Input embeddings (with their LayerNorm).
    pub emb: Embeddings,
    /// Post-LN blocks.
    pub blocks: Vec<Block>,
    /// The masked-LM head.
    pub head: MlmHead,
    /// Dropout after the embeddings.
    pub emb_pdrop: f32,
}

/// What a BERT-family config provides beyond [`ModelConfig`].
pub trait EncoderConfig: ModelConfig {
    /// Hugging Face naming facts of the family.
    const HF: HfSpec;
    /// Declares the parameters (Hugging Face names) and composes the layers.
    fn declare(&self) -> Result<(EncoderLayers, Vec<ParamInfo>), ModelError>;
    /// Rows of the token-type table (0: the family has none).
    fn type_vocab_size(&self) -> usize;
    /// Rows of the position table (position ids must stay below it).
    fn position_rows(&self) -> usize {
        self.max_positions()
    }
    /// Position ids the model derives from the input ids (RoBERTa), or `None` for `0..t`.
    fn position_ids(&self, _ids: &[u32], _b: usize, _t: usize) -> Option<Vec<u32>> {
        None
    }
}

/// The lookup tables a batch's ids must stay inside.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TableSizes {
    /// Rows of the word embeddings.
    pub vocab: usize,
    /// Rows of the position table (or the longest sequence).
    pub positions: usize,
    /// Rows of the token-type table (0: none).
    pub token_types: usize,
}

/// Checks and uploads a masked-LM batch (labels are the targets: no shift), with the token
/// types and position ids the model uses; returns it with its label count.
pub(crate) fn upload_masked<B: Backend>(
    be: &B,
    input: &Input<'_>,
    with_labels: bool,
    token_type_ids: Option<&[u32]>,
    position_ids: Option<&[u32]>,
    sizes: TableSizes,
) -> Result<(B::Batch, usize), ModelError> {
    let labels = if with_labels { Some(input.labels.ok_or_else(|| ModelError::Input("a loss needs labels".into()))?) } else { None };
    let host = HostBatch {
        b: input.b,
        t: input.t,
        input_ids: input.input_ids,
        targets: labels,
        attention_mask: input.attention_mask,
        token_type_ids,
        position_ids,
    };
    host.validate(sizes.vocab, sizes.positions, sizes.token_types).map_err(|e| ModelError::Input(e.0))?;
    let n_labels = labels.map_or(0, |l| l.iter().filter(|&&y| y != IGNORE_INDEX).count());
    Ok((be.upload_batch(&host)?, n_labels))
}

/// Activations of one `(b, t)` shape.
struct Acts<B: Backend> {
    b: usize,
    t: usize,
    emb: EmbSaved<B>,
    blocks: Vec<BlockSaved<B>>,
    head: MlmSaved<B>,
    scratch: BlockScratch<B>,
    dres: B::Buf,
    dsum: B::Buf,
}

/// A BERT-family masked LM on backend `B`.
pub struct MaskedLm<B: Backend, C: EncoderConfig> {
    config: C,
    layers: EncoderLayers,
    backend: B,
    store: ParamStore<B>,
    acts: Option<Acts<B>>,
    head_rows: Rows,
}

impl<B: Backend, C: EncoderConfig> LanguageModel<B> for MaskedLm<B, C> {
    type Config = C;
    const OBJECTIVE: Objective = Objective::MaskedLm;
    const HF: HfSpec = C::HF;

    fn param_table(config: &C) -> Result<Vec<ParamInfo>, ModelError> {
        Ok(config.declare()?.1)
    }

    fn from_params(backend: B, config: C, params: Vec<f32>) -> Result<Self, ModelError> {
        config.validate()?;
        let (layers, infos) = config.declare()?;
        let store = ParamStore::new(&backend, infos, params)?;
        Ok(MaskedLm { config, layers, backend, store, acts: None, head_rows: Rows::Labelled })
    }

    fn config(&self) -> &C {
        &self.config
    }
    fn backend(&self) -> &B {
        &self.backend
    }
    fn store(&self) -> &ParamStore<B> {
        &self.store
    }
    fn parts_mut(&mut self) -> (&B, &mut ParamStore<B>) {
        (&self.backend, &mut self.store)
    }

    fn accumulate_gradients(&mut self, input: &Input<'_>, dropout_seed: Option<u64>, stats: &mut B::Stats) -> Result<(), ModelError> {
        let (batch, n_labels) = self.upload(input, true)?;
        let drop = Dropouts(dropout_seed);
        self.forward(&batch, input.b, input.t, &drop)?;
        if n_labels == 0 {
            // nothing to learn from: a NaN loss as Hugging Face, gradients untouched
            return self.head_loss(&batch, 0, stats, 1.0);
        }
        self.backward(&batch, input.b, input.t, n_labels, &drop, stats)
    }

    fn accumulate_loss(&mut self, input: &Input<'_>, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError> {
        let (batch, n_labels) = self.upload(input, true)?;
        self.forward(&batch, input.b, input.t, &Dropouts(None))?;
        self.head_loss(&batch, n_labels, stats, weight)
    }

    fn set_recompute(&mut self, on: bool) {
        for blk in &mut self.layers.blocks {
            blk.mlp.recompute = on;
        }
        self.acts = None; // reallocated in the new layout by the next call
    }
    fn logits(&mut self, input: &Input<'_>) -> Result<Vec<f32>, ModelError> {
        let (batch, _) = self.upload(input, false)?;
        let (b, t) = (input.b, input.t);
        self.forward(&batch, b, t, &Dropouts(None))?;
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("forward allocates");
        let last = l.blocks.last().expect("at least one layer").output(a.blocks.last().expect("at least one layer"));
        l.head.logits(be, &w, &mut a.head, last, b * t)?;
        Ok(be.to_host(B::slice(B::view(a.head.logits()), 0, b * t * self.config.vocab_size()))?)
    }
}

impl<B: Backend, C: EncoderConfig> MaskedLm<B, C> {
    /// Checks and uploads a batch (labels are the targets: no shift); returns it with its label
    /// count.
    fn upload(&self, input: &Input<'_>, with_labels: bool) -> Result<(B::Batch, usize), ModelError> {
        let positions = self.config.position_ids(input.input_ids, input.b, input.t);
        let cfg = &self.config;
        let sizes = TableSizes { vocab: cfg.vocab_size(), positions: cfg.position_rows(), token_types: cfg.type_vocab_size() };
        upload_masked(&self.backend, input, with_labels, input.token_type_ids, positions.as_deref(), sizes)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) -> Result<(), ModelError> {
        if self.acts.as_ref().is_some_and(|a| a.b == b && a.t == t) {
            return Ok(());
        }
        self.acts = None;
        let (be, l) = (&self.backend, &self.layers);
        let (bt, c) = (b * t, l.emb.c);
        let blocks = l.blocks.iter().map(|blk| blk.alloc(be, b, t)).collect::<Result<Vec<_>, _>>()?;
        self.acts = Some(Acts {
            b,
            t,
            emb: l.emb.alloc(be, bt)?,
            blocks,
            head: l.head.alloc(be, bt)?,
            scratch: l.blocks[0].alloc_scratch(be, bt)?,
            dres: be.alloc(bt * c)?,
            dsum: be.alloc(bt * c)?,
        });
        Ok(())
    }

    fn forward(&mut self, batch: &B::Batch, b: usize, t: usize, drop: &Dropouts) -> Result<(), ModelError> {
        self.ensure_acts(b, t)?;
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("allocated above");
        l.emb.forward(be, &w, &mut a.emb, batch, b * t, drop.site(0, l.emb_pdrop))?;
        for (i, blk) in l.blocks.iter().enumerate() {
            let (done, rest) = a.blocks.split_at_mut(i);
            let x = if i == 0 { a.emb.out() } else { l.blocks[i - 1].output(&done[i - 1]) };
            blk.forward(be, &w, &mut rest[0], &mut a.scratch, x, batch, (b, t), drop)?;
        }
        Ok(())
    }

    fn head_loss(&mut self, batch: &B::Batch, n_labels: usize, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError> {
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("forward ran");
        let last = l.blocks.last().expect("at least one layer").output(a.blocks.last().expect("at least one layer"));
        let n = if self.head_rows == Rows::All { a.b * a.t } else { n_labels };
        l.head.loss(be, &w, None, &mut a.head, last, batch, self.head_rows, n, None, stats, weight)?;
        Ok(())
    }

    fn backward(
        &mut self,
        batch: &B::Batch,
        b: usize,
        t: usize,
        n_labels: usize,
        drop: &Dropouts,
        stats: &mut B::Stats,
    ) -> Result<(), ModelError> {
        let (be, l) = (&self.backend, &self.layers);
        let (w, mut g) = self.store.split();
        let a = self.acts.as_mut().expect("forward ran");
        be.fill_zero(B::view_mut(&mut a.dres))?;
        let last = l.blocks.last().expect("at least one layer").output(a.blocks.last().expect("at least one layer"));
        let grad = Some((B::view_mut(&mut a.dres), 1.0 / n_labels as f32));
        let n = if self.head_rows == Rows::All { b * t } else { n_labels };
        l.head.loss(be, &w, Some(&mut g), &mut a.head, last, batch, self.head_rows, n, grad, stats, 1.0)?;
        for i in (0..l.blocks.len()).rev() {
            let x = if i == 0 { a.emb.out() } else { l.blocks[i - 1].output(&a.blocks[i - 1]) };
            l.blocks[i].backward(be, &w, &mut g, &a.blocks[i], &mut a.scratch, B::view_mut(&mut a.dres), x, batch, (b, t), drop)?;
        }
        let d = drop.site(0, l.emb_pdrop);
        l.emb.backward(be, &w, &mut g, B::view_mut(&mut a.dres), B::view_mut(&mut a.dsum), &a.emb, batch, b * t, d)?;
        Ok(())
    }

    /// Where the MLM head runs: [`Rows::Labelled`] (the default) or every position as Hugging
    /// Face does ([`Rows::All`]: the same loss and gradients at more cost; for tests and
    /// benchmarks).
    pub fn set_head_rows(&mut self, rows: Rows) {
        self.head_rows = rows;
    }
}

impl<B: Backend<Buf = Vec<f32>>, C: EncoderConfig> MaskedLm<B, C> {
    /// The flat parameter buffer (host-memory backends).
    pub fn params(&self) -> &[f32] {
        self.store.params()
    }
    /// The flat gradient buffer.
    pub fn grads(&self) -> &[f32] {
        self.store.grads()
    }
}
