//! `train` (no subcommand): train a model on a `train prepare` output directory.
//!
//! The training flags are [`TrainingArgs`] itself (Hugging Face `TrainingArguments` names in
//! kebab-case, HF defaults), flattened into [`TrainArgs`] beside the data, model and device
//! flags. `--config FILE` (TOML or JSON, the same keys with `-` or `_`) is turned into the same
//! flags, placed before the command line's, so the command line wins and there is one list of
//! options.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lmtrain_backend::Backend;
use lmtrain_model::bert::{BertConfig, RobertaConfig};
use lmtrain_model::deberta::DebertaV2Config;
use lmtrain_model::distilbert::DistilBertConfig;
use lmtrain_model::gpt2::Gpt2Config;
use lmtrain_model::{Footprint, LanguageModel, ModelConfig, Objective};
use lmtrain_store::{BlockStore, Layout};

use crate::family::{Family, ForFamily, Target};
use lmtrain_trainer::checkpoint::{TOKENIZER_FILE, list_checkpoints};
use lmtrain_trainer::masking::{MaskVocab, MaskingConfig};
use lmtrain_trainer::{CausalCollator, Collator, IntervalStrategy, MaskingCollator, Trainer, TrainingArgs};

use crate::signals::StopSignals;

/// A run that SIGINT or SIGTERM stopped, after it printed where to resume from; the process
/// exits with this status (128 + the signal).
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by a signal (exit status {})", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Flags of `train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML or JSON file with any of these options (keys as the flags, without `--`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A `train prepare` output directory (train.bin, validation.bin, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Allow writing into an output directory that already holds checkpoints.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub overwrite_output_dir: bool,
    /// The training arguments.
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Continue from a checkpoint directory (the latest in --output-dir when no DIR is given).
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume_from_checkpoint: Option<Option<PathBuf>>,
    /// Start from a Hugging Face directory (config.json + model.safetensors) of any supported
    /// family; a base-model checkpoint's missing head is initialised fresh.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// The family to train from scratch: gpt2 (causal LM), bert, distilbert, roberta or
    /// deberta-v2 (masked LM; DeBERTa-v3's shape) [default: gpt2, bert with --objective mlm, or
    /// the model_type of --model-config].
    #[arg(long, value_name = "TYPE")]
    pub model_type: Option<String>,
    /// causal or mlm: checked against the family (which decides it). Without --data, `train
    /// --objective mlm` runs the masked-LM demonstration on the embedded corpus.
    #[arg(long, value_name = "OBJECTIVE", value_parser = ["causal", "mlm"])]
    pub objective: Option<String>,
    /// config.json of the model to train from scratch (the family's HF config fields).
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
    /// Masked-LM masking.
    #[command(flatten)]
    pub masking: MaskingArgs,
    /// The backend.
    #[command(flatten)]
    pub target: Target,
    /// Recompute each MLP's GELU output in the backward instead of keeping one per layer
    /// (less activation memory, one more GELU per layer, the same results).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub recompute: bool,
    /// Print the device memory one training step needs (parameters, gradients, optimizer
    /// state, activations, workspace) and whether it fits, then stop.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub dry_run: bool,
    /// The device memory to plan for, e.g. 80GB or 80GiB (GB = 10^9 bytes, GiB = 2^30)
    /// [default: the CPU's available memory, or the CUDA device's free memory].
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<crate::memory::Bytes>,
    /// Lower --per-device-train-batch-size until a step fits the device memory, raising
    /// --gradient-accumulation-steps to keep the effective batch (and the eval batch until it fits).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub auto_find_batch_size: bool,
    /// Hide the progress bar.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub no_progress: bool,
}

