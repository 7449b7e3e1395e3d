//! GPT-2 (Hugging Face `GPT2LMHeadModel`): learned positions, pre-LN blocks, fused q/k/v
//! projection (`c_attn`, Conv1D `[in, out]` weights), `gelu_new` MLP, final LayerNorm, `lm_head`
//! tied to `wte`, dropout after embeddings / on attention probabilities / after each residual
//! branch, loss = mean cross-entropy over shifted labels ignoring -100.

mod config;

pub use config::Gpt2Config;

use lmtrain_backend::{AttnMask, AttnShape, Backend, Dropout, GeluKind, GemmShape, mix64};
use lmtrain_cpu::Cpu;
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::{ModelError, ParamInfo};

/// Label value that contributes no loss (PyTorch `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Tensors of one block, in Hugging Face `named_parameters()` order.
struct Block<V> {
    ln1_w: V,          // (C)
    ln1_b: V,          // (C)
    attn_w: V,         // (C, 3C)  Conv1D [in, out]
    attn_b: V,         // (3C)
    attn_proj_w: V,    // (C, C)
    attn_proj_b: V,    // (C)
    ln2_w: V,          // (C)
    ln2_b: V,          // (C)
    fc_w: V,           // (C, F)
    fc_b: V,           // (F)
    fc_proj_w: V,      // (F, C)
    fc_proj_b: V,      // (C)
}

/// All tensors of the model (views of the flat parameter or gradient buffer).
struct Tensors<V> {
    wte: V, // (V, C), also the output head
    wpe: V, // (P, C)
    blocks: Vec<Block<V>>,
    lnf_w: V, // (C)
    lnf_b: V, // (C)
}

impl<V> Tensors<V> {
    /// Assemble from views given in parameter order.
    fn from_ordered(mut it: impl Iterator<Item = V>, n_layer: usize) -> Self {
        let mut next = || it.next().expect("parameter layout and view count agree");
        let wte = next();
        let wpe = next();
        let blocks = (0..n_layer)
            .map(|_| Block {
                ln1_w: next(),
                ln1_b: next(),
                attn_w: next(),
                attn_b: next(),
                attn_proj_w: next(),
                attn_proj_b: next(),
                ln2_w: next(),
                ln2_b: next(),
                fc_w: next(),
                fc_b: next(),
                fc_proj_w: next(),
                fc_proj_b: next(),
            })
            .collect();
        let lnf_w = next();
        let lnf_b = next();
        Tensors { wte, wpe, blocks, lnf_w, lnf_b }
    }
}

/// The parameter table of a configuration, in Hugging Face `named_parameters()` order (the
/// layout of [`Gpt2::params`]).
pub fn param_layout(cfg: &Gpt2Config) -> Vec<ParamInfo> {
    let (c, f, v, p) = (cfg.n_embd, cfg.n_inner(), cfg.vocab_size, cfg.n_positions);
    let mut infos = Vec::new();
    let mut offset = 0;
    let mut push = |name: String, shape: Vec<usize>, decay: bool| {
        let len = shape.iter().product();
        infos.push(ParamInfo { name, shape, offset, len, decay });
        offset += len;
    };
    push("transformer.wte.weight".into(), vec![v, c], true);
    push("transformer.wpe.weight".into(), vec![p, c], true);
    for l in 0..cfg.n_layer {
        let h = format!("transformer.h.{l}");
        push(format!("{h}.ln_1.weight"), vec![c], false);
        push(format!("{h}.ln_1.bias"), vec![c], false);
        push(format!("{h}.attn.c_attn.weight"), vec![c, 3 * c], true);
        push(format!("{h}.attn.c_attn.bias"), vec![3 * c], false);
        push(format!("{h}.attn.c_proj.weight"), vec![c, c], true);
        push(format!("{h}.attn.c_proj.bias"), vec![c], false);
        push(format!("{h}.ln_2.weight"), vec![c], false);
        push(format!("{h}.ln_2.bias"), vec![c], false);
        push(format!("{h}.mlp.c_fc.weight"), vec![c, f], true);
        push(format!("{h}.mlp.c_fc.bias"), vec![f], false);
        push(format!("{h}.mlp.c_proj.weight"), vec![f, c], true);
        push(format!("{h}.mlp.c_proj.bias"), vec![c], false);
    }
    push("transformer.ln_f.weight".into(), vec![c], false);
    push("transformer.ln_f.bias".into(), vec![c], false);
    infos
}

