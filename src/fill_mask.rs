//! `train fill-mask`: the Hugging Face `fill-mask` pipeline for a masked-LM checkpoint. The
//! prompt holds the checkpoint's own mask token (`[MASK]`, `<mask>` for RoBERTa); for each mask
//! the top-k tokens are printed with their probability, the token and the whole sequence with
//! the mask filled in (the pipeline's `score`, `token`, `token_str` and `sequence`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_backend::Backend;
use lmtrain_model::{Input, LanguageModel, ModelConfig, Objective};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::family::{Family, ForFamily, Target};

/// Flags of `train fill-mask`.
#[derive(clap::Args)]
pub struct FillMaskArgs {
    /// Masked-LM checkpoint or model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// The text, with the checkpoint's mask token where a word is to be filled in (one or more).
    prompt: String,
    /// Completions shown per mask.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Print the pipeline's JSON (a list of completions; a list per mask when there are several).
    #[arg(long)]
    json: bool,
    /// The backend.
    #[command(flatten)]
    target: Target,
}

/// One completion of one mask, as the `fill-mask` pipeline reports it.
#[derive(Serialize, Debug, Clone)]
pub struct Completion {
    /// Probability of the token at the mask.
    pub score: f64,
    /// Its id.
    pub token: u32,
    /// Its text.
    pub token_str: String,
    /// The prompt with this token at the mask.
    pub sequence: String,
}

/// Runs `train fill-mask`.
pub fn run(a: FillMaskArgs) -> anyhow::Result<()> {
    if a.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let family = lmtrain_hf::read_model_type(&a.checkpoint).context("loading the checkpoint")?;
    let (masks, completions) =
        crate::family::dispatch(&family, a.target, FillMask { dir: &a.checkpoint, prompt: &a.prompt, top_k: a.top_k })?;
    if a.json {
        let text =
            if completions.len() == 1 { serde_json::to_string_pretty(&completions[0]) } else { serde_json::to_string_pretty(&completions) };
        println!("{}", text.context("writing JSON")?);
        return Ok(());
    }
    for (i, list) in completions.iter().enumerate() {
        if completions.len() > 1 {
            println!("{masks} {} of {}:", i + 1, completions.len());
        }
        let width = list.iter().map(|c| c.token_str.chars().count()).max().unwrap_or(0);
        for c in list {
            println!("  {:.4}  {:<width$}  {}", c.score, c.token_str, c.sequence);
        }
    }
    Ok(())
}

/// The command, generic over the family.
struct FillMask<'a> {
    dir: &'a Path,
    prompt: &'a str,
    top_k: usize,
}

impl ForFamily for FillMask<'_> {
    /// The mask token and one list of completions per mask.
    type Output = (String, Vec<Vec<Completion>>);

    fn run<B: Backend, M: Family<B>>(self, backend: B) -> anyhow::Result<Self::Output> {
        if M::OBJECTIVE != Objective::MaskedLm {
            bail!(
                "{} holds a {} model, which fills no masks; `train generate` continues a prompt with it",
                self.dir.display(),
                M::HF.architecture
            );
        }
        let mut model: M = lmtrain_hf::load_model(backend, self.dir).context("loading the checkpoint")?;
        if self.dir.join("tokenizer.json").is_file() {
            lmtrain_hf::read_checked(self.dir, "tokenizer.json")?; // a damaged file is named as such
        }
        let (tokenizer, _) = lmtrain_text::tok::load_tokenizer(&self.dir.join("tokenizer.json"))?;
        fill_mask(&mut model, &tokenizer, self.prompt, self.top_k)
    }
}

/// Fills every mask token of `prompt`; returns the mask token and the top-`k` completions of each
/// mask.
pub fn fill_mask<B: Backend, M: LanguageModel<B>>(
    model: &mut M,
    tokenizer: &Tokenizer,
    prompt: &str,
    k: usize,
) -> anyhow::Result<(String, Vec<Vec<Completion>>)> {
    let vocab = model.config().vocab_size();
    if tokenizer.get_vocab_size(true) > vocab {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {vocab}: they do not belong together; use the checkpoint's own tokenizer.json",
            tokenizer.get_vocab_size(true)
        );
    }
    let Some(mask_id) = lmtrain_text::tok::find_special_tokens(tokenizer).mask else {
        bail!("the tokenizer has no mask token ([MASK] or <mask>), so there is nothing to fill in");
    };
    let mask = tokenizer.id_to_token(mask_id).unwrap_or_default();
    let enc = tokenizer.encode(prompt, true).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let at: Vec<usize> = ids.iter().enumerate().filter(|(_, id)| **id == mask_id).map(|(i, _)| i).collect();
    if at.is_empty() {
        bail!("the prompt has no {mask}, this checkpoint's mask token; write {mask} where a word is to be filled in");
    }
    let positions = model.config().max_positions();
    if ids.len() > positions {
        bail!("the prompt is {} tokens long, more than the model's {positions} positions", ids.len());
    }
    let t = ids.len();
    let attention = vec![true; t];
    let input = Input { b: 1, t, input_ids: &ids, labels: None, attention_mask: Some(&attention), token_type_ids: None };
    let logits = model.logits(&input)?;
    let decode = |ids: &[u32], skip_special: bool| tokenizer.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("decoding: {e}"));
    let mut out = Vec::with_capacity(at.len());
    for &pos in &at {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        // softmax in f64, over the tokenizer's ids only (a padded vocabulary's extra rows are
        // no tokens)
        let row = &row[..tokenizer.get_vocab_size(true)];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        if !z.is_finite() || !max.is_finite() {
            bail!("the model's logits are not finite; the checkpoint's weights are damaged");
        }
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let mut list = Vec::with_capacity(k);
        for id in order {
            let mut filled = ids.clone();
            filled[pos] = id;
            // As the pipeline: special tokens are dropped from the sequence unless other masks
            // remain in it.
            list.push(Completion {
                score: ((row[id as usize] as f64 - max).exp()) / z,
                token: id,
                token_str: decode(&[id], false)?,
                sequence: decode(&filled, at.len() == 1)?,
            });
        }
        out.push(list);
    }
    Ok((mask, out))
}