/// How a masked LM's batches are masked (training, and the fixed masks of evaluation).
#[derive(clap::Args, Debug, Clone)]
pub struct MaskingArgs {
    /// Masked LM: probability that a token is chosen.
    #[arg(long, default_value_t = 0.15)]
    pub mlm_probability: f64,
    /// Masked LM: fraction of the chosen tokens replaced by the mask token.
    #[arg(long, default_value_t = 0.8)]
    pub mask_replace_prob: f64,
    /// Masked LM: fraction of the chosen tokens replaced by a random token.
    #[arg(long, default_value_t = 0.1)]
    pub random_replace_prob: f64,
    /// Masked LM: choose whole words (every sub-token of a chosen word), from the store's
    /// word-start flags.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub whole_word_masking: bool,
}

impl Default for MaskingArgs {
    /// `DataCollatorForLanguageModeling`'s defaults (15%; 80% mask, 10% random, 10% kept).
    fn default() -> Self {
        MaskingArgs { mlm_probability: 0.15, mask_replace_prob: 0.8, random_replace_prob: 0.1, whole_word_masking: false }
    }
}

/// A config file as `--key=value` flags (keys may use `-` or `_`; HF JSON files use `_`).
pub fn config_file_flags(path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?
    };
    let serde_json::Value::Object(map) = value else {
        bail!("{}: expected a table of options", path.display());
    };
    let mut flags = Vec::with_capacity(map.len());
    for (key, v) in map {
        let key = key.replace('_', "-");
        if key == "config" || key == "resume-from-checkpoint" {
            bail!("{}: `{key}` can only be given on the command line", path.display());
        }
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => bail!("{}: `{key}` must be a string, number or boolean, not {other}", path.display()),
        };
        flags.push(format!("--{key}={v}").into());
    }
    Ok(flags)
}

