//! `train` (no subcommand): train a GPT-2 causal LM on a `train prepare` output directory.
//!
//! Flags carry the Hugging Face `TrainingArguments` names in kebab-case with the same
//! defaults; `--config FILE` (TOML or JSON, same keys, `_` or `-`) supplies values that
//! flags override.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_store::BlockStore;
use lmtrain_trainer::checkpoint::{TOKENIZER_FILE, list_checkpoints};
use lmtrain_trainer::{IntervalStrategy, Trainer, TrainingArgs};
use serde::Deserialize;

/// Flags of `train`. Every value is optional so a config file can supply it; the defaults
/// shown are Hugging Face's.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML or JSON file with any of these options (keys as the flags, without `--`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A `train prepare` output directory (train.bin, validation.bin, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Allow writing into an output directory that already holds checkpoints.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub overwrite_output_dir: Option<bool>,
    /// Peak learning rate [default: 5e-5].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay, not applied to biases and LayerNorm weights [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f32>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f32>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    pub adam_epsilon: Option<f32>,
    /// Warmup as a fraction of the total steps [default: 0].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warmup in optimizer steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// linear, cosine, constant or constant_with_warmup [default: linear].
    #[arg(long, value_name = "KIND")]
    pub lr_scheduler: Option<String>,
    /// Epochs to train [default: 3].
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Total optimizer steps, instead of --num-train-epochs (wins over a config file's epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Blocks per micro-batch [default: 8].
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Blocks per evaluation batch [default: 8].
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Clip the global gradient norm (0 = off) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// steps, epoch or no [default: no].
    #[arg(long, value_name = "STRATEGY")]
    pub eval_strategy: Option<String>,
    /// Evaluate every N steps [default: --logging-steps].
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Log the training loss every N steps [default: 500].
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// steps, epoch or no [default: steps].
    #[arg(long, value_name = "STRATEGY")]
    pub save_strategy: Option<String>,
    /// Save a checkpoint every N steps [default: 500].
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep at most N checkpoints (the best is always kept).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// At the end, load the checkpoint with the lowest eval loss.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub load_best_model_at_end: Option<bool>,
    /// Seed of the data order, dropout and initialization [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from a checkpoint directory (the latest in --output-dir when no DIR is given).
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    #[serde(skip)]
    pub resume_from_checkpoint: Option<Option<PathBuf>>,
    /// Start from a Hugging Face GPT-2 directory (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// config.json of the model to train from scratch (HF GPT2Config fields).
    #[arg(long, value_name = "FILE")]
    pub model_config: Option<PathBuf>,
    /// From scratch: transformer layers [default: 12].
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// From scratch: attention heads [default: 12].
    #[arg(long)]
    pub n_head: Option<usize>,
    /// From scratch: model width [default: 768].
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// From scratch: context length [default: the store's block size].
    #[arg(long)]
    pub n_positions: Option<usize>,
    /// cpu or cuda [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Hide the progress bar.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_progress: Option<bool>,
}

impl TrainArgs {
    /// Values of `self` (the flags) win over those of `file`.
    fn or(self, file: TrainArgs) -> TrainArgs {
        macro_rules! pick {
            ($($f:ident),* $(,)?) => { TrainArgs { $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            config, data, output_dir, overwrite_output_dir, learning_rate, weight_decay, adam_beta1,
            adam_beta2, adam_epsilon, warmup_ratio, warmup_steps, lr_scheduler, num_train_epochs,
            max_steps, per_device_train_batch_size, per_device_eval_batch_size,
            gradient_accumulation_steps, max_grad_norm, eval_strategy, eval_steps, logging_steps,
            save_strategy, save_steps, save_total_limit, load_best_model_at_end, seed,
            resume_from_checkpoint, init_from, model_config, n_layer, n_head, n_embd, n_positions,
            device, no_progress,
        )
    }
}

/// Reads a TOML or JSON config file. Keys may use `-` or `_` (HF JSON files use `_`).
fn read_config_file(path: &Path) -> anyhow::Result<TrainArgs> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?
    };
    let serde_json::Value::Object(map) = value else {
        bail!("{}: expected a table of options", path.display());
    };
    let map: serde_json::Map<String, serde_json::Value> =
        map.into_iter().map(|(k, v)| (k.replace('_', "-"), v)).collect();
    serde_json::from_value(serde_json::Value::Object(map)).with_context(|| format!("in {}", path.display()))
}

