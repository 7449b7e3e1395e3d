//! BERT (`BertForMaskedLM`) and RoBERTa (`RobertaForMaskedLM`): word + position + token-type
//! embeddings with LayerNorm, post-LN layers with separate q/k/v (stacked into one product),
//! the MLM head (dense -> activation -> LayerNorm -> decoder tied to the word embeddings, plus
//! its own bias). RoBERTa differs in its names, its position ids (counted from the padding
//! index over the real tokens) and its head's activation (always erf GELU).

use serde::{Deserialize, Serialize};

use lmtrain_backend::{GeluKind, PaddingIdx};

use crate::limits::{MAX_HEADS, MAX_INNER, MAX_LAYERS, MAX_POSITIONS, MAX_TYPE_VOCAB, MAX_VOCAB, MAX_WIDTH, check_size};
use crate::nn::mlp::gelu_of;

use crate::encoder::{EncoderConfig, EncoderLayers, MaskedLm};
use crate::nn::{Block, Embeddings, LayerNorm, Linear, MlmHead, Mlp, Order, SelfAttention, TiedLmHead};
use crate::params::{Init, ParamBuilder, ParamInfo};
use crate::{HfSpec, ModelConfig, ModelError};

/// A BERT masked LM.
pub type Bert<B> = MaskedLm<B, BertConfig>;
/// A RoBERTa masked LM.
pub type Roberta<B> = MaskedLm<B, RobertaConfig>;