/// Rejects flag combinations that contradict each other; `given` says whether a flag was set
/// (on the command line or in the config file).
fn check_contradictions(a: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<()> {
    if given("max_steps") && given("num_train_epochs") {
        bail!("give either --max-steps or --num-train-epochs, not both");
    }
    if a.training.warmup_steps > 0 && a.training.warmup_ratio > 0.0 {
        bail!("give either --warmup-steps or --warmup-ratio, not both");
    }
    let scratch_flags =
        a.model_config.is_some() || a.n_layer.is_some() || a.n_head.is_some() || a.n_embd.is_some() || a.n_positions.is_some();
    if a.init_from.is_some() && a.model_type.is_some() {
        bail!("--init-from takes the model type from its config.json; drop --model-type");
    }
    if a.init_from.is_some() && scratch_flags {
        bail!(
            "--init-from takes the model shape from its config.json; drop --model-config / --n-layer / --n-head / --n-embd / --n-positions"
        );
    }
    if a.resume_from_checkpoint.is_some() && a.init_from.is_some() {
        bail!("give either --resume-from-checkpoint (continue a run) or --init-from (start a new run from a model), not both");
    }
    if a.model_config.is_some() && (a.n_layer.is_some() || a.n_head.is_some() || a.n_embd.is_some()) {
        bail!("give either --model-config or --n-layer / --n-head / --n-embd, not both");
    }
    // HF: setting --eval-steps alone implies the `steps` strategy is wanted; say so instead of
    // silently never evaluating.
    if a.training.eval_steps.is_some() && a.training.eval_strategy == lmtrain_trainer::IntervalStrategy::No {
        bail!("--eval-steps is set but --eval-strategy is `no`; add --eval-strategy steps");
    }
    Ok(())
}

/// A family's config for training from scratch: `--model-config`, else the size flags on top of
/// Hugging Face's defaults, with the store's vocabulary and special tokens.
pub trait ScratchConfig: ModelConfig + Default {
    /// Applies `--n-layer/--n-head/--n-embd/--n-positions` and the store's facts.
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self;
}

impl ScratchConfig for Gpt2Config {
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self {
        let h = store.header();
        let mut c = Gpt2Config {
            vocab_size: h.vocab_size as usize,
            n_positions: a.n_positions.unwrap_or(h.block_size as usize),
            ..Gpt2Config::default()
        };
        c.n_layer = a.n_layer.unwrap_or(c.n_layer);
        c.n_head = a.n_head.unwrap_or(c.n_head);
        c.n_embd = a.n_embd.unwrap_or(c.n_embd);
        if let Some(eos) = h.eos {
            c.bos_token_id = Some(eos);
            c.eos_token_id = Some(eos);
        }
        c
    }
}

/// BERT sizes from the flags (`intermediate_size` 4x the width, as bert-base).
fn bert_sizes(c: &mut BertConfig, a: &TrainArgs, store: &BlockStore, positions: usize) {
    let h = store.header();
    c.vocab_size = h.vocab_size as usize;
    c.max_position_embeddings = a.n_positions.unwrap_or(positions);
    c.num_hidden_layers = a.n_layer.unwrap_or(c.num_hidden_layers);
    c.num_attention_heads = a.n_head.unwrap_or(c.num_attention_heads);
    c.hidden_size = a.n_embd.unwrap_or(c.hidden_size);
    c.intermediate_size = 4 * c.hidden_size;
    c.pad_token_id = h.pad.or(c.pad_token_id);
}

impl ScratchConfig for BertConfig {
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self {
        let mut c = BertConfig::default();
        bert_sizes(&mut c, a, store, store.block_size());
        c
    }
}

impl ScratchConfig for RobertaConfig {
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self {
        let mut c = RobertaConfig::default();
        let pad = store.header().pad.unwrap_or(1) as usize;
        // RoBERTa's positions start after the padding index
        bert_sizes(&mut c.0, a, store, store.block_size() + pad + 1);
        c
    }
}

impl ScratchConfig for DistilBertConfig {
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self {
        let h = store.header();
        let mut c = DistilBertConfig { vocab_size: h.vocab_size as usize, ..DistilBertConfig::default() };
        c.max_position_embeddings = a.n_positions.unwrap_or(store.block_size());
        c.n_layers = a.n_layer.unwrap_or(c.n_layers);
        c.n_heads = a.n_head.unwrap_or(c.n_heads);
        c.dim = a.n_embd.unwrap_or(c.dim);
        c.hidden_dim = 4 * c.dim;
        c.pad_token_id = h.pad.or(c.pad_token_id);
        c
    }
}

impl ScratchConfig for DebertaV2Config {
    /// DeBERTa-v3's shape (relative attention, c2p + p2c, log buckets, shared keys) with the
    /// flags' sizes; the buckets are 256 as v3, fewer for a shorter context.
    fn from_flags(a: &TrainArgs, store: &BlockStore) -> Self {
        let h = store.header();
        let mut c = DebertaV2Config { vocab_size: h.vocab_size as usize, ..DebertaV2Config::v3() };
        c.max_position_embeddings = a.n_positions.unwrap_or(store.block_size());
        let buckets = (c.max_position_embeddings / 2).min(256);
        c.position_buckets = if buckets >= 2 { buckets as i64 } else { -1 };
        c.num_hidden_layers = a.n_layer.unwrap_or(c.num_hidden_layers);
        c.num_attention_heads = a.n_head.unwrap_or(c.num_attention_heads);
        c.hidden_size = a.n_embd.unwrap_or(c.hidden_size);
        c.intermediate_size = 4 * c.hidden_size;
        c.pad_token_id = h.pad.or(c.pad_token_id);
        c
    }
}

fn scratch_config<C: ScratchConfig>(a: &TrainArgs, store: &BlockStore) -> anyhow::Result<C> {
    let cfg = match &a.model_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<C>(&text).with_context(|| format!("{} is not a config.json of this model type", path.display()))?
        }
        None => C::from_flags(a, store),
    };
    cfg.validate().context("invalid model configuration")?;
    Ok(cfg)
}

