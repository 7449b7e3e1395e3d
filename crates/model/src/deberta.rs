//! DeBERTa-v2 / v3 (`DebertaV2ForMaskedLM`): word embeddings (plus absolute positions only with
//! `position_biased_input`, token types when `type_vocab_size > 0`) at `embedding_size`, the
//! `embed_proj` to the hidden size when they differ, LayerNorm, the padding rows zeroed, dropout;
//! post-LN layers whose attention is disentangled ([`DisentangledAttention`]: content-to-content
//! plus the `pos_att_type` terms over log-bucketed relative positions, relative embeddings shared
//! by every layer, optionally LayerNorm-ed); the optional convolution layer after the first
//! layer (`conv_kernel_size`); the MLM head in the layout the config's `legacy` selects:
//! `cls.predictions.*` (dense to the embedding size, decoder tied to the word embeddings) or
//! `lm_predictions.lm_head.*` (the word embeddings used directly).

use serde::{Deserialize, Serialize};

use lmtrain_backend::{Backend, Dropout, GeluKind, PaddingIdx, RelPositions, Rows};

use crate::bert::check_sizes;
use crate::encoder::{TableSizes, upload_masked};
use crate::limits::{MAX_HEADS, MAX_INNER, MAX_LAYERS, MAX_POSITIONS, MAX_TYPE_VOCAB, MAX_VOCAB, MAX_WIDTH};
use crate::nn::block::{BlockSaved, BlockScratch};
use crate::nn::embedding::EmbSaved;
use crate::nn::head::MlmSaved;
use crate::nn::layernorm::LnSaved;
use crate::nn::mlp::gelu_of;
use crate::nn::{Block, DisentangledAttention, Dropouts, Embeddings, LayerNorm, Linear, MlmHead, Mlp, Order, TiedLmHead};
use crate::params::{Init, ParamBuilder, ParamInfo, ParamRef, ParamStore};
use crate::{HfSpec, Input, LanguageModel, ModelConfig, ModelError, Objective};

/// `pos_att_type` as a config may hold it: a list, or a `"p2c|c2p"` string (older configs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PosAttType {
    /// `["p2c", "c2p"]`.
    List(Vec<String>),
    /// `"p2c|c2p"` (split on `|`, trimmed, lowercased, as Hugging Face does).
    Joined(String),
}

impl PosAttType {
    /// The terms named.
    pub fn terms(&self) -> Vec<String> {
        match self {
            PosAttType::List(v) => v.clone(),
            PosAttType::Joined(s) => s.to_lowercase().split('|').map(|x| x.trim().to_string()).collect(),
        }
    }
}