/// Activations saved by the forward pass for backward, for one `(b, t)` shape. Per-layer
/// tensors are stacked along a leading `n_layer` axis.
struct Activations<B: Backend> {
    b: usize,
    t: usize,
    encoded: B::Buf,   // (BT, C) embeddings after dropout
    ln1: B::Buf,       // (L, BT, C)
    ln1_mean: B::Buf,  // (L, BT)
    ln1_rstd: B::Buf,  // (L, BT)
    qkv: B::Buf,       // (L, BT, 3C)
    atty: B::Buf,      // (L, BT, C) attention output, heads concatenated
    probs: B::Buf,     // (L, B, H, T, T) softmax before dropout
    residual2: B::Buf, // (L, BT, C)
    ln2: B::Buf,       // (L, BT, C)
    ln2_mean: B::Buf,  // (L, BT)
    ln2_rstd: B::Buf,  // (L, BT)
    fch: B::Buf,       // (L, BT, F) MLP pre-activation
    fch_gelu: B::Buf,  // (L, BT, F)
    residual3: B::Buf, // (L, BT, C) block outputs
    lnf: B::Buf,       // (BT, C)
    lnf_mean: B::Buf,  // (BT)
    lnf_rstd: B::Buf,  // (BT)
    logits: B::Buf,    // (BT, V) in the backend's lm_head layout; dlogits in place after the loss
    // scratch for the branch outputs and for backward
    tmp: B::Buf,       // (BT, C)
    dres: B::Buf,      // (BT, C) gradient flowing along the residual stream
    dln: B::Buf,       // (BT, C)
    datty: B::Buf,     // (BT, C)
    dqkv: B::Buf,      // (BT, 3C)
    dfch: B::Buf,      // (BT, F)
    dfch_gelu: B::Buf, // (BT, F)
}

impl<B: Backend> Activations<B> {
    fn new(be: &B, cfg: &Gpt2Config, b: usize, t: usize) -> Self {
        let (l, c, f, v, h) = (cfg.n_layer, cfg.n_embd, cfg.n_inner(), cfg.vocab_size, cfg.n_head);
        let bt = b * t;
        Activations {
            b,
            t,
            encoded: be.alloc(bt * c),
            ln1: be.alloc(l * bt * c),
            ln1_mean: be.alloc(l * bt),
            ln1_rstd: be.alloc(l * bt),
            qkv: be.alloc(l * bt * 3 * c),
            atty: be.alloc(l * bt * c),
            probs: be.alloc(l * b * h * t * t),
            residual2: be.alloc(l * bt * c),
            ln2: be.alloc(l * bt * c),
            ln2_mean: be.alloc(l * bt),
            ln2_rstd: be.alloc(l * bt),
            fch: be.alloc(l * bt * f),
            fch_gelu: be.alloc(l * bt * f),
            residual3: be.alloc(l * bt * c),
            lnf: be.alloc(bt * c),
            lnf_mean: be.alloc(bt),
            lnf_rstd: be.alloc(bt),
            logits: be.alloc(bt * v),
            tmp: be.alloc(bt * c),
            dres: be.alloc(bt * c),
            dln: be.alloc(bt * c),
            datty: be.alloc(bt * c),
            dqkv: be.alloc(bt * 3 * c),
            dfch: be.alloc(bt * f),
            dfch_gelu: be.alloc(bt * f),
        }
    }
}

/// Per-layer key/value cache for incremental generation (batch 1).
pub struct KvCache<B: Backend = Cpu> {
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

/// Row-major `[rows, k] x W[k, n] (+ bias)`: a Hugging Face Conv1D forward.
fn gemm_nn(m: usize, k: usize, n: usize) -> GemmShape {
    GemmShape { m, n, k, trans_a: false, trans_b: false, accumulate: false }
}

/// GPT-2 language model on backend `B` (the CPU by default).
pub struct Gpt2<B: Backend = Cpu> {
    config: Gpt2Config,
    gelu: GeluKind,
    backend: B,
    infos: Vec<ParamInfo>,
    params: B::Buf,
    grads: B::Buf,
    acts: Option<Activations<B>>,
}

impl Gpt2<Cpu> {
    /// A randomly initialised model on the CPU, initialised like Hugging Face
    /// (normal(0, initializer_range); `c_proj` weights scaled by `1/sqrt(2 n_layer)`; biases 0;
    /// LayerNorm weight 1, bias 0). Panics on an invalid config (check with
    /// [`Gpt2Config::validate`] first).
    pub fn new(config: Gpt2Config, seed: u64) -> Self {
        Gpt2::with_backend(Cpu, config, seed)
    }

