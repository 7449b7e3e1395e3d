//! GPT-2 (Hugging Face `GPT2LMHeadModel`): learned positions, pre-LN blocks, fused q/k/v
//! projection (`c_attn`, Conv1D `[in, out]` weights), `gelu_new` MLP, final LayerNorm, `lm_head`
//! tied to `wte`, dropout after embeddings / on attention probabilities / after each residual
//! branch, loss = mean cross-entropy over shifted labels ignoring -100.

mod config;

pub use config::Gpt2Config;

use lmtrain_backend::{Backend, HostBatch, IGNORE_INDEX, Rows};

use crate::nn::block::{BlockSaved, BlockScratch, CachedScratch};
use crate::nn::embedding::EmbSaved;
use crate::nn::layernorm::LnSaved;
use crate::nn::{Block, Dropouts, Embeddings, LayerNorm, Linear, Mlp, Order, SelfAttention, TiedLmHead};
use crate::params::{Init, ParamBuilder, ParamInfo, ParamStore};
use crate::{HfSpec, Input, LanguageModel, ModelConfig, ModelError, Objective};

/// The layers of a configuration.
struct Layers {
    emb: Embeddings,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: TiedLmHead,
    embd_pdrop: f32,
}

/// Declares every parameter (in Hugging Face `named_parameters()` order) and composes the layers.
fn declare(cfg: &Gpt2Config) -> Result<(Layers, Vec<ParamInfo>), ModelError> {
    let gelu = cfg.gelu_kind()?;
    let (c, f, v, eps) = (cfg.n_embd, cfg.n_inner(), cfg.vocab_size, cfg.layer_norm_epsilon);
    let std = Init::Normal(cfg.initializer_range);
    // HF scales the residual projections' init by 1/sqrt(2 * n_layer)
    let proj_std = Init::Normal(cfg.initializer_range / (2.0 * cfg.n_layer as f64).sqrt());
    let root = ParamBuilder::new();
    let tr = root.pp("transformer");
    let word = tr.pp("wte").weight("weight", &[v, c], std);
    let position = tr.pp("wpe").weight("weight", &[cfg.n_positions, c], std);
    let emb = Embeddings { word, position: Some(position), token_type: None, ln: None, padding: Default::default(), c };
    let blocks = (0..cfg.n_layer)
        .map(|l| {
            let h = tr.pp(format!("h.{l}"));
            let ln1 = LayerNorm::new(&h.pp("ln_1"), c, eps);
            let qkv = Linear::conv1d(&h.pp("attn.c_attn"), c, 3 * c, std);
            let proj = Linear::conv1d(&h.pp("attn.c_proj"), c, c, proj_std);
            let ln2 = LayerNorm::new(&h.pp("ln_2"), c, eps);
            let fc = Linear::conv1d(&h.pp("mlp.c_fc"), c, f, std);
            let mlp_proj = Linear::conv1d(&h.pp("mlp.c_proj"), f, c, proj_std);
            let site = 1 + 3 * l as u64;
            Block {
                order: Order::PreLn,
                ln1,
                attn: SelfAttention { qkv, proj, n_head: cfg.n_head, causal: true },
                ln2,
                mlp: Mlp { fc, proj: mlp_proj, gelu, recompute: false },
                attn_pdrop: cfg.attn_pdrop as f32,
                resid_pdrop: [cfg.resid_pdrop as f32; 2],
                sites: [site, site + 1, site + 2],
            }
        })
        .collect();
    let ln_f = LayerNorm::new(&tr.pp("ln_f"), c, eps);
    let head = TiedLmHead { wte: word, bias: None, vocab: v, c };
    Ok((Layers { emb, blocks, ln_f, head, embd_pdrop: cfg.embd_pdrop as f32 }, root.finish()))
}

/// Activations of one `(b, t)` shape.
struct Acts<B: Backend> {
    b: usize,
    t: usize,
    emb: EmbSaved<B>,
    blocks: Vec<BlockSaved<B>>,
    lnf: LnSaved<B>,
    logits: B::Buf, // (BT, V) in the backend's head layout
    scratch: BlockScratch<B>,
    dres: B::Buf,  // (BT, C) the gradient flowing along the residual stream
    dhead: B::Buf, // (BT, C) the head's input gradient
}