/// The model family of the run: the checkpoint's or `--init-from`'s `model_type`, else
/// `--model-type`, else `--model-config`'s, else GPT-2.
fn family(a: &TrainArgs, resume: Option<&Path>) -> anyhow::Result<String> {
    if let Some(dir) = resume.or(a.init_from.as_deref()) {
        let found = lmtrain_hf::read_model_type(dir)?;
        if let Some(t) = a.model_type.as_ref().filter(|t| **t != found) {
            bail!("--model-type {t} differs from {}'s model_type {found:?}", dir.display());
        }
        return Ok(found);
    }
    if let Some(t) = &a.model_type {
        return Ok(t.clone());
    }
    if a.objective.as_deref() == Some("mlm") && a.model_config.is_none() {
        return Ok("bert".into());
    }
    if let Some(path) = &a.model_config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        return Ok(v.get("model_type").and_then(|t| t.as_str()).unwrap_or("gpt2").to_string());
    }
    Ok("gpt2".into())
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

/// Opens `DIR/train.bin` (required) and `DIR/validation.bin` (when present), and reads
/// `DIR/tokenizer.json`.
pub fn open_data(dir: &Path) -> anyhow::Result<(BlockStore, Option<BlockStore>, Vec<u8>)> {
    let train_path = dir.join("train.bin");
    if !train_path.is_file() {
        bail!("{} has no train.bin; create it with `train prepare ... --output-dir {}`", dir.display(), dir.display());
    }
    let train = BlockStore::open(&train_path)?;
    let val_path = dir.join("validation.bin");
    let eval = if val_path.is_file() { Some(BlockStore::open(&val_path)?) } else { None };
    let tok_path = dir.join(TOKENIZER_FILE);
    // the stores' vocabulary and fingerprint must be the tokenizer's
    for store in std::iter::once(&train).chain(&eval) {
        lmtrain_text::check_store_tokenizer(store, &tok_path)?;
    }
    let tokenizer = std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
    Ok((train, eval, tokenizer))
}

/// Runs `train` with its flags (a config file's already merged in); `given` says which flags
/// were set.
pub fn run(a: TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<()> {
    check_contradictions(&a, given)?;
    let target = a.target;
    target.check()?;
    if a.dry_run {
        return dry_run(&a);
    }
    let data = a.data.clone().context("--data DIR is required (a `train prepare` output directory)")?;
    let output_dir = a.output_dir.clone().context("--output-dir DIR is required")?;
    let mut args = a.training.clone();
    args.output_dir = output_dir.clone();
    args.validate()?;

    let (restored, removed) = lmtrain_trainer::checkpoint::recover_replaced(&output_dir)?;
    for dir in restored {
        eprintln!("note: restored {} (a crash interrupted its re-save)", dir.display());
    }
    for dir in removed {
        eprintln!("note: removed {} (left by a crash after its replacement was complete)", dir.display());
    }
    let resume = match &a.resume_from_checkpoint {
        Some(arg) => Some(resolve_resume(arg, &output_dir)?),
        None => None,
    };
    if resume.is_none() && !a.overwrite_output_dir && !list_checkpoints(&output_dir)?.is_empty() {
        bail!(
            "{} already holds checkpoints; pass --resume-from-checkpoint to continue, --overwrite-output-dir to start over there, or another --output-dir",
            output_dir.display()
        );
    }

    let (train, eval, data_tokenizer) = open_data(&data)?;
    let family = family(&a, resume.as_deref())?;
    let run = Run { a: &a, args, train, eval, data_tokenizer, resume: resume.as_deref() };
    crate::family::dispatch(&family, target, run)
}

/// `--dry-run`: the data's block size and the model's config, then the memory report; nothing
/// is built or written.
fn dry_run(a: &TrainArgs) -> anyhow::Result<()> {
    let data = a.data.clone().context("--data DIR is required (a `train prepare` output directory)")?;
    let resume = match (&a.resume_from_checkpoint, &a.output_dir) {
        (Some(arg), Some(out)) => Some(resolve_resume(arg, out)?),
        (Some(Some(dir)), None) => Some(dir.clone()),
        (Some(None), None) => bail!("--resume-from-checkpoint without a DIR needs --output-dir"),
        (None, _) => None,
    };
    let mut args = a.training.clone();
    args.validate()?;
    args.output_dir = a.output_dir.clone().unwrap_or_default();
    let (train, eval, _) = open_data(&data)?;
    let family = family(a, resume.as_deref())?;
    crate::family::check_runs_on(&family, a.target)?;
    // the family's types on the CPU backend: the dry run measures on a meter and opens no device
    crate::family::dispatch(&family, Target::default(), DryRun { a, args, train, eval, resume: resume.as_deref() })
}

struct DryRun<'a> {
    a: &'a TrainArgs,
    args: TrainingArgs,
    train: BlockStore,
    eval: Option<BlockStore>,
    resume: Option<&'a Path>,
}

