//! GPT-2 `config.json`, field for field as Hugging Face writes it.

use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::limits::{MAX_HEADS, MAX_INNER, MAX_LAYERS, MAX_PARAMS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, check_size};
use lmtrain_backend::GeluKind;

/// GPT-2 configuration with Hugging Face `config.json` field names. Fields lmtrain does not
/// interpret (`n_ctx`, `summary_*`, `task_specific_params`, `transformers_version`, ...) are kept
/// in [`Gpt2Config::extra`] and written back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// Maximum sequence length (rows of `wpe`).
    pub n_positions: usize,
    /// Model width.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// MLP width; `None` = `4 * n_embd`.
    pub n_inner: Option<usize>,
    /// `gelu_new` (GPT-2), `gelu_pytorch_tanh` (same function) or `gelu` (exact erf).
    pub activation_function: String,
    /// Dropout after each residual branch.
    pub resid_pdrop: f64,
    /// Dropout after the embeddings.
    pub embd_pdrop: f64,
    /// Dropout on the attention probabilities.
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Std of the normal initialisation.
    pub initializer_range: f64,
    /// Scale attention scores by `1/sqrt(head_size)` (must be true).
    pub scale_attn_weights: bool,
    /// GPT-2 variant option; only `false` is supported.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// GPT-2 variant option; only `false` is supported.
    pub reorder_and_upcast_attn: bool,
    /// `lm_head` shares `wte` (the only layout lmtrain implements).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
    /// Always `"gpt2"`.
    pub model_type: String,
    /// `["GPT2LMHeadModel"]` when written by lmtrain.
    pub architectures: Option<Vec<String>>,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for Gpt2Config {
    /// Hugging Face `GPT2Config()` defaults (gpt2 124M).
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            model_type: "gpt2".into(),
            architectures: Some(vec!["GPT2LMHeadModel".into()]),
            extra: serde_json::Map::new(),
        }
    }
}

impl Gpt2Config {
    /// MLP width.
    pub fn n_inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Channels per attention head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The MLP activation.
    pub fn gelu_kind(&self) -> Result<GeluKind, ModelError> {
        crate::nn::mlp::gelu_of(&self.activation_function, "activation_function")
    }

    /// Check that a model can be built from this configuration, before anything is
    /// allocated: every size positive and within its bound, and the parameter count
    /// (computed with checked arithmetic) at most 2^36 (68.7 billion parameters, 275 GB of
    /// f32 weights). Bounds: vocab_size up to 16,777,216, n_positions up to 1,048,576,
    /// n_embd up to 65,536, n_inner up to 262,144, n_layer up to 4,096.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.model_type != "gpt2" {
            return bad(format!("model_type is {:?}, expected \"gpt2\"", self.model_type));
        }
        // `n_inner()` multiplies; compute it here without overflowing.
        let n_inner = match self.n_inner {
            Some(v) => v,
            None => match self.n_embd.checked_mul(4) {
                Some(v) => v,
                None => return bad(format!("n_embd {} is too large: allowed 1 to {MAX_WIDTH}", self.n_embd)),
            },
        };
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("n_positions", self.n_positions, MAX_POSITIONS),
            ("n_embd", self.n_embd, MAX_WIDTH),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("n_head", self.n_head, MAX_HEADS),
            ("n_inner", n_inner, MAX_INNER),
        ] {
            check_size(name, v, max)?;
        }
        // Parameters: wte + wpe + per layer (2 LayerNorms, c_attn, attn c_proj, c_fc, mlp
        // c_proj) + ln_f. u128 cannot overflow with the bounds above; checked anyway.
        let (v, p, e, l, i) =
            (self.vocab_size as u128, self.n_positions as u128, self.n_embd as u128, self.n_layer as u128, n_inner as u128);
        let per_layer = (|| {
            let ln = 4u128.checked_mul(e)?;
            let attn = e.checked_mul(3 * e)?.checked_add(3 * e)?.checked_add(e.checked_mul(e)?)?.checked_add(e)?;
            let mlp = e.checked_mul(i)?.checked_add(i)?.checked_add(i.checked_mul(e)?)?.checked_add(e)?;
            ln.checked_add(attn)?.checked_add(mlp)
        })();
        let params = per_layer
            .and_then(|pl| pl.checked_mul(l))
            .and_then(|x| x.checked_add(v.checked_mul(e)?))
            .and_then(|x| x.checked_add(p.checked_mul(e)?))
            .and_then(|x| x.checked_add(2 * e));
        match params {
            Some(n) if n <= MAX_PARAMS => {}
            Some(n) => {
                return bad(format!(
                    "the model would have {n} parameters ({:.1} GB of f32 weights); at most {MAX_PARAMS} are allowed",
                    n as f64 * 4.0 / 1e9
                ));
            }
            None => return bad("the model's parameter count overflows".into()),
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        for (name, p) in [("resid_pdrop", self.resid_pdrop), ("embd_pdrop", self.embd_pdrop), ("attn_pdrop", self.attn_pdrop)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} {p} must be in [0, 1)"));
            }
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return bad(format!("layer_norm_epsilon {} must be a finite positive number", self.layer_norm_epsilon));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return bad(format!("initializer_range {} must be a finite number >= 0", self.initializer_range));
        }
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx || self.reorder_and_upcast_attn {
            return bad("only scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false, \
                        reorder_and_upcast_attn=false are supported"
                .into());
        }
        if !self.tie_word_embeddings {
            return bad("tie_word_embeddings=false is not supported (GPT-2 ties lm_head to wte)".into());
        }
        self.gelu_kind().map(|_| ())
    }
}
