//! DistilBERT (`DistilBertForMaskedLM`): word + position embeddings (learned, or initialised
//! to the sinusoidal table) with LayerNorm, no token types, post-LN layers (`q_lin`/`k_lin`/
//! `v_lin`/`out_lin`, `sa_layer_norm`, `ffn.lin1`/`lin2`, `output_layer_norm`; no dropout after
//! the attention output), and the head `vocab_transform` -> activation -> `vocab_layer_norm`
//! -> `vocab_projector` tied to the word embeddings plus its bias. Every LayerNorm epsilon is
//! 1e-12 (hard-coded in Hugging Face).

use serde::{Deserialize, Serialize};

use lmtrain_backend::PaddingIdx;

use crate::bert::check_sizes;
use crate::encoder::{EncoderConfig, EncoderLayers, MaskedLm};
use crate::limits::{MAX_HEADS, MAX_INNER, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH};
use crate::nn::mlp::gelu_of;
use crate::nn::{Block, Embeddings, LayerNorm, Linear, MlmHead, Mlp, Order, SelfAttention, TiedLmHead};
use crate::params::{Init, ParamBuilder, ParamInfo};
use crate::{HfSpec, ModelConfig, ModelError};

/// A DistilBERT masked LM.
pub type DistilBert<B> = MaskedLm<B, DistilBertConfig>;

/// LayerNorm epsilon of every DistilBERT LayerNorm.
const EPS: f64 = 1e-12;

/// DistilBERT's `config.json`, field for field; unknown fields kept in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistilBertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub dim: usize,
    /// Layers.
    pub n_layers: usize,
    /// Heads.
    pub n_heads: usize,
    /// MLP width.
    pub hidden_dim: usize,
    /// Dropout after the embeddings and the MLP branch.
    pub dropout: f64,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f64,
    /// `gelu` or `gelu_new`.
    pub activation: String,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Initialise the position table to the sinusoidal table (it is trained all the same).
    pub sinusoidal_pos_embds: bool,
    /// Std of the normal initialisation.
    pub initializer_range: f64,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// `"distilbert"`.
    pub model_type: String,
    /// Written by lmtrain as `DistilBertForMaskedLM`.
    pub architectures: Option<Vec<String>>,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for DistilBertConfig {
    /// Hugging Face `DistilBertConfig()` defaults.
    fn default() -> Self {
        DistilBertConfig {
            vocab_size: 30522,
            dim: 768,
            n_layers: 6,
            n_heads: 12,
            hidden_dim: 3072,
            dropout: 0.1,
            attention_dropout: 0.1,
            activation: "gelu".into(),
            max_position_embeddings: 512,
            sinusoidal_pos_embds: false,
            initializer_range: 0.02,
            pad_token_id: Some(0),
            model_type: "distilbert".into(),
            architectures: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl ModelConfig for DistilBertConfig {
    fn validate(&self) -> Result<(), ModelError> {
        if self.model_type != "distilbert" {
            return Err(ModelError::Config(format!("model_type is {:?}, expected \"distilbert\"", self.model_type)));
        }
        check_sizes(
            &[
                ("vocab_size", self.vocab_size, MAX_VOCAB),
                ("dim", self.dim, MAX_WIDTH),
                ("n_layers", self.n_layers, MAX_LAYERS),
                ("n_heads", self.n_heads, MAX_HEADS),
                ("hidden_dim", self.hidden_dim, MAX_INNER),
                ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
            ],
            self.dim,
            self.n_heads,
            &[("dropout", self.dropout), ("attention_dropout", self.attention_dropout)],
        )?;
        if self.pad_token_id.is_some_and(|p| p as usize >= self.vocab_size) {
            return Err(ModelError::Config(format!(
                "pad_token_id {:?} is outside the vocabulary of {}",
                self.pad_token_id, self.vocab_size
            )));
        }
        gelu_of(&self.activation, "activation").map(|_| ())
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn for_saving(&self, spec: &HfSpec) -> Self {
        DistilBertConfig { model_type: "distilbert".into(), architectures: Some(vec![spec.architecture.into()]), ..self.clone() }
    }
}

impl EncoderConfig for DistilBertConfig {
    const HF: HfSpec = HfSpec {
        architecture: "DistilBertForMaskedLM",
        tied: &["vocab_projector.weight"],
        optional_prefix: Some("distilbert."),
        buffers: &["embeddings.position_ids"],
        head: &["vocab_"],
        renames: &[],
    };

    fn declare(&self) -> Result<(EncoderLayers, Vec<ParamInfo>), ModelError> {
        let (h, v) = (self.dim, self.vocab_size);
        let gelu = gelu_of(&self.activation, "activation")?;
        let std = Init::Normal(self.initializer_range);
        let root = ParamBuilder::new();
        let base = root.pp("distilbert");
        let e = base.pp("embeddings");
        let word_init = match self.pad_token_id {
            Some(row) => Init::NormalZeroRow { std: self.initializer_range, row: row as usize },
            None => std,
        };
        let word = e.pp("word_embeddings").weight("weight", &[v, h], word_init);
        let pos_init = if self.sinusoidal_pos_embds { Init::Sinusoidal } else { std };
        let position = e.pp("position_embeddings").weight("weight", &[self.max_position_embeddings, h], pos_init);
        let ln = LayerNorm::new(&e.pp("LayerNorm"), h, EPS);
        let padding = PaddingIdx { word: self.pad_token_id, position: None };
        let emb = Embeddings { word, position: Some(position), token_type: None, ln: Some(ln), padding, c: h };
        let blocks = (0..self.n_layers)
            .map(|i| {
                let l = base.pp(format!("transformer.layer.{i}"));
                let a = l.pp("attention");
                let qkv = Linear::stacked(&[a.pp("q_lin"), a.pp("k_lin"), a.pp("v_lin")], h, h, std);
                let proj = Linear::dense(&a.pp("out_lin"), h, h, std, true);
                let ln1 = LayerNorm::new(&l.pp("sa_layer_norm"), h, EPS);
                let fc = Linear::dense(&l.pp("ffn.lin1"), h, self.hidden_dim, std, true);
                let out = Linear::dense(&l.pp("ffn.lin2"), self.hidden_dim, h, std, true);
                let ln2 = LayerNorm::new(&l.pp("output_layer_norm"), h, EPS);
                let site = 1 + 3 * i as u64;
                Block {
                    order: Order::PostLn,
                    ln1,
                    attn: SelfAttention { qkv, proj, n_head: self.n_heads, causal: false },
                    ln2,
                    mlp: Mlp { fc, proj: out, gelu, recompute: false },
                    attn_pdrop: self.attention_dropout as f32,
                    resid_pdrop: [0.0, self.dropout as f32],
                    sites: [site, site + 1, site + 2],
                }
            })
            .collect();
        let dense = Linear::dense(&root.pp("vocab_transform"), h, h, std, true);
        let head_ln = LayerNorm::new(&root.pp("vocab_layer_norm"), h, EPS);
        let bias = root.pp("vocab_projector").bias("bias", v);
        let decoder = TiedLmHead { wte: word, bias: Some(bias), vocab: v, c: h };
        let head = MlmHead { dense, gelu, ln: head_ln, decoder };
        Ok((EncoderLayers { emb, blocks, head, emb_pdrop: self.dropout as f32 }, root.finish()))
    }

    fn type_vocab_size(&self) -> usize {
        0
    }
}
