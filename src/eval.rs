//! `train eval`: loss and perplexity of a checkpoint on a block store or a text file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_store::BlockStore;
use lmtrain_trainer::{CausalCollator, check_store_fits, evaluate};

/// Flags of `train eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint or model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// A block store (`*.bin`), a `train prepare` directory (its validation.bin, else
    /// train.bin), or a text corpus file (tokenized with the checkpoint's tokenizer).
    #[arg(long, value_name = "STORE|TEXT")]
    data: PathBuf,
    /// Blocks per batch.
    #[arg(long, default_value_t = 8)]
    per_device_eval_batch_size: usize,
    /// Block size for a text file [default: the model's n_positions, at most 1024].
    #[arg(long)]
    block_size: Option<usize>,
}

/// The store to evaluate: `(store, temporary directory keeping a tokenized text alive)`.
fn open_eval_data(
    data: &Path,
    checkpoint: &Path,
    n_positions: usize,
    block_size: Option<usize>,
    eos_token: Option<String>,
) -> anyhow::Result<(BlockStore, Option<tempfile::TempDir>)> {
    if data.is_dir() {
        for name in ["validation.bin", "train.bin"] {
            let p = data.join(name);
            if p.is_file() {
                return Ok((BlockStore::open(&p)?, None));
            }
        }
        bail!("{} holds neither validation.bin nor train.bin", data.display());
    }
    if !data.is_file() {
        bail!("{}: no such file or directory", data.display());
    }
    if data.extension().is_some_and(|e| e == "bin") {
        return Ok((BlockStore::open(data)?, None));
    }
    // A text corpus: tokenize it with the checkpoint's tokenizer into a temporary store.
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let mut opts = lmtrain_text::PrepareOptions::new(vec![data.to_path_buf()], tmp.path().to_path_buf());
    opts.tokenizer = Some(checkpoint.join("tokenizer.json"));
    // Documents are joined with the model's end-of-text token, as in training.
    opts.eos_token = eos_token;
    opts.block_size = block_size.unwrap_or(n_positions.min(1024));
    lmtrain_text::prepare(&opts).with_context(|| format!("tokenizing {}", data.display()))?;
    Ok((BlockStore::open(&tmp.path().join("train.bin"))?, Some(tmp)))
}

/// Runs `train eval`.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.per_device_eval_batch_size == 0 {
        bail!("--per-device-eval-batch-size must be at least 1");
    }
    let mut model: Gpt2<Cpu> = lmtrain_hf::load_model(Cpu, &a.checkpoint).context("loading the checkpoint")?;
    let tok_path = a.checkpoint.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() { Some(lmtrain_hf::read_checked(&a.checkpoint, "tokenizer.json")?) } else { None };
    // The end-of-text token as text, for tokenizing a text file like the training data.
    let eos_token = match (&tokenizer, model.config().eos_token_id) {
        (Some(_), Some(id)) => lmtrain_text::tok::load_tokenizer(&tok_path).ok().and_then(|(t, _)| t.id_to_token(id)),
        _ => None,
    };
    if let Some(bs) = a.block_size
        && (bs == 0 || bs > model.config().n_positions)
    {
        bail!("--block-size {bs} is not allowed: 1 to the model's n_positions {}", model.config().n_positions);
    }
    let (store, _tmp) = open_eval_data(&a.data, &a.checkpoint, model.config().n_positions, a.block_size, eos_token)?;
    check_store_fits(&store, model.config(), tokenizer.as_deref())?;
    if tokenizer.is_none() {
        eprintln!("note: {} is missing; the data's tokenizer cannot be checked", tok_path.display());
    }
    let r = evaluate(&mut model, &store, a.per_device_eval_batch_size, &CausalCollator)?;
    if !r.loss.is_finite() {
        bail!(
            "the eval loss is {} on {}: the checkpoint's weights are not finite (or no block has a label); use another checkpoint",
            r.loss,
            a.data.display()
        );
    }
    println!("eval loss {:.4}, perplexity {:.2} ({} blocks of {} tokens)", r.loss, r.perplexity, r.blocks, store.block_size());
    Ok(())
}
