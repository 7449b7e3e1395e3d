//! `train eval`: loss and perplexity of a checkpoint of any family on a block store or a text
//! file. A masked LM is evaluated on fixed masks drawn from `--seed`, the masks the training
//! run's evaluations used with the same seed, so the numbers compare across epochs and runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_backend::Backend;
use lmtrain_model::{ModelConfig, Objective};
use lmtrain_store::BlockStore;
use lmtrain_trainer::{CausalCollator, Collator, check_store_fits, evaluate};

use crate::family::{Family, ForFamily, Target};
use crate::run::{MaskingArgs, check_layout, masking_collator};

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
    /// Block size for a text file [default: the model's positions, at most 1024].
    #[arg(long)]
    block_size: Option<usize>,
    /// Masked LM: the seed of the fixed evaluation masks (the training run's `--seed` gives the
    /// masks its evaluations used).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Masked-LM masking.
    #[command(flatten)]
    masking: MaskingArgs,
    /// The backend.
    #[command(flatten)]
    target: Target,
}

/// The store to evaluate: `(store, temporary directory keeping a tokenized text alive)`.
fn open_eval_data(
    data: &Path,
    checkpoint: &Path,
    objective: Objective,
    block_size: usize,
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
    opts.model_type = match objective {
        Objective::CausalLm => lmtrain_text::ModelType::Causal,
        Objective::MaskedLm => lmtrain_text::ModelType::Masked,
    };
    // Documents are joined with the model's end-of-text token, as in training.
    opts.eos_token = eos_token;
    opts.block_size = block_size;
    lmtrain_text::prepare(&opts).with_context(|| format!("tokenizing {}", data.display()))?;
    Ok((BlockStore::open(&tmp.path().join("train.bin"))?, Some(tmp)))
}

/// The id in the config's `eos_token_id` as text, for tokenizing a text file as the training data
/// was (causal LM).
fn eos_token<C: ModelConfig>(config: &C, tok_path: &Path) -> Option<String> {
    let id = serde_json::to_value(config).ok()?.get("eos_token_id")?.as_u64()?;
    let (tok, _) = lmtrain_text::tok::load_tokenizer(tok_path).ok()?;
    tok.id_to_token(u32::try_from(id).ok()?)
}

/// Runs `train eval`.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.per_device_eval_batch_size == 0 {
        bail!("--per-device-eval-batch-size must be at least 1");
    }
    let family = lmtrain_hf::read_model_type(&a.checkpoint).context("loading the checkpoint")?;
    crate::family::dispatch(&family, a.target, a)
}

impl ForFamily for EvalArgs {
    type Output = ();

    fn run<B: Backend, M: Family<B>>(self, backend: B) -> anyhow::Result<()> {
        let a = self;
        let mut model: M = lmtrain_hf::load_model(backend, &a.checkpoint).context("loading the checkpoint")?;
        let tok_path = a.checkpoint.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() { Some(lmtrain_hf::read_checked(&a.checkpoint, "tokenizer.json")?) } else { None };
        let positions = model.config().max_positions();
        if let Some(bs) = a.block_size
            && (bs == 0 || bs > positions)
        {
            bail!("--block-size {bs} is not allowed: 1 to the model's {positions} positions");
        }
        let eos = match M::OBJECTIVE {
            Objective::CausalLm => eos_token(model.config(), &tok_path),
            Objective::MaskedLm => None,
        };
        let block_size = a.block_size.unwrap_or(positions.min(1024));
        let (store, _tmp) = open_eval_data(&a.data, &a.checkpoint, M::OBJECTIVE, block_size, eos)?;
        check_store_fits(&store, model.config(), tokenizer.as_deref())?;
        check_layout(&store, M::OBJECTIVE)?;
        if tokenizer.is_none() {
            eprintln!("note: {} is missing; the data's tokenizer cannot be checked", tok_path.display());
        }
        let collator: Box<dyn Collator> = match M::OBJECTIVE {
            Objective::CausalLm => Box::new(CausalCollator),
            Objective::MaskedLm => Box::new(masking_collator(&a.masking, &store, a.seed)?),
        };
        let r = evaluate(&mut model, &store, a.per_device_eval_batch_size, collator.as_ref())?;
        if !r.loss.is_finite() {
            bail!(
                "the eval loss is {} on {}: the checkpoint's weights are not finite (or no block has a label); use another checkpoint",
                r.loss,
                a.data.display()
            );
        }
        let masks = match M::OBJECTIVE {
            Objective::CausalLm => String::new(),
            Objective::MaskedLm => {
                format!(", fixed masks: {:.0}% of the tokens, seed {}", 100.0 * a.masking.mlm_probability, a.seed)
            }
        };
        println!("eval loss {:.4}, perplexity {:.2} ({} blocks of {} tokens{masks})", r.loss, r.perplexity, r.blocks, store.block_size());
        Ok(())
    }
}