/// Per-layer key/value cache for incremental generation (batch 1).
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>, // per layer (max_len, C)
    v: Vec<B::Buf>, // per layer (max_len, C)
    len: usize,
    max_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Capacity in positions.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// GPT-2 language model on backend `B`.
pub struct Gpt2<B: Backend> {
    config: Gpt2Config,
    layers: Layers,
    backend: B,
    store: ParamStore<B>,
    acts: Option<Acts<B>>,
}

impl<B: Backend> LanguageModel<B> for Gpt2<B> {
    type Config = Gpt2Config;
    const OBJECTIVE: Objective = Objective::CausalLm;
    const HF: HfSpec = HfSpec {
        architecture: "GPT2LMHeadModel",
        tied: &["lm_head.weight"],
        optional_prefix: Some("transformer."),
        buffers: &[".attn.bias", ".attn.masked_bias"],
        head: &[],
        renames: &[],
    };

    fn param_table(config: &Gpt2Config) -> Result<Vec<ParamInfo>, ModelError> {
        Ok(declare(config)?.1)
    }

    fn from_params(backend: B, config: Gpt2Config, params: Vec<f32>) -> Result<Self, ModelError> {
        config.validate()?;
        let (layers, infos) = declare(&config)?;
        let store = ParamStore::new(&backend, infos, params)?;
        Ok(Gpt2 { config, layers, backend, store, acts: None })
    }

    fn config(&self) -> &Gpt2Config {
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
        let (batch, n_valid) = self.upload(input)?;
        let drop = Dropouts(dropout_seed);
        self.forward(&batch, input.b, input.t, &drop)?;
        if n_valid == 0 {
            // nothing to learn from: a NaN loss as Hugging Face, gradients untouched
            return self.head_loss(&batch, stats, 1.0);
        }
        self.backward(&batch, input.b, input.t, 1.0 / n_valid as f32, &drop, stats)
    }

    fn accumulate_loss(&mut self, input: &Input<'_>, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError> {
        let (batch, _) = self.upload(input)?;
        self.forward(&batch, input.b, input.t, &Dropouts(None))?;
        self.head_loss(&batch, stats, weight)
    }

    fn set_recompute(&mut self, on: bool) {
        for blk in &mut self.layers.blocks {
            blk.mlp.recompute = on;
        }
        self.acts = None; // reallocated in the new layout by the next call
    }
    fn logits(&mut self, input: &Input<'_>) -> Result<Vec<f32>, ModelError> {
        let (b, t) = (input.b, input.t);
        let batch = self.check_and_upload(&self.host_batch(&Input { labels: None, ..*input }))?;
        self.forward(&batch, b, t, &Dropouts(None))?;
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("forward allocates");
        l.head.logits(be, &w, B::view_mut(&mut a.logits), B::view(&a.lnf.out), b * t)?;
        Ok(be.to_host(B::view(&a.logits))?)
    }
}

impl<B: Backend> Gpt2<B> {
    /// Checks and uploads a batch with its labels shifted (`targets[t] = labels[t + 1]`, the
    /// last position of each row ignored, the HF shift); returns it with its label count.
    fn upload(&self, input: &Input<'_>) -> Result<(B::Batch, usize), ModelError> {
        let (b, t) = (input.b, input.t);
        let labels = input.labels.ok_or_else(|| ModelError::Input("a loss needs labels".into()))?;
        if labels.len() != b * t {
            return Err(ModelError::Input(format!("labels has {} entries, expected b*t = {}", labels.len(), b * t)));
        }
        let mut targets = vec![IGNORE_INDEX; b * t];
        for bi in 0..b {
            targets[bi * t..(bi + 1) * t - 1].copy_from_slice(&labels[bi * t + 1..(bi + 1) * t]);
        }
        let n_valid = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        let host = HostBatch { targets: Some(&targets), ..self.host_batch(input) };
        Ok((self.check_and_upload(&host)?, n_valid))
    }