    /// A CPU model holding the given parameters (HF layout of [`Gpt2::param_infos`]).
    pub fn from_params(config: Gpt2Config, params: Vec<f32>) -> Result<Self, ModelError> {
        Gpt2::with_backend_params(Cpu, config, params)
    }

    /// The flat parameter buffer.
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    /// The flat parameter buffer, writable (e.g. to load weights).
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }
    /// The flat gradient buffer (same layout as the parameters).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }
    /// Parameters (writable) and gradients together, for an optimizer step.
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &[f32]) {
        (&mut self.params, &self.grads)
    }
    /// One named tensor of the parameter buffer, by Hugging Face name.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.infos.iter().find(|p| p.name == name).map(|p| &self.params[p.offset..p.offset + p.len])
    }
}

impl<B: Backend> Gpt2<B> {
    /// A randomly initialised model on `backend` (see [`Gpt2::new`]).
    pub fn with_backend(backend: B, config: Gpt2Config, seed: u64) -> Self {
        if let Err(e) = config.validate() {
            panic!("Gpt2::new: {e}");
        }
        let infos = param_layout(&config);
        let total = infos.last().map_or(0, |p| p.offset + p.len);
        let mut host = vec![0f32; total];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let std = config.initializer_range;
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        for p in &infos {
            let dst = &mut host[p.offset..p.offset + p.len];
            if p.name.ends_with("bias") {
                continue; // zeros
            } else if p.name.contains(".ln_") {
                dst.fill(1.0);
            } else {
                let s = if p.name.ends_with("c_proj.weight") { proj_std } else { std };
                fill_normal(dst, s, &mut rng);
            }
        }
        Self::with_backend_params(backend, config, host).expect("layout matches the config")
    }

    /// A model on `backend` holding `params` (HF layout of [`Gpt2::param_infos`]).
    pub fn with_backend_params(backend: B, config: Gpt2Config, params: Vec<f32>) -> Result<Self, ModelError> {
        config.validate()?;
        let gelu = config.gelu_kind()?;
        let infos = param_layout(&config);
        let total = infos.last().map_or(0, |p| p.offset + p.len);
        if params.len() != total {
            return Err(ModelError::Config(format!(
                "{} parameters given, the config needs {total}",
                params.len()
            )));
        }
        let params = backend.from_host(params);
        let grads = backend.alloc(total);
        Ok(Gpt2 { config, gelu, backend, infos, params, grads, acts: None })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }
    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// Every parameter tensor: Hugging Face name, shape, place in the flat buffer, decay flag.
    pub fn param_infos(&self) -> &[ParamInfo] {
        &self.infos
    }
    /// Total number of parameters (tied `lm_head` counted once).
    pub fn num_params(&self) -> usize {
        B::buf_len(&self.params)
    }
    /// The parameter buffer on the backend.
    pub fn params_buf(&self) -> &B::Buf {
        &self.params
    }
    /// The gradient buffer on the backend.
    pub fn grads_buf(&self) -> &B::Buf {
        &self.grads
    }
    /// The backend with the parameter (writable) and gradient buffers on it, for an optimizer
    /// step that runs on the model's backend.
    pub fn backend_and_bufs_mut(&mut self) -> (&B, &mut B::Buf, &B::Buf) {
        (&self.backend, &mut self.params, &self.grads)
    }
    /// Set every gradient to zero.
    pub fn zero_grad(&mut self) {
        self.backend.fill_zero(B::view_mut(&mut self.grads));
    }