/// DeBERTa-v2's `config.json`, field for field as Hugging Face reads it (the keys that are not
/// class fields, `position_buckets`, `share_att_key`, `norm_rel_ebd`, `conv_*`,
/// `embedding_size`, take Hugging Face's `getattr` defaults when absent); unknown fields are
/// kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DebertaV2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh).
    pub hidden_act: String,
    /// Dropout after the embeddings, each branch and on the relative embeddings.
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// Rows of the absolute position table (and the longest sequence).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (0: none).
    pub type_vocab_size: usize,
    /// Std of the normal initialisation.
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Relative-position terms in the attention.
    pub relative_attention: bool,
    /// Largest relative distance (`< 1`: `max_position_embeddings`).
    pub max_relative_positions: i64,
    /// Padding token id (`padding_idx` of the word embeddings).
    pub pad_token_id: Option<u32>,
    /// Add absolute position embeddings to the word embeddings.
    pub position_biased_input: bool,
    /// The relative terms: `c2p`, `p2c`.
    pub pos_att_type: Option<PosAttType>,
    /// The MLM head layout: `cls.predictions.*` (true) or `lm_predictions.lm_head.*`.
    pub legacy: bool,
    /// Log buckets of the relative positions (`<= 0`: none).
    pub position_buckets: i64,
    /// The position terms project the relative embeddings with the layer's own query / key.
    pub share_att_key: bool,
    /// `layer_norm`: LayerNorm on the relative embeddings (`none`: not).
    pub norm_rel_ebd: String,
    /// Kernel of the convolution layer after the first layer (0: none).
    pub conv_kernel_size: usize,
    /// Its activation.
    pub conv_act: String,
    /// Its groups (only 1 is supported).
    pub conv_groups: usize,
    /// Width of the embeddings (`hidden_size` when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    /// Channels per head (only `hidden_size / num_attention_heads` is supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_head_size: Option<usize>,
    /// `"deberta-v2"`.
    pub model_type: String,
    /// Written by lmtrain as `DebertaV2ForMaskedLM`.
    pub architectures: Option<Vec<String>>,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for DebertaV2Config {
    /// Hugging Face `DebertaV2Config()` defaults, with the getattr defaults of the extra keys.
    fn default() -> Self {
        DebertaV2Config {
            vocab_size: 128100,
            hidden_size: 1536,
            num_hidden_layers: 24,
            num_attention_heads: 24,
            intermediate_size: 6144,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-7,
            relative_attention: false,
            max_relative_positions: -1,
            pad_token_id: Some(0),
            position_biased_input: true,
            pos_att_type: None,
            legacy: true,
            position_buckets: -1,
            share_att_key: false,
            norm_rel_ebd: "none".into(),
            conv_kernel_size: 0,
            conv_act: "tanh".into(),
            conv_groups: 1,
            embedding_size: None,
            attention_head_size: None,
            model_type: "deberta-v2".into(),
            architectures: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// The position terms of a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Terms {
    c2p: bool,
    p2c: bool,
}

impl DebertaV2Config {
    /// The DeBERTa-v3 shape (`microsoft/deberta-v3-*`): relative attention with c2p and p2c,
    /// 256 log buckets over 512 positions, shared keys, LayerNorm on the relative embeddings,
    /// no absolute positions, no token types.
    pub fn v3() -> Self {
        DebertaV2Config {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            relative_attention: true,
            max_relative_positions: -1,
            position_biased_input: false,
            pos_att_type: Some(PosAttType::List(vec!["p2c".into(), "c2p".into()])),
            position_buckets: 256,
            share_att_key: true,
            norm_rel_ebd: "layer_norm".into(),
            ..DebertaV2Config::default()
        }
    }

    /// Width of the embeddings.
    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    fn terms(&self) -> Result<Terms, ModelError> {
        let names = self.pos_att_type.as_ref().map(PosAttType::terms).unwrap_or_default();
        if let Some(bad) = names.iter().find(|n| !matches!(n.as_str(), "c2p" | "p2c")) {
            return Err(ModelError::Config(format!("pos_att_type {bad:?} is not supported (c2p, p2c)")));
        }
        Ok(Terms { c2p: names.iter().any(|n| n == "c2p"), p2c: names.iter().any(|n| n == "p2c") })
    }

    fn norm_rel(&self) -> Result<bool, ModelError> {
        let parts: Vec<String> = self.norm_rel_ebd.to_lowercase().split('|').map(|x| x.trim().to_string()).collect();
        if let Some(bad) = parts.iter().find(|p| !matches!(p.as_str(), "none" | "layer_norm")) {
            return Err(ModelError::Config(format!("norm_rel_ebd {bad:?} is not supported (none, layer_norm)")));
        }
        Ok(parts.iter().any(|p| p == "layer_norm"))
    }

    /// The relative positions (with relative attention).
    fn rel_positions(&self) -> Option<RelPositions> {
        self.relative_attention.then(|| {
            let max_rel = if self.max_relative_positions < 1 { self.max_position_embeddings } else { self.max_relative_positions as usize };
            let buckets = self.position_buckets.max(0) as usize;
            RelPositions { span: if buckets > 0 { buckets } else { max_rel }, buckets, max_position: max_rel }
        })
    }

    fn conv_activation(&self) -> Result<ConvAct, ModelError> {
        match self.conv_act.as_str() {
            "tanh" => Ok(ConvAct::Tanh),
            other => gelu_of(other, "conv_act").map(ConvAct::Gelu).map_err(|_| {
                ModelError::Config(format!("conv_act {other:?} is not supported (tanh, gelu, gelu_new or gelu_pytorch_tanh)"))
            }),
        }
    }

    /// Declares the parameters (Hugging Face names) and composes the layers.
    fn declare(&self) -> Result<(Layers, Vec<ParamInfo>), ModelError> {
        let (h, v, e, eps) = (self.hidden_size, self.vocab_size, self.embedding_width(), self.layer_norm_eps);
        let gelu = gelu_of(&self.hidden_act, "hidden_act")?;
        let terms = self.terms()?;
        let std = self.initializer_range;
        let normal = Init::Normal(std);
        let root = ParamBuilder::new();
        let base = root.pp("deberta");
        let em = base.pp("embeddings");
        let word_init = match self.pad_token_id {
            Some(row) => Init::NormalZeroRow { std, row: row as usize },
            None => normal,
        };
        let word = em.pp("word_embeddings").weight("weight", &[v, e], word_init);
        let position =
            self.position_biased_input.then(|| em.pp("position_embeddings").weight("weight", &[self.max_position_embeddings, e], normal));
        let token_type =
            (self.type_vocab_size > 0).then(|| em.pp("token_type_embeddings").weight("weight", &[self.type_vocab_size, e], normal));
        let emb_ln = LayerNorm::new(&em.pp("LayerNorm"), h, eps);
        let embed_proj = (e != h).then(|| Linear::dense(&em.pp("embed_proj"), e, h, normal, false));
        let padding = PaddingIdx { word: self.pad_token_id, position: None };
        let emb = Embeddings { word, position, token_type, ln: None, padding, c: e };
        let rel = self.rel_positions();
        let hidden_p = self.hidden_dropout_prob as f32;
        let n = self.num_hidden_layers as u64;
        let blocks = (0..self.num_hidden_layers)
            .map(|i| {
                let l = base.pp(format!("encoder.layer.{i}"));
                let s = l.pp("attention.self");
                let qkv = Linear::stacked(&[s.pp("query_proj"), s.pp("key_proj"), s.pp("value_proj")], h, h, normal);
                // the rows of query_proj / key_proj inside the stacked product
                let part = |k: usize| Linear {
                    w: ParamRef { offset: qkv.w.offset + k * h * h, len: h * h },
                    b: qkv.b.map(|b| ParamRef { offset: b.offset + k * h, len: h }),
                    n_out: h,
                    ..qkv
                };
                let (pos_key, pos_query) = match rel {
                    None => (None, None),
                    Some(_) if self.share_att_key => (terms.c2p.then(|| part(1)), terms.p2c.then(|| part(0))),
                    Some(_) => (
                        terms.c2p.then(|| Linear::dense(&s.pp("pos_key_proj"), h, h, normal, true)),
                        terms.p2c.then(|| Linear::dense(&s.pp("pos_query_proj"), h, h, normal, true)),
                    ),
                };
                let proj = Linear::dense(&l.pp("attention.output.dense"), h, h, normal, true);
                let ln1 = LayerNorm::new(&l.pp("attention.output.LayerNorm"), h, eps);
                let fc = Linear::dense(&l.pp("intermediate.dense"), h, self.intermediate_size, normal, true);
                let out = Linear::dense(&l.pp("output.dense"), self.intermediate_size, h, normal, true);
                let ln2 = LayerNorm::new(&l.pp("output.LayerNorm"), h, eps);
                let scale_factor = 1 + terms.c2p as usize + terms.p2c as usize;
                let attn = DisentangledAttention { qkv, proj, n_head: self.num_attention_heads, pos_key, pos_query, rel, scale_factor };
                let site = 1 + 4 * i as u64;
                Block {
                    order: Order::PostLn,
                    ln1,
                    attn,
                    ln2,
                    mlp: Mlp { fc, proj: out, gelu, recompute: false },
                    attn_pdrop: self.attention_probs_dropout_prob as f32,
                    resid_pdrop: [hidden_p; 2],
                    sites: [site, site + 1, site + 2],
                }
            })
            .collect();
        let enc = base.pp("encoder");
        let table = rel.map(|r| (enc.pp("rel_embeddings").weight("weight", &[2 * r.span, h], normal), 2 * r.span));
        // Hugging Face declares the LayerNorm whenever norm_rel_ebd names it, relative attention
        // or not (without it the tensor is unused: its gradient stays 0)
        let rel_ln = self.norm_rel()?.then(|| LayerNorm::new(&enc.pp("LayerNorm"), h, eps));
        let rel = table.map(|(table, rows)| RelTable { table, rows, ln: rel_ln });
        let conv = (self.conv_kernel_size > 0)
            .then(|| -> Result<Conv, ModelError> {
                let k = self.conv_kernel_size;
                let p = enc.pp("conv");
                // nn.Conv1d's weight [out, in, k] is, row by row, the [out, in * k] matrix the
                // unfolded input multiplies
                let w = p.pp("conv").weight("weight", &[h, h, k], normal);
                let b = p.pp("conv").bias("bias", h);
                let lin = Linear { w, b: Some(b), n_in: h * k, n_out: h, layout: crate::nn::Layout::Linear };
                Ok(Conv { lin, k, act: self.conv_activation()?, ln: LayerNorm::new(&p.pp("LayerNorm"), h, eps), site: 1 + 4 * n })
            })
            .transpose()?;
        let head = if self.legacy {
            let p = root.pp("cls.predictions");
            let dense = Linear::dense(&p.pp("transform.dense"), h, e, normal, true);
            let ln = LayerNorm::new(&p.pp("transform.LayerNorm"), e, eps);
            let bias = p.bias("bias", v);
            MlmHead { dense, gelu, ln, decoder: TiedLmHead { wte: word, bias: Some(bias), vocab: v, c: e } }
        } else {
            let p = root.pp("lm_predictions.lm_head");
            let dense = Linear::dense(&p.pp("dense"), h, h, normal, true);
            let ln = LayerNorm::new(&p.pp("LayerNorm"), h, eps);
            let bias = p.bias("bias", v);
            MlmHead { dense, gelu, ln, decoder: TiedLmHead { wte: word, bias: Some(bias), vocab: v, c: h } }
        };
        Ok((Layers { emb, embed_proj, emb_ln, rel, blocks, conv, head, hidden_p }, root.finish()))
    }
}

impl ModelConfig for DebertaV2Config {
    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.model_type != "deberta-v2" {
            return bad(format!("model_type is {:?}, expected \"deberta-v2\"", self.model_type));
        }
        check_sizes(
            &[
                ("vocab_size", self.vocab_size, MAX_VOCAB),
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
                ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
                ("intermediate_size", self.intermediate_size, MAX_INNER),
                ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
                ("embedding_size", self.embedding_width(), MAX_WIDTH),
            ],
            self.hidden_size,
            self.num_attention_heads,
            &[("hidden_dropout_prob", self.hidden_dropout_prob), ("attention_probs_dropout_prob", self.attention_probs_dropout_prob)],
        )?;
        // 0 is allowed for these: no token types, no conv layer; <= 0 for the relative spans: the
        // defaults
        let bounded = [
            ("type_vocab_size", self.type_vocab_size as i64, MAX_TYPE_VOCAB),
            ("conv_kernel_size", self.conv_kernel_size as i64, MAX_POSITIONS),
            ("position_buckets", self.position_buckets, MAX_POSITIONS),
            ("max_relative_positions", self.max_relative_positions, MAX_POSITIONS),
        ];
        if let Some((name, v, max)) = bounded.iter().find(|(_, v, max)| *v > *max as i64) {
            return bad(format!("{name} {v} is too large: at most {max}"));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad(format!("layer_norm_eps {} must be positive", self.layer_norm_eps));
        }
        if self.pad_token_id.is_some_and(|p| p as usize >= self.vocab_size) {
            return bad(format!("pad_token_id {:?} is outside the vocabulary of {}", self.pad_token_id, self.vocab_size));
        }
        gelu_of(&self.hidden_act, "hidden_act")?;
        self.terms()?;
        self.norm_rel()?;
        let head_size = self.hidden_size / self.num_attention_heads;
        if let Some(a) = self.attention_head_size.filter(|&a| a != head_size) {
            return bad(format!("attention_head_size {a} is not supported (only hidden_size / num_attention_heads = {head_size})"));
        }
        if let Some(z) = self.extra.get("z_steps").filter(|z| z.as_u64().is_some_and(|z| z > 1)) {
            return bad(format!("z_steps {z} is not supported (0 or 1)"));
        }
        if self.relative_attention && self.position_buckets == 1 {
            return bad("position_buckets 1 is not supported (0 or less: no buckets; else at least 2)".into());
        }
        if let Some(r) = self.rel_positions().filter(|r| r.buckets > 0 && r.max_position <= r.buckets / 2 + 1) {
            return bad(format!(
                "position_buckets {} needs max_relative_positions (or max_position_embeddings) above {}, not {}",
                r.buckets,
                r.buckets / 2 + 1,
                r.max_position
            ));
        }
        if !self.legacy && self.embedding_width() != self.hidden_size {
            return bad(format!(
                "legacy false (the lm_predictions head) needs embedding_size {} = hidden_size {}",
                self.embedding_width(),
                self.hidden_size
            ));
        }
        if self.conv_kernel_size > 0 {
            if self.conv_kernel_size.is_multiple_of(2) {
                return bad(format!("conv_kernel_size {} is not supported (odd sizes only)", self.conv_kernel_size));
            }
            if self.conv_groups != 1 {
                return bad(format!("conv_groups {} is not supported (only 1)", self.conv_groups));
            }
            self.conv_activation()?;
        }
        Ok(())
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn for_saving(&self, spec: &HfSpec) -> Self {
        DebertaV2Config { model_type: "deberta-v2".into(), architectures: Some(vec![spec.architecture.into()]), ..self.clone() }
    }
}

/// The shared relative-embedding table.
#[derive(Clone, Copy, Debug)]
struct RelTable {
    table: ParamRef,
    rows: usize,
    /// `encoder.LayerNorm` (`norm_rel_ebd: layer_norm`).
    ln: Option<LayerNorm>,
}

/// The convolution layer's activation (`conv_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConvAct {
    Gelu(GeluKind),
    Tanh,
}

/// `encoder.conv`: `LayerNorm(layer0_out + act(dropout(mask(conv(e)))))`, masked.
#[derive(Clone, Copy, Debug)]
struct Conv {
    /// The convolution as a product with the unfolded input.
    lin: Linear,
    k: usize,
    act: ConvAct,
    ln: LayerNorm,
    /// Dropout site.
    site: u64,
}

/// The layers of a DeBERTa masked LM.
#[derive(Clone, Debug)]
struct Layers {
    /// Word (+ position) (+ token-type) lookup at the embedding width, no LayerNorm.
    emb: Embeddings,
    embed_proj: Option<Linear>,
    emb_ln: LayerNorm,
    rel: Option<RelTable>,
    blocks: Vec<Block<DisentangledAttention>>,
    conv: Option<Conv>,
    head: MlmHead,
    hidden_p: f32,
}

impl Layers {
    /// Dropout site of layer `i`'s relative embeddings.
    fn rel_site(i: usize) -> u64 {
        4 + 4 * i as u64
    }
}

/// The convolution layer's activations and gradients.
struct ConvSaved<B: Backend> {
    col: B::Buf,
    pre: B::Buf,
    act: B::Buf,
    sum: B::Buf,
    ln: LnSaved<B>,
    dsum: B::Buf,
    dpre: B::Buf,
    dcol: B::Buf,
    de: B::Buf,
}

/// Activations of one `(b, t)` shape.
struct Acts<B: Backend> {
    b: usize,
    t: usize,
    emb: EmbSaved<B>,
    proj: Option<B::Buf>,
    ln: LnSaved<B>,
    rel_ln: Option<LnSaved<B>>,
    blocks: Vec<BlockSaved<B, DisentangledAttention>>,
    conv: Option<ConvSaved<B>>,
    head: MlmSaved<B>,
    scratch: BlockScratch<B, DisentangledAttention>,
    dres: B::Buf,
    /// `[bt, h]`: the gradient at the embeddings' LayerNorm input.
    dln: B::Buf,
    /// `[bt, e]`: the gradient at the lookup's output (with `embed_proj`).
    demb: B::Buf,
    /// `[rows, h]`: the relative embeddings' gradient over every layer, and its LayerNorm's.
    drel: B::Buf,
    drel_table: B::Buf,
}

/// A DeBERTa-v2 masked LM on backend `B`.
pub struct Deberta<B: Backend> {
    config: DebertaV2Config,
    layers: Layers,
    backend: B,
    store: ParamStore<B>,
    acts: Option<Acts<B>>,
    head_rows: Rows,
}

impl<B: Backend> LanguageModel<B> for Deberta<B> {
    type Config = DebertaV2Config;
    const OBJECTIVE: Objective = Objective::MaskedLm;
    const HF: HfSpec = HfSpec {
        architecture: "DebertaV2ForMaskedLM",
        tied: &["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
        optional_prefix: Some("deberta."),
        buffers: &["embeddings.position_ids"],
        head: &["cls.", "lm_predictions."],
        renames: &[],
    };

    fn param_table(config: &DebertaV2Config) -> Result<Vec<ParamInfo>, ModelError> {
        Ok(config.declare()?.1)
    }

    fn from_params(backend: B, config: DebertaV2Config, params: Vec<f32>) -> Result<Self, ModelError> {
        config.validate()?;
        let (layers, infos) = config.declare()?;
        let store = ParamStore::new(&backend, infos, params)?;
        Ok(Deberta { config, layers, backend, store, acts: None, head_rows: Rows::Labelled })
    }

    fn config(&self) -> &DebertaV2Config {
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
        let last = layer_input(l, &a.ln, &a.blocks, &a.conv, l.blocks.len());
        l.head.logits(be, &w, &mut a.head, last, b * t)?;
        Ok(be.to_host(B::slice(B::view(a.head.logits()), 0, b * t * self.config.vocab_size))?)
    }
}

/// The input of layer `i` (the embeddings, the convolution layer's output, or the previous
/// layer's), and for `i = layers` the encoder's output.
fn layer_input<'s, B: Backend>(
    l: &Layers,
    ln: &'s LnSaved<B>,
    blocks: &'s [BlockSaved<B, DisentangledAttention>],
    conv: &'s Option<ConvSaved<B>>,
    i: usize,
) -> B::View<'s> {
    match (i, conv) {
        (0, _) => B::view(&ln.out),
        (1, Some(c)) => B::view(&c.ln.out),
        _ => l.blocks[i - 1].output(&blocks[i - 1]),
    }
}