/// `config.json` of BERT and RoBERTa, field for field as Hugging Face writes it; unknown fields
/// are kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
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
    /// Dropout after the embeddings and each branch.
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    pub type_vocab_size: usize,
    /// Std of the normal initialisation.
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id (`padding_idx` of the word embeddings).
    pub pad_token_id: Option<u32>,
    /// Only `absolute` is supported.
    pub position_embedding_type: Option<String>,
    /// `"bert"` or `"roberta"`.
    pub model_type: String,
    /// Written by lmtrain as the family's `*ForMaskedLM`.
    pub architectures: Option<Vec<String>>,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for BertConfig {
    /// Hugging Face `BertConfig()` defaults (bert-base).
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: None,
            model_type: "bert".into(),
            architectures: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Checks shared by the encoder families: every `(name, size, bound)` between 1 and its bound
/// (the [`crate::limits`] bounds, so the parameter table is small and its sizes cannot
/// overflow), the width divisible by the heads, the dropouts in [0, 1).
pub(crate) fn check_sizes(sizes: &[(&str, usize, usize)], width: usize, heads: usize, dropouts: &[(&str, f64)]) -> Result<(), ModelError> {
    let bad = |m: String| Err(ModelError::Config(m));
    for &(name, value, max) in sizes {
        check_size(name, value, max)?;
    }
    if !width.is_multiple_of(heads) {
        return bad(format!("the width {width} is not divisible by the {heads} heads"));
    }
    if let Some((name, p)) = dropouts.iter().find(|(_, p)| !(0.0..1.0).contains(p)) {
        return bad(format!("{name} {p} must be in [0, 1)"));
    }
    Ok(())
}

impl BertConfig {
    fn validate_as(&self, model_type: &str) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.model_type != model_type {
            return bad(format!("model_type is {:?}, expected {model_type:?}", self.model_type));
        }
        check_sizes(
            &[
                ("vocab_size", self.vocab_size, MAX_VOCAB),
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
                ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
                ("intermediate_size", self.intermediate_size, MAX_INNER),
                ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
            ],
            self.hidden_size,
            self.num_attention_heads,
            &[("hidden_dropout_prob", self.hidden_dropout_prob), ("attention_probs_dropout_prob", self.attention_probs_dropout_prob)],
        )?;
        if self.type_vocab_size > MAX_TYPE_VOCAB {
            // 0 is allowed: no token-type embeddings
            return bad(format!("type_vocab_size {} is too large: allowed 0 to {MAX_TYPE_VOCAB}", self.type_vocab_size));
        }
        if let Some(p) = self.position_embedding_type.as_deref().filter(|p| *p != "absolute") {
            return bad(format!("position_embedding_type {p:?} is not supported (absolute)"));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad(format!("layer_norm_eps {} must be positive", self.layer_norm_eps));
        }
        if self.pad_token_id.is_some_and(|p| p as usize >= self.vocab_size) {
            return bad(format!("pad_token_id {:?} is outside the vocabulary of {}", self.pad_token_id, self.vocab_size));
        }
        gelu_of(&self.hidden_act, "hidden_act").map(|_| ())
    }

    /// The declarations shared by BERT and RoBERTa under `prefix`; `head` builds the family's
    /// head from the word embeddings.
    fn declare_encoder(
        &self,
        prefix: &str,
        position_padding: Option<u32>,
        head: impl FnOnce(&ParamBuilder, TiedLmHead) -> Result<MlmHead, ModelError>,
    ) -> Result<(EncoderLayers, Vec<ParamInfo>), ModelError> {
        let (h, v, eps) = (self.hidden_size, self.vocab_size, self.layer_norm_eps);
        let gelu = gelu_of(&self.hidden_act, "hidden_act")?;
        let std = self.initializer_range;
        let embedding_init = |pad: Option<u32>| match pad {
            Some(row) => Init::NormalZeroRow { std, row: row as usize },
            None => Init::Normal(std),
        };
        let root = ParamBuilder::new();
        let base = root.pp(prefix);
        let e = base.pp("embeddings");
        let word = e.pp("word_embeddings").weight("weight", &[v, h], embedding_init(self.pad_token_id));
        let position = e.pp("position_embeddings").weight("weight", &[self.max_position_embeddings, h], embedding_init(position_padding));
        let token_type = (self.type_vocab_size > 0)
            .then(|| e.pp("token_type_embeddings").weight("weight", &[self.type_vocab_size, h], Init::Normal(std)));
        let ln = LayerNorm::new(&e.pp("LayerNorm"), h, eps);
        let padding = PaddingIdx { word: self.pad_token_id, position: position_padding };
        let emb = Embeddings { word, position: Some(position), token_type, ln: Some(ln), padding, c: h };
        let hidden_p = self.hidden_dropout_prob as f32;
        let blocks = (0..self.num_hidden_layers)
            .map(|i| {
                let l = base.pp(format!("encoder.layer.{i}"));
                let s = l.pp("attention.self");
                let qkv = Linear::stacked(&[s.pp("query"), s.pp("key"), s.pp("value")], h, h, Init::Normal(std));
                let proj = Linear::dense(&l.pp("attention.output.dense"), h, h, Init::Normal(std), true);
                let ln1 = LayerNorm::new(&l.pp("attention.output.LayerNorm"), h, eps);
                let fc = Linear::dense(&l.pp("intermediate.dense"), h, self.intermediate_size, Init::Normal(std), true);
                let out = Linear::dense(&l.pp("output.dense"), self.intermediate_size, h, Init::Normal(std), true);
                let ln2 = LayerNorm::new(&l.pp("output.LayerNorm"), h, eps);
                let site = 1 + 3 * i as u64;
                Block {
                    order: Order::PostLn,
                    ln1,
                    attn: SelfAttention { qkv, proj, n_head: self.num_attention_heads, causal: false },
                    ln2,
                    mlp: Mlp { fc, proj: out, gelu, recompute: false },
                    attn_pdrop: self.attention_probs_dropout_prob as f32,
                    resid_pdrop: [hidden_p; 2],
                    sites: [site, site + 1, site + 2],
                }
            })
            .collect();
        let decoder = TiedLmHead { wte: word, bias: None, vocab: v, c: h };
        let head = head(&root, decoder)?;
        Ok((EncoderLayers { emb, blocks, head, emb_pdrop: hidden_p }, root.finish()))
    }
}