impl ForFamily for DryRun<'_> {
    type Output = ();

    fn run<B: Backend, M: Family<B>>(self, _cpu: B) -> anyhow::Result<()> {
        // the config only: the dry run itself says whether the run fits
        let config = match self.resume.or(self.a.init_from.as_deref()) {
            Some(dir) => lmtrain_hf::load_config::<M::Config>(dir)?,
            None => scratch_config::<M::Config>(self.a, &self.train)?,
        };
        crate::memory::dry_run::<B, M>(self.a, &self.args, &config, &self.train, self.eval.as_ref())
    }
}

/// The config of the model a run trains: the checkpoint's or `--init-from`'s (refused when its
/// f32 state cannot fit this machine), else built from the flags.
fn training_config<B: Backend, M: Family<B>>(a: &TrainArgs, train: &BlockStore, resume: Option<&Path>) -> anyhow::Result<M::Config> {
    match resume.or(a.init_from.as_deref()) {
        Some(dir) => fits_training::<B, M>(dir),
        None => {
            let config = scratch_config::<M::Config>(a, train)?;
            M::check_memory(&config, Footprint::Training)?;
            Ok(config)
        }
    }
}

/// Everything a run needs before the family is known.
struct Run<'a> {
    a: &'a TrainArgs,
    args: TrainingArgs,
    train: BlockStore,
    eval: Option<BlockStore>,
    data_tokenizer: Vec<u8>,
    resume: Option<&'a Path>,
}

impl ForFamily for Run<'_> {
    type Output = ();

    /// Builds the model of family `M` (from the checkpoint, `--init-from` or scratch) and its
    /// collator, then trains.
    fn run<B: Backend, M: Family<B>>(self, backend: B) -> anyhow::Result<()> {
        let Run { a, args, train, eval, data_tokenizer, resume } = self;
        if let Some(o) = &a.objective {
            let wanted = if o == "mlm" { Objective::MaskedLm } else { Objective::CausalLm };
            if wanted != M::OBJECTIVE {
                bail!(
                    "--objective {o} does not fit {}, a {} model; drop --objective or pick another --model-type",
                    M::HF.architecture,
                    objective_name(M::OBJECTIVE)
                );
            }
        }
        for store in std::iter::once(&train).chain(&eval) {
            check_layout(store, M::OBJECTIVE)?;
        }
        // the data's fitness for the objective first: a store without a mask token fails before
        // any model is built
        let collator: Box<dyn Collator> = match M::OBJECTIVE {
            Objective::CausalLm => Box::new(CausalCollator),
            Objective::MaskedLm => Box::new(masking_collator(&a.masking, &train, args.seed)?),
        };
        // Before anything is allocated: the model, its gradients and AdamW's moments must fit
        // the machine, and a training step the device.
        let config = training_config::<B, M>(a, &train, resume)?;
        let args = crate::memory::fit::<B, M>(a, args, &config, &train, eval.as_ref())?;
        let (mut model, tokenizer): (M, Vec<u8>) = if let Some(dir) = resume {
            // The model comes from the checkpoint (the same command line with
            // --resume-from-checkpoint added resumes; its model-shape flags are not used).
            // The checkpoint's tokenizer must be the data's; Trainer::new checks the fingerprint.
            let tok = lmtrain_hf::read_checked(dir, TOKENIZER_FILE)?;
            (lmtrain_hf::load_model(backend, dir)?, tok)
        } else if let Some(dir) = &a.init_from {
            let model = init_from(backend, dir, args.seed)?;
            // An HF directory may carry its tokenizer; if it does, the data must match it.
            let tok = match dir.join(TOKENIZER_FILE).is_file() {
                true => lmtrain_hf::read_checked(dir, TOKENIZER_FILE)?,
                false => data_tokenizer.clone(),
            };
            (model, tok)
        } else {
            (M::new(backend, config, args.seed)?, data_tokenizer)
        };
        model.set_recompute(a.recompute);
        train_model(args, model, collator, train, eval, tokenizer, resume, !a.no_progress)
    }
}