impl<B: Backend> Deberta<B> {
    fn upload(&self, input: &Input<'_>, with_labels: bool) -> Result<(B::Batch, usize), ModelError> {
        let cfg = &self.config;
        let sizes = TableSizes { vocab: cfg.vocab_size, positions: cfg.max_position_embeddings, token_types: cfg.type_vocab_size };
        // without a token-type table Hugging Face ignores the token types
        let types = input.token_type_ids.filter(|_| cfg.type_vocab_size > 0);
        upload_masked(&self.backend, input, with_labels, types, None, sizes)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) -> Result<(), ModelError> {
        if self.acts.as_ref().is_some_and(|a| a.b == b && a.t == t) {
            return Ok(());
        }
        self.acts = None;
        let (be, l) = (&self.backend, &self.layers);
        let (bt, h, e) = (b * t, l.emb_ln.c, l.emb.c);
        let rows = l.rel.map_or(0, |r| r.rows);
        let conv = l
            .conv
            .map(|c| -> Result<ConvSaved<B>, ModelError> {
                Ok(ConvSaved {
                    col: be.alloc(bt * h * c.k)?,
                    pre: be.alloc(bt * h)?,
                    act: be.alloc(bt * h)?,
                    sum: be.alloc(bt * h)?,
                    ln: LnSaved::new(be, bt, h)?,
                    dsum: be.alloc(bt * h)?,
                    dpre: be.alloc(bt * h)?,
                    dcol: be.alloc(bt * h * c.k)?,
                    de: be.alloc(bt * h)?,
                })
            })
            .transpose()?;
        self.acts = Some(Acts {
            b,
            t,
            emb: l.emb.alloc(be, bt)?,
            proj: l.embed_proj.map(|_| be.alloc(bt * h)).transpose()?,
            ln: LnSaved::new(be, bt, h)?,
            rel_ln: l.rel.and_then(|r| r.ln).map(|_| LnSaved::new(be, rows, h)).transpose()?,
            blocks: l.blocks.iter().map(|blk| blk.alloc(be, b, t)).collect::<Result<Vec<_>, _>>()?,
            conv,
            head: l.head.alloc(be, bt)?,
            scratch: l.blocks[0].alloc_scratch(be, bt)?,
            dres: be.alloc(bt * h)?,
            dln: be.alloc(bt * h)?,
            demb: be.alloc(bt * e.max(h))?,
            drel: be.alloc(rows * h)?,
            drel_table: be.alloc(rows * h)?,
        });
        Ok(())
    }