/// The `TrainingArgs` of the merged options, with HF defaults for what is missing.
fn training_args(a: &TrainArgs, output_dir: PathBuf) -> anyhow::Result<TrainingArgs> {
    let mut t = TrainingArgs::new(output_dir);
    macro_rules! set {
        ($($f:ident),* $(,)?) => { $(if let Some(v) = a.$f.clone() { t.$f = v; })* };
    }
    set!(
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon, warmup_ratio, warmup_steps,
        num_train_epochs, per_device_train_batch_size, per_device_eval_batch_size,
        gradient_accumulation_steps, max_grad_norm, logging_steps, save_steps, load_best_model_at_end, seed,
    );
    t.max_steps = a.max_steps;
    t.eval_steps = a.eval_steps;
    t.save_total_limit = a.save_total_limit;
    if let Some(s) = &a.lr_scheduler {
        t.lr_scheduler = s.parse()?;
    }
    if let Some(s) = &a.eval_strategy {
        t.eval_strategy = s.parse()?;
    }
    if let Some(s) = &a.save_strategy {
        t.save_strategy = s.parse()?;
    }
    // HF: setting --eval-steps alone implies the `steps` strategy is wanted; say so instead of
    // silently never evaluating.
    if a.eval_steps.is_some() && t.eval_strategy == IntervalStrategy::No {
        bail!("--eval-steps is set but --eval-strategy is `no`; add --eval-strategy steps");
    }
    Ok(t)
}

/// Rejects flag combinations that contradict each other.
fn check_contradictions(flags: &TrainArgs, a: &TrainArgs) -> anyhow::Result<()> {
    if flags.max_steps.is_some() && flags.num_train_epochs.is_some() {
        bail!("give either --max-steps or --num-train-epochs, not both");
    }
    if a.warmup_steps.is_some_and(|s| s > 0) && a.warmup_ratio.is_some_and(|r| r > 0.0) {
        bail!("give either --warmup-steps or --warmup-ratio, not both");
    }
    let scratch_flags = a.model_config.is_some()
        || a.n_layer.is_some()
        || a.n_head.is_some()
        || a.n_embd.is_some()
        || a.n_positions.is_some();
    if a.init_from.is_some() && scratch_flags {
        bail!("--init-from takes the model shape from its config.json; drop --model-config / --n-layer / --n-head / --n-embd / --n-positions");
    }
    if a.resume_from_checkpoint.is_some() && a.init_from.is_some() {
        bail!("give either --resume-from-checkpoint (continue a run) or --init-from (start a new run from a model), not both");
    }
    if a.model_config.is_some() && (a.n_layer.is_some() || a.n_head.is_some() || a.n_embd.is_some()) {
        bail!("give either --model-config or --n-layer / --n-head / --n-embd, not both");
    }
    Ok(())
}

/// Checks `--device`. The CUDA training backend is a later issue: `cuda` opens the device
/// (lmtrain-cuda) to report what is there, then says so.
pub fn check_device(device: Option<&str>) -> anyhow::Result<()> {
    match device.unwrap_or("cpu") {
        "cpu" => Ok(()),
        "cuda" => {
            // Open the device so the user learns what is (not) there, then say what is missing.
            match lmtrain_cuda::CudaDevice::open(0) {
                Ok(dev) => bail!(
                    "--device cuda: found {}, but the CUDA training backend is not implemented yet (a later issue); use --device cpu",
                    dev.name()
                ),
                Err(e) => bail!("--device cuda: {e}; use --device cpu"),
            }
        }
        other => bail!("unknown --device `{other}` (expected cpu or cuda)"),
    }
}

/// The model to train from scratch: `--model-config`, else the size flags on top of HF's
/// GPT2Config defaults, with the vocabulary and special tokens of the store.
fn scratch_model(a: &TrainArgs, store: &BlockStore, seed: u64) -> anyhow::Result<Gpt2> {
    let h = store.header();
    let cfg = match &a.model_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<Gpt2Config>(&text).with_context(|| format!("{} is not a GPT-2 config.json", path.display()))?
        }
        None => {
            let mut c = Gpt2Config {
                vocab_size: h.vocab_size as usize,
                n_positions: a.n_positions.unwrap_or(h.block_size as usize),
                ..Gpt2Config::default()
            };
            if let Some(v) = a.n_layer {
                c.n_layer = v;
            }
            if let Some(v) = a.n_head {
                c.n_head = v;
            }
            if let Some(v) = a.n_embd {
                c.n_embd = v;
            }
            if let Some(eos) = h.eos {
                c.bos_token_id = Some(eos);
                c.eos_token_id = Some(eos);
            }
            c
        }
    };
    if a.model_config.is_none() && cfg.n_embd % cfg.n_head != 0 {
        bail!("--n-embd {} is not divisible by --n-head {}", cfg.n_embd, cfg.n_head);
    }
    cfg.validate().context("invalid model configuration")?;
    Ok(Gpt2::new(cfg, seed))
}