    fn host_batch<'a>(&self, input: &Input<'a>) -> HostBatch<'a> {
        HostBatch {
            b: input.b,
            t: input.t,
            input_ids: input.input_ids,
            targets: None,
            attention_mask: input.attention_mask,
            token_type_ids: None,
            position_ids: None,
        }
    }

    fn check_and_upload(&self, host: &HostBatch<'_>) -> Result<B::Batch, ModelError> {
        host.validate(self.config.vocab_size, self.config.n_positions, 0).map_err(|e| ModelError::Input(e.0))?;
        Ok(self.backend.upload_batch(host)?)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) -> Result<(), ModelError> {
        if self.acts.as_ref().is_some_and(|a| a.b == b && a.t == t) {
            return Ok(());
        }
        self.acts = None; // free the old shape before allocating the new one
        let (be, l) = (&self.backend, &self.layers);
        let (bt, c) = (b * t, self.config.n_embd);
        let blocks = l.blocks.iter().map(|blk| blk.alloc(be, b, t)).collect::<Result<Vec<_>, _>>()?;
        self.acts = Some(Acts {
            b,
            t,
            emb: l.emb.alloc(be, bt)?,
            blocks,
            lnf: LnSaved::new(be, bt, c)?,
            logits: l.head.alloc(be, bt)?,
            scratch: l.blocks[0].alloc_scratch(be, bt)?,
            dres: be.alloc(bt * c)?,
            dhead: be.alloc(bt * c)?,
        });
        Ok(())
    }

    /// Forward up to the final LayerNorm; the head runs fused with the loss or in
    /// [`Gpt2::logits`].
    fn forward(&mut self, batch: &B::Batch, b: usize, t: usize, drop: &Dropouts) -> Result<(), ModelError> {
        self.ensure_acts(b, t)?;
        let bt = b * t;
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("allocated above");
        l.emb.forward(be, &w, &mut a.emb, batch, bt, drop.site(0, l.embd_pdrop))?;
        for (i, blk) in l.blocks.iter().enumerate() {
            let (done, rest) = a.blocks.split_at_mut(i);
            let x = if i == 0 { a.emb.out() } else { l.blocks[i - 1].output(&done[i - 1]) };
            blk.forward(be, &w, &mut rest[0], &mut a.scratch, x, batch, (b, t), drop)?;
        }
        let last = l.blocks.last().expect("n_layer >= 1").output(a.blocks.last().expect("n_layer >= 1"));
        l.ln_f.forward(be, &w, &mut a.lnf, last, bt)?;
        Ok(())
    }

    fn head_loss(&mut self, batch: &B::Batch, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError> {
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("forward ran");
        l.head.loss(be, &w, None, &mut a.logits, B::view(&a.lnf.out), batch, Rows::All, None, stats, weight)?;
        Ok(())
    }

    /// The fused output head + cross-entropy (forward and backward), then backward through the
    /// blocks and embeddings.
    fn backward(
        &mut self,
        batch: &B::Batch,
        b: usize,
        t: usize,
        dloss: f32,
        drop: &Dropouts,
        stats: &mut B::Stats,
    ) -> Result<(), ModelError> {
        let bt = b * t;
        let (be, l) = (&self.backend, &self.layers);
        let (w, mut g) = self.store.split();
        let a = self.acts.as_mut().expect("forward ran");
        let grad = Some((B::view_mut(&mut a.dhead), dloss));
        l.head.loss(be, &w, Some(&mut g), &mut a.logits, B::view(&a.lnf.out), batch, Rows::All, grad, stats, 1.0)?;
        be.fill_zero(B::view_mut(&mut a.dres))?;
        let last = l.blocks.last().expect("n_layer >= 1").output(a.blocks.last().expect("n_layer >= 1"));
        l.ln_f.backward(be, &w, &mut g, B::view_mut(&mut a.dres), B::view(&a.dhead), last, &a.lnf, bt)?;
        for i in (0..l.blocks.len()).rev() {
            let x = if i == 0 { a.emb.out() } else { l.blocks[i - 1].output(&a.blocks[i - 1]) };
            l.blocks[i].backward(be, &w, &mut g, &a.blocks[i], &mut a.scratch, B::view_mut(&mut a.dres), x, batch, (b, t), drop)?;
        }
        let d = drop.site(0, l.embd_pdrop);
        l.emb.backward(be, &w, &mut g, B::view_mut(&mut a.dres), B::view_mut(&mut a.dhead), &a.emb, batch, bt, d)?;
        Ok(())
    }

    /// Forward and backward on one batch; returns the loss (mean cross-entropy over shifted
    /// labels, `-100` ignored, as `GPT2LMHeadModel`). Gradients ACCUMULATE (see
    /// [`LanguageModel::zero_grad`]). `dropout_seed: None` = eval mode; a seed makes the dropout
    /// masks a pure function of (seed, site, position).
    pub fn forward_backward(
        &mut self,
        input_ids: &[u32],
        labels: &[i32],
        b: usize,
        t: usize,
        dropout_seed: Option<u64>,
    ) -> Result<f32, ModelError> {
        let input = Input { b, t, input_ids, labels: Some(labels), attention_mask: None, token_type_ids: None };
        self.loss_and_gradients(&input, dropout_seed)
    }

    /// Mean cross-entropy over shifted labels (eval mode: no dropout, no gradients).
    /// Perplexity is `exp` of it. NaN when no label is counted (as Hugging Face).
    pub fn forward_loss(&mut self, input_ids: &[u32], labels: &[i32], b: usize, t: usize) -> Result<f32, ModelError> {
        let input = Input { b, t, input_ids, labels: Some(labels), attention_mask: None, token_type_ids: None };
        self.eval_loss(&input)
    }

    /// An empty key/value cache for up to `max_len` positions (at most `n_positions`).
    pub fn new_kv_cache(&self, max_len: usize) -> Result<KvCache<B>, ModelError> {
        let max_len = max_len.min(self.config.n_positions);
        let c = self.config.n_embd;
        let n = self.config.n_layer;
        let bufs = || (0..n).map(|_| self.backend.alloc(max_len * c)).collect::<Result<Vec<_>, _>>();
        Ok(KvCache { k: bufs()?, v: bufs()?, len: 0, max_len })
    }

    /// Feed `tokens` (batch 1) after what `cache` already holds and return the logits of the
    /// last one (eval mode).
    pub fn forward_incremental(&self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::Input("forward_incremental: no tokens".into()));
        }
        if cache.len + n > cache.max_len {
            return Err(ModelError::Input(format!(
                "KV cache full: {} + {n} positions exceed its {} (n_positions {})",
                cache.len, cache.max_len, self.config.n_positions
            )));
        }
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let c = self.config.n_embd;
        let start = cache.len;
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let host = HostBatch {
            position_ids: Some(&positions),
            ..self.host_batch(&Input { b: 1, t: n, input_ids: tokens, labels: None, attention_mask: None, token_type_ids: None })
        };
        let batch = self.check_and_upload(&host)?;
        let mut emb = l.emb.alloc(be, n)?;
        l.emb.forward(be, &w, &mut emb, &batch, n, Dropouts(None).site(0, 0.0))?;
        let mut x = be.alloc(n * c)?;
        be.copy(B::view_mut(&mut x), emb.out())?;
        let mut sc: CachedScratch<B> = l.blocks[0].alloc_cached(be, n)?;
        for (i, blk) in l.blocks.iter().enumerate() {
            blk.forward_cached(be, &w, &mut sc, B::view_mut(&mut x), &mut cache.k[i], &mut cache.v[i], start, n)?;
        }
        cache.len += n;
        // only the last position's logits are needed
        let mut lnf = LnSaved::new(be, 1, c)?;
        l.ln_f.forward(be, &w, &mut lnf, B::slice(B::view(&x), (n - 1) * c, c), 1)?;
        let mut logits = be.alloc(self.config.vocab_size)?;
        l.head.logits(be, &w, B::view_mut(&mut logits), B::view(&lnf.out), 1)?;
        Ok(be.to_host(B::view(&logits))?)
    }
}

impl<B: Backend<Buf = Vec<f32>>> Gpt2<B> {
    /// The flat parameter buffer (host-memory backends).
    pub fn params(&self) -> &[f32] {
        self.store.params()
    }
    /// The flat parameter buffer, writable (e.g. to load weights).
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.store.params_mut()
    }
    /// The flat gradient buffer (same layout as the parameters).
    pub fn grads(&self) -> &[f32] {
        self.store.grads()
    }
    /// Parameters (writable) and gradients together, for an optimizer step.
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &[f32]) {
        let (p, g) = self.store.params_and_grads_mut();
        (p, g)
    }
    /// One named tensor of the parameter buffer, by Hugging Face name.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.store.infos().iter().find(|p| p.name == name).map(|p| &self.params()[p.offset..p.offset + p.len])
    }
}

impl ModelConfig for Gpt2Config {
    fn validate(&self) -> Result<(), ModelError> {
        Gpt2Config::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.n_positions
    }
    fn for_saving(&self, spec: &HfSpec) -> Self {
        Gpt2Config { model_type: "gpt2".into(), architectures: Some(vec![spec.architecture.into()]), ..self.clone() }
    }
}
