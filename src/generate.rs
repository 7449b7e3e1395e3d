//! `train generate`: continue a prompt with a trained checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_backend::Backend;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;

use crate::family::{ForBackend, Target};
use crate::sample::{Decoding, generate};

/// Flags of `train generate`. Decoding is greedy (as Hugging Face's default) unless
/// `--do-sample` or one of the sampling knobs is given.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint or model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Always take the most likely token (the default).
    #[arg(long, conflicts_with_all = ["do_sample", "temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Sample instead of greedy decoding (temperature 1, top-k 50, top-p 1 unless given).
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature (> 0); implies sampling.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the K most likely tokens (0 = all); implies sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens with probability >= P; implies sampling.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep generating past the end-of-text token (shown as a line break).
    #[arg(long)]
    ignore_eos: bool,
    /// The backend.
    #[command(flatten)]
    target: Target,
}

/// Loads a model directory and its tokenizer.
pub fn load_model_and_tokenizer<B: Backend>(backend: B, dir: &Path) -> anyhow::Result<(Gpt2<B>, tokenizers::Tokenizer)> {
    let model = lmtrain_hf::load_model(backend, dir)?;
    let tok_path = dir.join("tokenizer.json");
    if tok_path.is_file() {
        lmtrain_hf::read_checked(dir, "tokenizer.json")?; // a damaged file is named as such
    }
    let (tokenizer, _) = lmtrain_text::tok::load_tokenizer(&tok_path)?;
    Ok((model, tokenizer))
}

/// Generates text; returns the prompt and its continuation. With `stop_at_eos` generation ends at the
/// model's end-of-text token; without it, end-of-text tokens are shown as line breaks (the
/// corpus's document boundaries) and generation runs to `max_new_tokens`.
pub fn continue_text<B: Backend>(
    model: &mut Gpt2<B>,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    decoding: Decoding,
    stop_at_eos: bool,
) -> anyhow::Result<String> {
    let enc = tokenizer.encode(prompt, false).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let ids = enc.get_ids();
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let n_pos = model.config().n_positions;
    if ids.len() >= n_pos {
        bail!("the prompt has {} tokens; the model's context is {n_pos}", ids.len());
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} of the prompt is outside the model's vocabulary ({vocab}); is tokenizer.json the model's?");
    }
    let eos = model.config().eos_token_id;
    let new = generate(model, ids, max_new_tokens, decoding, eos.filter(|_| stop_at_eos))?;
    // Decode prompt and continuation together, so the tokenizer places the spaces between them.
    let all: Vec<u32> = ids.iter().chain(&new).copied().collect();
    let pieces: Result<Vec<String>, _> = all.split(|&t| Some(t) == eos).map(|seg| tokenizer.decode(seg, true)).collect();
    Ok(pieces.map_err(|e| anyhow::anyhow!("decoding: {e}"))?.join("\n"))
}

/// Runs `train generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let sample = a.do_sample || a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some();
    let decoding = if sample {
        let temperature = a.temperature.unwrap_or(1.0);
        let top_p = a.top_p.unwrap_or(1.0);
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("--temperature must be > 0 (use --greedy for deterministic decoding)");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        Decoding::Sample { temperature, top_k: a.top_k.unwrap_or(50), top_p, seed: a.seed }
    } else {
        Decoding::Greedy
    };
    let text = crate::family::on_target(a.target, Generate { a: &a, decoding })?;
    println!("{text}");
    Ok(())
}

/// The command on a backend.
struct Generate<'a> {
    a: &'a GenerateArgs,
    decoding: Decoding,
}

impl ForBackend for Generate<'_> {
    type Output = String;

    fn run<B: Backend>(self, backend: B) -> anyhow::Result<String> {
        let a = self.a;
        let (mut model, tokenizer) = load_model_and_tokenizer(backend, &a.checkpoint).context("loading the checkpoint")?;
        continue_text(&mut model, &tokenizer, &a.prompt, a.max_new_tokens, self.decoding, !a.ignore_eos)
    }
}