/// `causal LM` or `masked LM`, for messages.
pub fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::CausalLm => "causal LM",
        Objective::MaskedLm => "masked LM",
    }
}

/// Refuses a store prepared for the other objective: a causal store has no `[CLS] ... [SEP]`
/// around its documents, a masked one no end-of-text between them. (Stores written before the
/// layout was recorded are taken as they are.)
pub fn check_layout(store: &BlockStore, objective: Objective) -> anyhow::Result<()> {
    let (found, flag) = match (store.header().layout, objective) {
        (Layout::Causal, Objective::MaskedLm) => ("causal", "masked"),
        (Layout::Masked, Objective::CausalLm) => ("masked", "causal"),
        _ => return Ok(()),
    };
    bail!(
        "{} was prepared for {found} LM, but this model is a {}; re-run `train prepare --model-type {flag}` for it",
        store.path().display(),
        objective_name(objective)
    )
}

/// The config.json of a model directory, refused when it describes a model too large to train
/// here.
fn fits_training<B: Backend, M: LanguageModel<B>>(dir: &Path) -> anyhow::Result<M::Config> {
    let config = lmtrain_hf::load_config::<M::Config>(dir)?;
    M::check_memory(&config, Footprint::Training)
        .map_err(|source| lmtrain_hf::HfError::Model { path: dir.join(lmtrain_hf::CONFIG_FILE), source })?;
    Ok(config)
}

/// The masking collator of a masked-LM run: the flags' setting, the store's special and mask
/// tokens.
pub fn masking_collator(a: &MaskingArgs, store: &BlockStore, seed: u64) -> anyhow::Result<MaskingCollator> {
    let h = store.header();
    let sp = h.special_tokens();
    let Some(mask) = sp.mask else {
        bail!(
            "{}: the tokenizer has no mask token ([MASK] or <mask>), which masked-LM training needs; prepare the data with `train prepare --model-type masked` or a tokenizer that has one",
            store.path().display()
        );
    };
    if a.whole_word_masking && !h.has_word_starts {
        bail!("--whole-word-masking needs the store's word-start flags, and {} has none; re-run `train prepare`", store.path().display());
    }
    let config = MaskingConfig {
        mlm_probability: a.mlm_probability,
        mask_replace_prob: a.mask_replace_prob,
        random_replace_prob: a.random_replace_prob,
        whole_word: a.whole_word_masking,
    };
    let (config, warning) = config.hf_effective();
    if let Some(w) = warning {
        eprintln!("note: {w}");
    }
    let special: Vec<u32> = [sp.eos, sp.bos, sp.pad, sp.unk, sp.cls, sp.sep].into_iter().flatten().collect();
    let vocab = MaskVocab::new(&special, mask, h.vocab_size)?;
    Ok(MaskingCollator::new(config, vocab, seed)?)
}

/// `--init-from DIR`: a Hugging Face model directory, its head initialised fresh when the
/// checkpoint has none; tensors the model does not use are listed, one line each.
fn init_from<B: Backend, M: LanguageModel<B>>(backend: B, dir: &Path, seed: u64) -> anyhow::Result<M> {
    let loaded = lmtrain_hf::load_params::<B, M>(dir, lmtrain_hf::LoadMode::Adapt { seed })?;
    for name in &loaded.unused {
        eprintln!("note: {}: tensor {name} is not used by this model", dir.display());
    }
    for name in &loaded.initialised {
        eprintln!("note: {}: tensor {name} is not in the checkpoint and was initialised fresh", dir.display());
    }
    Ok(M::from_params(backend, loaded.config, loaded.params)?)
}