    fn param_views(&self) -> Tensors<B::View<'_>> {
        let all = B::view(&self.params);
        Tensors::from_ordered(self.infos.iter().map(|p| B::slice(all, p.offset, p.len)), self.config.n_layer)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) {
        assert!(b > 0 && t > 0, "empty batch");
        assert!(
            t <= self.config.n_positions,
            "sequence length {t} exceeds the model's n_positions {}",
            self.config.n_positions
        );
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = None; // free the old shape before allocating the new one
            self.acts = Some(Activations::new(&self.backend, &self.config, b, t));
        }
    }

    /// Forward pass up to the final LayerNorm (`acts.lnf`); the output head runs in
    /// [`Gpt2::logits`] or fused with the loss.
    fn forward(&mut self, ids: &[u32], b: usize, t: usize, dropout_seed: Option<u64>) {
        assert_eq!(ids.len(), b * t, "input_ids has {} tokens, expected b*t = {}", ids.len(), b * t);
        self.ensure_acts(b, t);
        let cfg = &self.config;
        let (c, f, l_n) = (cfg.n_embd, cfg.n_inner(), cfg.n_layer);
        let bt = b * t;
        let eps = cfg.layer_norm_epsilon as f32;
        let site = |id: u64, p: f64| match dropout_seed {
            Some(s) if p > 0.0 => Dropout { p: p as f32, seed: mix64(s ^ mix64(id)) },
            _ => Dropout::NONE,
        };
        let shape = AttnShape { b, t, n_head: cfg.n_head, head_size: cfg.head_size() };
        let mask = AttnMask { causal: true, key_padding: None };
        let (resid_p, attn_p, embd_p) = (cfg.resid_pdrop, cfg.attn_pdrop, cfg.embd_pdrop);
        let gelu = self.gelu;
        let be = &self.backend;
        let all = B::view(&self.params);
        let p = Tensors::from_ordered(self.infos.iter().map(|i| B::slice(all, i.offset, i.len)), l_n);
        let a = self.acts.as_mut().expect("allocated above");

        be.embedding_forward(B::view_mut(&mut a.encoded), p.wte, p.wpe, ids, b, t, c, 0);
        be.dropout_inplace(B::view_mut(&mut a.encoded), site(0, embd_p));
        for (l, w) in p.blocks.iter().enumerate() {
            let x: B::View<'_> =
                if l == 0 { B::view(&a.encoded) } else { B::slice(B::view(&a.residual3), (l - 1) * bt * c, bt * c) };
            let ln1 = B::slice_mut(B::view_mut(&mut a.ln1), l * bt * c, bt * c);
            let mean = B::slice_mut(B::view_mut(&mut a.ln1_mean), l * bt, bt);
            let rstd = B::slice_mut(B::view_mut(&mut a.ln1_rstd), l * bt, bt);
            be.layernorm_forward(ln1, mean, rstd, x, w.ln1_w, w.ln1_b, bt, c, eps);
            let ln1 = B::slice(B::view(&a.ln1), l * bt * c, bt * c);

            let mut qkv = B::slice_mut(B::view_mut(&mut a.qkv), l * bt * 3 * c, bt * 3 * c);
            be.gemm(B::reborrow(&mut qkv), ln1, w.attn_w, gemm_nn(bt, c, 3 * c));
            be.add_bias(qkv, w.attn_b, bt, 3 * c);
            let qkv = B::slice(B::view(&a.qkv), l * bt * 3 * c, bt * 3 * c);
            let atty = B::slice_mut(B::view_mut(&mut a.atty), l * bt * c, bt * c);
            let probs = B::slice_mut(B::view_mut(&mut a.probs), l * shape.probs_len(), shape.probs_len());
            be.attention_forward(atty, probs, qkv, shape, mask, site(1 + 3 * l as u64, attn_p));
            let atty = B::slice(B::view(&a.atty), l * bt * c, bt * c);

            be.gemm(B::view_mut(&mut a.tmp), atty, w.attn_proj_w, gemm_nn(bt, c, c));
            be.add_bias(B::view_mut(&mut a.tmp), w.attn_proj_b, bt, c);
            be.dropout_inplace(B::view_mut(&mut a.tmp), site(2 + 3 * l as u64, resid_p));
            let res2 = B::slice_mut(B::view_mut(&mut a.residual2), l * bt * c, bt * c);
            be.residual_forward(res2, x, B::view(&a.tmp));
            let res2 = B::slice(B::view(&a.residual2), l * bt * c, bt * c);

            let ln2 = B::slice_mut(B::view_mut(&mut a.ln2), l * bt * c, bt * c);
            let mean = B::slice_mut(B::view_mut(&mut a.ln2_mean), l * bt, bt);
            let rstd = B::slice_mut(B::view_mut(&mut a.ln2_rstd), l * bt, bt);
            be.layernorm_forward(ln2, mean, rstd, res2, w.ln2_w, w.ln2_b, bt, c, eps);
            let ln2 = B::slice(B::view(&a.ln2), l * bt * c, bt * c);

            let mut fch = B::slice_mut(B::view_mut(&mut a.fch), l * bt * f, bt * f);
            be.gemm(B::reborrow(&mut fch), ln2, w.fc_w, gemm_nn(bt, c, f));
            be.add_bias(fch, w.fc_b, bt, f);
            let fch = B::slice(B::view(&a.fch), l * bt * f, bt * f);
            let fch_gelu = B::slice_mut(B::view_mut(&mut a.fch_gelu), l * bt * f, bt * f);
            be.gelu_forward(fch_gelu, fch, gelu);
            let fch_gelu = B::slice(B::view(&a.fch_gelu), l * bt * f, bt * f);

            be.gemm(B::view_mut(&mut a.tmp), fch_gelu, w.fc_proj_w, gemm_nn(bt, f, c));
            be.add_bias(B::view_mut(&mut a.tmp), w.fc_proj_b, bt, c);
            be.dropout_inplace(B::view_mut(&mut a.tmp), site(3 + 3 * l as u64, resid_p));
            let res3 = B::slice_mut(B::view_mut(&mut a.residual3), l * bt * c, bt * c);
            be.residual_forward(res3, res2, B::view(&a.tmp));
        }
        let last = B::slice(B::view(&a.residual3), (l_n - 1) * bt * c, bt * c);
        be.layernorm_forward(
            B::view_mut(&mut a.lnf),
            B::view_mut(&mut a.lnf_mean),
            B::view_mut(&mut a.lnf_rstd),
            last,
            p.lnf_w,
            p.lnf_b,
            bt,
            c,
            eps,
        );
    }

    /// Logits `[b, t, vocab]` for a batch (eval mode, no dropout), copied to the host.
    pub fn logits(&mut self, input_ids: &[u32], b: usize, t: usize) -> Vec<f32> {
        self.forward(input_ids, b, t, None);
        let (bt, v, c) = (b * t, self.config.vocab_size, self.config.n_embd);
        let wte = B::slice(B::view(&self.params), self.infos[0].offset, self.infos[0].len);
        let a = self.acts.as_mut().expect("forward allocates");
        // tied head: logits = lnf · wte^T
        let s = GemmShape { m: bt, n: v, k: c, trans_a: false, trans_b: true, accumulate: false };
        self.backend.gemm(B::view_mut(&mut a.logits), B::view(&a.lnf), wte, s);
        self.backend.to_host(B::view(&a.logits))
    }

    /// Mean cross-entropy over shifted labels (eval mode: no dropout, no gradients).
    /// Perplexity is `exp` of it. NaN when no label is counted (as Hugging Face).
    pub fn forward_loss(&mut self, input_ids: &[u32], labels: &[i32], b: usize, t: usize) -> f32 {
        let targets = shifted_targets(labels, b, t, self.config.vocab_size);
        let n_valid = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        self.forward(input_ids, b, t, None);
        let (v, c) = (self.config.vocab_size, self.config.n_embd);
        let wte = B::slice(B::view(&self.params), self.infos[0].offset, self.infos[0].len);
        let a = self.acts.as_mut().expect("forward allocates");
        let sum = self.backend.lm_head_loss(B::view_mut(&mut a.logits), B::view(&a.lnf), wte, &targets, b * t, v, c, None);
        (sum / n_valid as f64) as f32
    }

    /// Forward and backward on one batch; returns the loss (mean cross-entropy over shifted
    /// labels, `-100` ignored, as `GPT2LMHeadModel`). Gradients ACCUMULATE into [`Gpt2::grads`]
    /// (call [`Gpt2::zero_grad`] between optimizer steps). `dropout_seed: None` = eval mode; a
    /// seed makes the dropout masks a pure function of (seed, site, position).
    pub fn forward_backward(&mut self, input_ids: &[u32], labels: &[i32], b: usize, t: usize, dropout_seed: Option<u64>) -> f32 {
        let targets = shifted_targets(labels, b, t, self.config.vocab_size);
        let n_valid = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        self.forward(input_ids, b, t, dropout_seed);
        if n_valid == 0 {
            // nothing to learn from: NaN loss as Hugging Face, gradients untouched
            return f32::NAN;
        }
        let sum = self.backward(input_ids, &targets, 1.0 / n_valid as f32, b, t, dropout_seed);
        (sum / n_valid as f64) as f32
    }

    /// The fused output head + cross-entropy (forward and backward), then backward through the
    /// blocks and embeddings. Returns the summed loss.
    fn backward(&mut self, ids: &[u32], targets: &[i32], dloss: f32, b: usize, t: usize, dropout_seed: Option<u64>) -> f64 {
        let cfg = &self.config;
        let (c, f, v, l_n) = (cfg.n_embd, cfg.n_inner(), cfg.vocab_size, cfg.n_layer);
        let bt = b * t;
        let site = |id: u64, p: f64| match dropout_seed {
            Some(s) if p > 0.0 => Dropout { p: p as f32, seed: mix64(s ^ mix64(id)) },
            _ => Dropout::NONE,
        };
        let shape = AttnShape { b, t, n_head: cfg.n_head, head_size: cfg.head_size() };
        let (resid_p, attn_p, embd_p) = (cfg.resid_pdrop, cfg.attn_pdrop, cfg.embd_pdrop);
        let gelu = self.gelu;
        let be = &self.backend;
        let all = B::view(&self.params);
        let p = Tensors::from_ordered(self.infos.iter().map(|i| B::slice(all, i.offset, i.len)), l_n);
        // split the gradient buffer into one exclusive view per tensor
        let mut rest = B::view_mut(&mut self.grads);
        let mut views = Vec::with_capacity(self.infos.len());
        for info in &self.infos {
            let (head, tail) = B::split_at_mut(rest, info.len);
            views.push(head);
            rest = tail;
        }
        let mut g = Tensors::from_ordered(views.into_iter(), l_n);
        let a = self.acts.as_mut().expect("forward ran");

        // head: logits = lnf · wte^T, loss, dlnf = dlogits · wte, dwte += dlogits^T · lnf
        let grad = Some((B::view_mut(&mut a.dln), B::reborrow(&mut g.wte), dloss));
        let loss_sum = be.lm_head_loss(B::view_mut(&mut a.logits), B::view(&a.lnf), p.wte, targets, bt, v, c, grad);
        be.fill_zero(B::view_mut(&mut a.dres));
        let last = B::slice(B::view(&a.residual3), (l_n - 1) * bt * c, bt * c);
        be.layernorm_backward(
            B::view_mut(&mut a.dres),
            B::reborrow(&mut g.lnf_w),
            B::reborrow(&mut g.lnf_b),
            B::view(&a.dln),
            last,
            p.lnf_w,
            B::view(&a.lnf_mean),
            B::view(&a.lnf_rstd),
            bt,
            c,
        );

        for l in (0..l_n).rev() {
            let w = &p.blocks[l];
            let gw = &mut g.blocks[l];
            let x: B::View<'_> =
                if l == 0 { B::view(&a.encoded) } else { B::slice(B::view(&a.residual3), (l - 1) * bt * c, bt * c) };
            let ln1 = B::slice(B::view(&a.ln1), l * bt * c, bt * c);
            let qkv = B::slice(B::view(&a.qkv), l * bt * 3 * c, bt * 3 * c);
            let atty = B::slice(B::view(&a.atty), l * bt * c, bt * c);
            let probs = B::slice(B::view(&a.probs), l * shape.probs_len(), shape.probs_len());
            let res2 = B::slice(B::view(&a.residual2), l * bt * c, bt * c);
            let ln2 = B::slice(B::view(&a.ln2), l * bt * c, bt * c);
            let fch = B::slice(B::view(&a.fch), l * bt * f, bt * f);
            let fch_gelu = B::slice(B::view(&a.fch_gelu), l * bt * f, bt * f);

            // residual3 = residual2 + drop(fch_gelu · Wp + bp): dres already is d residual2's
            // skip share; the branch gets the dropout-masked copy
            be.copy(B::view_mut(&mut a.tmp), B::view(&a.dres));
            be.dropout_inplace(B::view_mut(&mut a.tmp), site(3 + 3 * l as u64, resid_p));
            let dbranch = B::view(&a.tmp);
            be.gemm(B::view_mut(&mut a.dfch_gelu), dbranch, w.fc_proj_w, GemmShape { m: bt, n: f, k: c, trans_a: false, trans_b: true, accumulate: false });
            be.gemm(B::reborrow(&mut gw.fc_proj_w), fch_gelu, dbranch, GemmShape { m: f, n: c, k: bt, trans_a: true, trans_b: false, accumulate: true });
            be.bias_backward(B::reborrow(&mut gw.fc_proj_b), dbranch, bt, c);
            be.fill_zero(B::view_mut(&mut a.dfch));
            be.gelu_backward(B::view_mut(&mut a.dfch), fch, B::view(&a.dfch_gelu), gelu);
            let dfch = B::view(&a.dfch);
            be.gemm(B::view_mut(&mut a.dln), dfch, w.fc_w, GemmShape { m: bt, n: c, k: f, trans_a: false, trans_b: true, accumulate: false });
            be.gemm(B::reborrow(&mut gw.fc_w), ln2, dfch, GemmShape { m: c, n: f, k: bt, trans_a: true, trans_b: false, accumulate: true });
            be.bias_backward(B::reborrow(&mut gw.fc_b), dfch, bt, f);
            be.layernorm_backward(
                B::view_mut(&mut a.dres),
                B::reborrow(&mut gw.ln2_w),
                B::reborrow(&mut gw.ln2_b),
                B::view(&a.dln),
                res2,
                w.ln2_w,
                B::slice(B::view(&a.ln2_mean), l * bt, bt),
                B::slice(B::view(&a.ln2_rstd), l * bt, bt),
                bt,
                c,
            );

            // residual2 = x + drop(atty · Wo + bo)
            be.copy(B::view_mut(&mut a.tmp), B::view(&a.dres));
            be.dropout_inplace(B::view_mut(&mut a.tmp), site(2 + 3 * l as u64, resid_p));
            let dbranch = B::view(&a.tmp);
            be.gemm(B::view_mut(&mut a.datty), dbranch, w.attn_proj_w, GemmShape { m: bt, n: c, k: c, trans_a: false, trans_b: true, accumulate: false });
            be.gemm(B::reborrow(&mut gw.attn_proj_w), atty, dbranch, GemmShape { m: c, n: c, k: bt, trans_a: true, trans_b: false, accumulate: true });
            be.bias_backward(B::reborrow(&mut gw.attn_proj_b), dbranch, bt, c);
            be.fill_zero(B::view_mut(&mut a.dqkv));
            be.attention_backward(B::view_mut(&mut a.dqkv), B::view(&a.datty), qkv, probs, shape, site(1 + 3 * l as u64, attn_p));
            let dqkv = B::view(&a.dqkv);
            be.gemm(B::view_mut(&mut a.dln), dqkv, w.attn_w, GemmShape { m: bt, n: c, k: 3 * c, trans_a: false, trans_b: true, accumulate: false });
            be.gemm(B::reborrow(&mut gw.attn_w), ln1, dqkv, GemmShape { m: c, n: 3 * c, k: bt, trans_a: true, trans_b: false, accumulate: true });
            be.bias_backward(B::reborrow(&mut gw.attn_b), dqkv, bt, 3 * c);
            be.layernorm_backward(
                B::view_mut(&mut a.dres),
                B::reborrow(&mut gw.ln1_w),
                B::reborrow(&mut gw.ln1_b),
                B::view(&a.dln),
                x,
                w.ln1_w,
                B::slice(B::view(&a.ln1_mean), l * bt, bt),
                B::slice(B::view(&a.ln1_rstd), l * bt, bt),
                bt,
                c,
            );
        }
        be.dropout_inplace(B::view_mut(&mut a.dres), site(0, embd_p));
        be.embedding_backward(B::reborrow(&mut g.wte), B::reborrow(&mut g.wpe), B::view(&a.dres), ids, b, t, c);
        loss_sum
    }

    /// An empty key/value cache for up to `max_len` positions (at most `n_positions`).
    pub fn new_kv_cache(&self, max_len: usize) -> KvCache<B> {
        let max_len = max_len.min(self.config.n_positions);
        let c = self.config.n_embd;
        let n = self.config.n_layer;
        KvCache {
            k: (0..n).map(|_| self.backend.alloc(max_len * c)).collect(),
            v: (0..n).map(|_| self.backend.alloc(max_len * c)).collect(),
            len: 0,
            max_len,
        }
    }

    /// Feed `tokens` (batch 1) after what `cache` already holds and return the logits of the
    /// last one (eval mode). Panics if the cache would overflow.
    pub fn forward_incremental(&self, cache: &mut KvCache<B>, tokens: &[u32]) -> Vec<f32> {
        let n = tokens.len();
        assert!(n > 0, "forward_incremental: no tokens");
        assert!(
            cache.len + n <= cache.max_len,
            "KV cache full: {} + {n} positions exceed its {} (n_positions {})",
            cache.len,
            cache.max_len,
            self.config.n_positions
        );
        let cfg = &self.config;
        let (c, f, v) = (cfg.n_embd, cfg.n_inner(), cfg.vocab_size);
        let eps = cfg.layer_norm_epsilon as f32;
        let be = &self.backend;
        let p = self.param_views();
        let start = cache.len;
        let buf = |len| be.alloc(len);
        let (mut x, mut ln, mut mean, mut rstd) = (buf(n * c), buf(n * c), buf(n), buf(n));
        let (mut qkv, mut q, mut atty, mut tmp) = (buf(n * 3 * c), buf(n * c), buf(n * c), buf(n * c));
        let (mut fch, mut fch_gelu) = (buf(n * f), buf(n * f));
        be.embedding_forward(B::view_mut(&mut x), p.wte, p.wpe, tokens, 1, n, c, start);
        for (l, w) in p.blocks.iter().enumerate() {
            be.layernorm_forward(B::view_mut(&mut ln), B::view_mut(&mut mean), B::view_mut(&mut rstd), B::view(&x), w.ln1_w, w.ln1_b, n, c, eps);
            be.gemm(B::view_mut(&mut qkv), B::view(&ln), w.attn_w, gemm_nn(n, c, 3 * c));
            be.add_bias(B::view_mut(&mut qkv), w.attn_b, n, 3 * c);
            for i in 0..n {
                let row = |part: usize| B::slice(B::view(&qkv), i * 3 * c + part * c, c);
                be.copy(B::slice_mut(B::view_mut(&mut q), i * c, c), row(0));
                be.copy(B::slice_mut(B::view_mut(&mut cache.k[l]), (start + i) * c, c), row(1));
                be.copy(B::slice_mut(B::view_mut(&mut cache.v[l]), (start + i) * c, c), row(2));
            }
            be.attention_cached(
                B::view_mut(&mut atty),
                B::view(&q),
                B::view(&cache.k[l]),
                B::view(&cache.v[l]),
                start,
                n,
                cfg.n_head,
                cfg.head_size(),
            );
            be.gemm(B::view_mut(&mut tmp), B::view(&atty), w.attn_proj_w, gemm_nn(n, c, c));
            be.add_bias(B::view_mut(&mut tmp), w.attn_proj_b, n, c);
            be.add_inplace(B::view_mut(&mut x), B::view(&tmp));
            be.layernorm_forward(B::view_mut(&mut ln), B::view_mut(&mut mean), B::view_mut(&mut rstd), B::view(&x), w.ln2_w, w.ln2_b, n, c, eps);
            be.gemm(B::view_mut(&mut fch), B::view(&ln), w.fc_w, gemm_nn(n, c, f));
            be.add_bias(B::view_mut(&mut fch), w.fc_b, n, f);
            be.gelu_forward(B::view_mut(&mut fch_gelu), B::view(&fch), self.gelu);
            be.gemm(B::view_mut(&mut tmp), B::view(&fch_gelu), w.fc_proj_w, gemm_nn(n, f, c));
            be.add_bias(B::view_mut(&mut tmp), w.fc_proj_b, n, c);
            be.add_inplace(B::view_mut(&mut x), B::view(&tmp));
        }
        cache.len += n;
        // only the last position's logits are needed
        let last = B::slice(B::view(&x), (n - 1) * c, c);
        let mut lnf = buf(c);
        let (mut m1, mut r1) = (buf(1), buf(1));
        be.layernorm_forward(B::view_mut(&mut lnf), B::view_mut(&mut m1), B::view_mut(&mut r1), last, p.lnf_w, p.lnf_b, 1, c, eps);
        let mut logits = buf(v);
        let s = GemmShape { m: 1, n: v, k: c, trans_a: false, trans_b: true, accumulate: false };
        be.gemm(B::view_mut(&mut logits), B::view(&lnf), p.wte, s);
        be.to_host(B::view(&logits))
    }
}