/// Finds the checkpoint to resume: the given one, or the newest in the output directory.
fn resolve_resume(arg: &Option<PathBuf>, output_dir: &Path) -> anyhow::Result<PathBuf> {
    match arg {
        Some(dir) => Ok(dir.clone()),
        None => match list_checkpoints(output_dir)?.pop() {
            Some((_, dir)) => Ok(dir),
            None => bail!("--resume-from-checkpoint: no checkpoint-* directory in {}", output_dir.display()),
        },
    }
}

/// Opens `DIR/train.bin` (required) and `DIR/validation.bin` (when present).
pub fn open_data(dir: &Path) -> anyhow::Result<(BlockStore, Option<BlockStore>, Vec<u8>)> {
    let train_path = dir.join("train.bin");
    if !train_path.is_file() {
        bail!("{} has no train.bin; create it with `train prepare ... --output-dir {}`", dir.display(), dir.display());
    }
    let train = BlockStore::open(&train_path)?;
    let val_path = dir.join("validation.bin");
    let eval = if val_path.is_file() { Some(BlockStore::open(&val_path)?) } else { None };
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
    Ok((train, eval, tokenizer))
}

/// Runs `train` with flags (and maybe a config file).
pub fn run(flags: TrainArgs) -> anyhow::Result<()> {
    let file = match &flags.config {
        Some(path) => read_config_file(path)?,
        None => TrainArgs::default(),
    };
    let a = flags.clone().or(file);
    check_contradictions(&flags, &a)?;
    check_device(a.device.as_deref())?;
    let data = a.data.clone().context("--data DIR is required (a `train prepare` output directory)")?;
    let output_dir = a.output_dir.clone().context("--output-dir DIR is required")?;
    let args = training_args(&a, output_dir.clone())?;
    args.validate()?;

    let resume = match &a.resume_from_checkpoint {
        Some(arg) => Some(resolve_resume(arg, &output_dir)?),
        None => None,
    };
    if resume.is_none() && !a.overwrite_output_dir.unwrap_or(false) && !list_checkpoints(&output_dir)?.is_empty() {
        bail!(
            "{} already holds checkpoints; pass --resume-from-checkpoint to continue, --overwrite-output-dir to start over there, or another --output-dir",
            output_dir.display()
        );
    }

    let (train, eval, data_tokenizer) = open_data(&data)?;
    let (model, tokenizer) = if let Some(dir) = &resume {
        // The model comes from the checkpoint (the same command line with
        // --resume-from-checkpoint added resumes; its model-shape flags are not used).
        // The checkpoint's tokenizer must be the data's; Trainer::new checks the fingerprint.
        let tok = std::fs::read(dir.join(TOKENIZER_FILE)).with_context(|| format!("reading {}/tokenizer.json", dir.display()))?;
        (lmtrain_hf::load_gpt2(dir)?, tok)
    } else if let Some(dir) = &a.init_from {
        let model = lmtrain_hf::load_gpt2(dir)?;
        // An HF directory may carry its tokenizer; if it does, the data must match it.
        let tok = std::fs::read(dir.join(TOKENIZER_FILE)).unwrap_or_else(|_| data_tokenizer.clone());
        (model, tok)
    } else {
        (scratch_model(&a, &train, args.seed)?, data_tokenizer)
    };

    let mut trainer = Trainer::new(args, model, train, eval, tokenizer)?;
    trainer.set_progress(!a.no_progress.unwrap_or(false));
    if let Some(dir) = &resume {
        trainer.resume_from(dir)?;
        eprintln!("resuming from {} at step {}", dir.display(), trainer.state().global_step);
    }
    let n_params = trainer.model().params().len();
    eprintln!(
        "training GPT-2 ({} layers, width {}, {:.2}M parameters) for {} steps",
        trainer.model().config().n_layer,
        trainer.model().config().n_embd,
        n_params as f64 / 1e6,
        trainer.max_steps()
    );
    let outcome = trainer.train()?;
    println!(
        "done: {} steps, last loss {:.4}, {:.0} tokens/s{}",
        outcome.global_step,
        outcome.last_loss,
        outcome.tokens as f64 / outcome.seconds.max(1e-9),
        match outcome.last_eval {
            Some(e) => format!(", eval loss {:.4}, perplexity {:.2}", e.loss, e.perplexity),
            None => String::new(),
        }
    );
    println!("model saved in {}", output_dir.display());
    Ok(())
}