/// Trains `model` (any family) and reports.
#[allow(clippy::too_many_arguments)]
fn train_model<B: Backend, M: LanguageModel<B>>(
    args: TrainingArgs,
    model: M,
    collator: Box<dyn Collator>,
    train: BlockStore,
    eval: Option<BlockStore>,
    tokenizer: Vec<u8>,
    resume: Option<&Path>,
    progress: bool,
) -> anyhow::Result<()> {
    let output_dir = args.output_dir.clone();
    let saving = args.save_strategy != IntervalStrategy::No;
    let mut trainer = Trainer::new(args, model, collator, train, eval, tokenizer)?;
    trainer.set_progress(progress);
    if let Some(dir) = resume {
        trainer.resume_from(dir)?;
        eprintln!("resuming from {} at step {}", dir.display(), trainer.state().global_step);
    }
    eprintln!(
        "training {} ({:.2}M parameters) for {} steps",
        M::HF.architecture,
        trainer.model().num_params() as f64 / 1e6,
        trainer.max_steps()
    );
    let signals = StopSignals::install()?;
    trainer.set_stop_flag(signals.flag());
    let outcome = trainer.train()?;
    if outcome.stopped {
        let (name, status) = signals.received().unwrap_or(("a signal", 1));
        eprintln!("stopped by {name} after step {} of {}", outcome.global_step, trainer.max_steps());
        match outcome.last_checkpoint.as_deref().filter(|_| saving) {
            Some(dir) => {
                eprintln!("checkpoint written to {}", dir.display());
                let argv = std::env::args_os().map(|a| a.to_string_lossy().into_owned());
                eprintln!("resume with: {}", resume_command(argv, dir));
            }
            None => eprintln!("nothing was saved (--save-strategy no), so this run cannot be resumed"),
        }
        return Err(Interrupted(status).into());
    }
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

/// The command line `argv` with `--resume-from-checkpoint DIR` in place of any it had, quoted
/// for a POSIX shell.
fn resume_command(argv: impl IntoIterator<Item = String>, checkpoint: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut args = argv.into_iter().peekable();
    out.extend(args.next());
    while let Some(arg) = args.next() {
        if arg == "--resume-from-checkpoint" {
            // its optional value: the next argument unless that is a flag
            args.next_if(|v| !v.starts_with('-'));
        } else if !arg.starts_with("--resume-from-checkpoint=") {
            out.push(arg);
        }
    }
    out.push("--resume-from-checkpoint".into());
    out.push(checkpoint.to_string_lossy().into_owned());
    out.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

/// `arg` as one POSIX shell word.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain { arg.to_string() } else { format!("'{}'", arg.replace('\'', "'\\''")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(argv: &[&str]) -> String {
        resume_command(argv.iter().map(|a| a.to_string()), Path::new("out/checkpoint-7"))
    }

    #[test]
    fn the_resume_command_replaces_an_earlier_resume_flag_and_quotes_for_the_shell() {
        assert_eq!(
            resume(&["train", "--data", "d", "--max-steps", "9"]),
            "train --data d --max-steps 9 --resume-from-checkpoint out/checkpoint-7"
        );
        assert_eq!(
            resume(&["train", "--resume-from-checkpoint", "out/checkpoint-3", "--seed", "1"]),
            "train --seed 1 --resume-from-checkpoint out/checkpoint-7"
        );
        assert_eq!(
            resume(&["train", "--resume-from-checkpoint", "--seed", "1"]),
            "train --seed 1 --resume-from-checkpoint out/checkpoint-7"
        );
        assert_eq!(
            resume(&["train", "--resume-from-checkpoint=x", "--data", "d"]),
            "train --data d --resume-from-checkpoint out/checkpoint-7"
        );
        assert_eq!(
            resume(&["./train", "--data", "my data", "--output-dir", "it's"]),
            "./train --data 'my data' --output-dir 'it'\\''s' --resume-from-checkpoint out/checkpoint-7"
        );
        assert_eq!(shell_quote(""), "''");
    }
}