    fn forward(&mut self, batch: &B::Batch, b: usize, t: usize, drop: &Dropouts) -> Result<(), ModelError> {
        self.ensure_acts(b, t)?;
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let Acts { emb, proj, ln, rel_ln, blocks, conv, scratch, .. } = self.acts.as_mut().expect("allocated above");
        let (bt, h) = (b * t, l.emb_ln.c);
        // embeddings: lookup -> (embed_proj) -> LayerNorm -> x mask -> dropout
        l.emb.forward(be, &w, emb, batch, bt, Dropout::NONE)?;
        let ln_in = match (&l.embed_proj, proj.as_mut()) {
            (Some(p), Some(buf)) => {
                p.forward(be, &w, B::view_mut(buf), emb.out(), bt)?;
                B::view(buf)
            }
            _ => emb.out(),
        };
        l.emb_ln.forward(be, &w, ln, ln_in, bt)?;
        be.zero_padded_rows(B::view_mut(&mut ln.out), batch, h)?;
        be.dropout_inplace(B::view_mut(&mut ln.out), drop.site(0, l.hidden_p))?;
        // the relative embeddings, each layer's with its own dropout
        if let Some(r) = &l.rel {
            let table = match (&r.ln, rel_ln.as_mut()) {
                (Some(rl), Some(saved)) => {
                    rl.forward(be, &w, saved, w.get(r.table), r.rows)?;
                    B::view(&saved.out)
                }
                _ => w.get(r.table),
            };
            for (i, s) in blocks.iter_mut().enumerate() {
                let dst = s.attn_mut().rel_mut();
                be.copy(B::view_mut(dst), table)?;
                be.dropout_inplace(B::view_mut(dst), drop.site(Layers::rel_site(i), l.hidden_p))?;
            }
        }
        for (i, blk) in l.blocks.iter().enumerate() {
            let (done, rest) = blocks.split_at_mut(i);
            let x = layer_input(l, ln, done, conv, i);
            blk.forward(be, &w, &mut rest[0], scratch, x, batch, (b, t), drop)?;
            if let (0, Some(c), Some(cs)) = (i, &l.conv, conv.as_mut()) {
                // conv(e) joins the first layer's output
                be.conv1d_unfold(B::view_mut(&mut cs.col), B::view(&ln.out), b, t, h, c.k)?;
                c.lin.forward(be, &w, B::view_mut(&mut cs.pre), B::view(&cs.col), bt)?;
                be.zero_padded_rows(B::view_mut(&mut cs.pre), batch, h)?;
                be.dropout_inplace(B::view_mut(&mut cs.pre), drop.site(c.site, l.hidden_p))?;
                match c.act {
                    ConvAct::Gelu(kind) => be.gelu_forward(B::view_mut(&mut cs.act), B::view(&cs.pre), kind)?,
                    ConvAct::Tanh => be.tanh_forward(B::view_mut(&mut cs.act), B::view(&cs.pre))?,
                }
                be.residual_forward(B::view_mut(&mut cs.sum), blk.output(&rest[0]), B::view(&cs.act))?;
                c.ln.forward(be, &w, &mut cs.ln, B::view(&cs.sum), bt)?;
                be.zero_padded_rows(B::view_mut(&mut cs.ln.out), batch, h)?;
            }
        }
        Ok(())
    }