/// `targets[b, t] = labels[b, t + 1]`, the last position of each row ignored (the HF shift),
/// with every counted label checked against the vocabulary.
fn shifted_targets(labels: &[i32], b: usize, t: usize, vocab: usize) -> Vec<i32> {
    assert_eq!(labels.len(), b * t, "labels has {} entries, expected b*t = {}", labels.len(), b * t);
    let mut out = vec![IGNORE_INDEX; b * t];
    for bi in 0..b {
        for ti in 0..t - 1 {
            let y = labels[bi * t + ti + 1];
            assert!(
                y == IGNORE_INDEX || (y >= 0 && (y as usize) < vocab),
                "label {y} is outside the vocabulary (size {vocab}) and is not -100"
            );
            out[bi * t + ti] = y;
        }
    }
    out
}

/// Fill with normal(0, std) draws (Box-Muller on xoshiro256++).
fn fill_normal(dst: &mut [f32], std: f64, rng: &mut Xoshiro256PlusPlus) {
    let mut unit = || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64); // (0, 1)
    for pair in dst.chunks_mut(2) {
        let r = (-2.0 * unit().ln()).sqrt();
        let th = std::f64::consts::TAU * unit();
        pair[0] = (r * th.cos() * std) as f32;
        if let Some(y) = pair.get_mut(1) {
            *y = (r * th.sin() * std) as f32;
        }
    }
}