impl ModelConfig for BertConfig {
    fn validate(&self) -> Result<(), ModelError> {
        self.validate_as("bert")
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn for_saving(&self, spec: &HfSpec) -> Self {
        BertConfig { model_type: "bert".into(), architectures: Some(vec![spec.architecture.into()]), ..self.clone() }
    }
}

impl EncoderConfig for BertConfig {
    const HF: HfSpec = HfSpec {
        architecture: "BertForMaskedLM",
        tied: &["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
        optional_prefix: Some("bert."),
        buffers: &["embeddings.position_ids", "embeddings.token_type_ids"],
        head: &["cls."],
        renames: &[("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")],
    };

    fn declare(&self) -> Result<(EncoderLayers, Vec<ParamInfo>), ModelError> {
        let (h, eps, std) = (self.hidden_size, self.layer_norm_eps, self.initializer_range);
        let gelu = gelu_of(&self.hidden_act, "hidden_act")?;
        self.declare_encoder("bert", None, |root, mut decoder| {
            let p = root.pp("cls.predictions");
            let dense = Linear::dense(&p.pp("transform.dense"), h, h, Init::Normal(std), true);
            let ln = LayerNorm::new(&p.pp("transform.LayerNorm"), h, eps);
            decoder.bias = Some(p.bias("bias", decoder.vocab));
            Ok(MlmHead { dense, gelu, ln, decoder })
        })
    }

    fn type_vocab_size(&self) -> usize {
        self.type_vocab_size
    }
}

/// RoBERTa's `config.json` (the BERT fields; `model_type` `"roberta"`, a padding id required).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RobertaConfig(pub BertConfig);

impl Default for RobertaConfig {
    /// Hugging Face `RobertaConfig()` defaults (roberta-base).
    fn default() -> Self {
        RobertaConfig(BertConfig {
            vocab_size: 50265,
            max_position_embeddings: 514,
            type_vocab_size: 1,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            model_type: "roberta".into(),
            ..BertConfig::default()
        })
    }
}

impl RobertaConfig {
    fn pad(&self) -> u32 {
        self.0.pad_token_id.unwrap_or(1)
    }
}

impl ModelConfig for RobertaConfig {
    fn validate(&self) -> Result<(), ModelError> {
        self.0.validate_as("roberta")?;
        if self.0.pad_token_id.is_none() {
            return Err(ModelError::Config("RoBERTa needs pad_token_id (its position ids count from it)".into()));
        }
        if self.0.max_position_embeddings <= self.pad() as usize + 1 {
            return Err(ModelError::Config(format!(
                "max_position_embeddings {} leaves no positions after the padding index {}",
                self.0.max_position_embeddings,
                self.pad()
            )));
        }
        Ok(())
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size
    }
    /// Positions start after the padding index.
    fn max_positions(&self) -> usize {
        self.0.max_position_embeddings - self.pad() as usize - 1
    }
    fn for_saving(&self, spec: &HfSpec) -> Self {
        RobertaConfig(BertConfig { model_type: "roberta".into(), architectures: Some(vec![spec.architecture.into()]), ..self.0.clone() })
    }
}

impl EncoderConfig for RobertaConfig {
    const HF: HfSpec = HfSpec {
        architecture: "RobertaForMaskedLM",
        tied: &["lm_head.decoder.weight", "lm_head.decoder.bias"],
        optional_prefix: Some("roberta."),
        buffers: &["embeddings.position_ids", "embeddings.token_type_ids"],
        head: &["lm_head."],
        renames: &[],
    };

    fn declare(&self) -> Result<(EncoderLayers, Vec<ParamInfo>), ModelError> {
        let c = &self.0;
        let (h, eps, std) = (c.hidden_size, c.layer_norm_eps, c.initializer_range);
        c.declare_encoder("roberta", Some(self.pad()), |root, mut decoder| {
            let p = root.pp("lm_head");
            let dense = Linear::dense(&p.pp("dense"), h, h, Init::Normal(std), true);
            let ln = LayerNorm::new(&p.pp("layer_norm"), h, eps);
            decoder.bias = Some(p.bias("bias", decoder.vocab));
            // RobertaLMHead applies the erf GELU whatever hidden_act says
            Ok(MlmHead { dense, gelu: GeluKind::Erf, ln, decoder })
        })
    }

    fn type_vocab_size(&self) -> usize {
        self.0.type_vocab_size
    }

    fn position_rows(&self) -> usize {
        self.0.max_position_embeddings
    }

    /// `padding_idx + cumsum(id != pad) * (id != pad)` per row (HF
    /// `create_position_ids_from_input_ids`): padding gets the padding index, real tokens count
    /// up from it.
    fn position_ids(&self, ids: &[u32], b: usize, t: usize) -> Option<Vec<u32>> {
        let pad = self.pad();
        let mut out = vec![pad; b * t];
        for (row, o) in ids.chunks(t).zip(out.chunks_mut(t)) {
            let mut n = 0;
            for (&id, o) in row.iter().zip(o) {
                if id != pad {
                    n += 1;
                    *o = pad + n;
                }
            }
        }
        Some(out)
    }
}