    fn head_loss(&mut self, batch: &B::Batch, n_labels: usize, stats: &mut B::Stats, weight: f64) -> Result<(), ModelError> {
        let (be, l, w) = (&self.backend, &self.layers, self.store.weights());
        let a = self.acts.as_mut().expect("forward ran");
        let last = layer_input(l, &a.ln, &a.blocks, &a.conv, l.blocks.len());
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
        let Acts { emb, proj, ln, rel_ln, blocks, conv, head, scratch, dres, dln, demb, drel, drel_table, .. } =
            self.acts.as_mut().expect("forward ran");
        let (bt, h) = (b * t, l.emb_ln.c);
        be.fill_zero(B::view_mut(dres))?;
        let last = layer_input(l, ln, blocks, conv, l.blocks.len());
        let (rows, n) = if self.head_rows == Rows::All { (Rows::All, bt) } else { (Rows::Labelled, n_labels) };
        l.head.loss(be, &w, Some(&mut g), head, last, batch, rows, n, Some((B::view_mut(dres), 1.0 / n_labels as f32)), stats, 1.0)?;
        be.fill_zero(B::view_mut(drel))?;
        for i in (0..l.blocks.len()).rev() {
            if let (0, Some(c), Some(cs)) = (i, &l.conv, conv.as_mut()) {
                // dres: the gradient at the convolution layer's output
                be.zero_padded_rows(B::view_mut(dres), batch, h)?;
                be.fill_zero(B::view_mut(&mut cs.dsum))?;
                c.ln.backward(be, &w, &mut g, B::view_mut(&mut cs.dsum), B::view(dres), B::view(&cs.sum), &cs.ln, bt)?;
                be.fill_zero(B::view_mut(&mut cs.dpre))?;
                match c.act {
                    ConvAct::Gelu(kind) => be.gelu_backward(B::view_mut(&mut cs.dpre), B::view(&cs.pre), B::view(&cs.dsum), kind)?,
                    ConvAct::Tanh => be.tanh_backward(B::view_mut(&mut cs.dpre), B::view(&cs.act), B::view(&cs.dsum))?,
                }
                be.dropout_inplace(B::view_mut(&mut cs.dpre), drop.site(c.site, l.hidden_p))?;
                be.zero_padded_rows(B::view_mut(&mut cs.dpre), batch, h)?;
                c.lin.backward(be, &w, &mut g, Some(B::view_mut(&mut cs.dcol)), B::view(&cs.col), B::view(&cs.dpre), bt)?;
                be.fill_zero(B::view_mut(&mut cs.de))?;
                be.conv1d_fold(B::view_mut(&mut cs.de), B::view(&cs.dcol), b, t, h, c.k)?;
                // the residual share goes on into the first layer
                be.copy(B::view_mut(dres), B::view(&cs.dsum))?;
            }
            let x = layer_input(l, ln, blocks, conv, i);
            l.blocks[i].backward(be, &w, &mut g, &blocks[i], scratch, B::view_mut(dres), x, batch, (b, t), drop)?;
            if l.rel.is_some() {
                let d = scratch.attn().drel();
                be.dropout_inplace(B::view_mut(d), drop.site(Layers::rel_site(i), l.hidden_p))?;
                be.add_inplace(B::view_mut(drel), B::view(d))?;
            }
        }
        if let Some(cs) = conv.as_ref() {
            be.add_inplace(B::view_mut(dres), B::view(&cs.de))?;
        }
        // embeddings
        be.dropout_inplace(B::view_mut(dres), drop.site(0, l.hidden_p))?;
        be.zero_padded_rows(B::view_mut(dres), batch, h)?;
        be.fill_zero(B::view_mut(dln))?;
        let ln_in = proj.as_ref().map_or_else(|| emb.out(), |p| B::view(p));
        l.emb_ln.backward(be, &w, &mut g, B::view_mut(dln), B::view(dres), ln_in, ln, bt)?;
        let e = l.emb.c;
        let (dlookup, spare) = match &l.embed_proj {
            Some(p) => {
                p.backward(be, &w, &mut g, Some(B::slice_mut(B::view_mut(demb), 0, bt * e)), emb.out(), B::view(dln), bt)?;
                (B::slice_mut(B::view_mut(demb), 0, bt * e), B::view_mut(dln))
            }
            None => (B::view_mut(dln), B::slice_mut(B::view_mut(demb), 0, bt * e)),
        };
        l.emb.backward(be, &w, &mut g, dlookup, spare, emb, batch, bt, Dropout::NONE)?;
        // the relative-embedding table: through its LayerNorm when it has one
        if let Some(r) = &l.rel {
            match (&r.ln, rel_ln.as_ref()) {
                (Some(rl), Some(saved)) => {
                    be.fill_zero(B::view_mut(drel_table))?;
                    rl.backward(be, &w, &mut g, B::view_mut(drel_table), B::view(drel), w.get(r.table), saved, r.rows)?;
                    be.add_inplace(g.get(r.table), B::view(drel_table))?;
                }
                _ => be.add_inplace(g.get(r.table), B::view(drel))?,
            }
        }
        Ok(())
    }

    /// Where the MLM head runs: [`Rows::Labelled`] (the default) or every position as Hugging
    /// Face does ([`Rows::All`]: the same loss and gradients at more cost; for tests and
    /// benchmarks).
    pub fn set_head_rows(&mut self, rows: Rows) {
        self.head_rows = rows;
    }
}

impl<B: Backend<Buf = Vec<f32>>> Deberta<B> {
    /// The flat parameter buffer (host-memory backends).
    pub fn params(&self) -> &[f32] {
        self.store.params()
    }
    /// The flat gradient buffer.
    pub fn grads(&self) -> &[f32] {
        self.store.grads()
    }
}
