//! Training arguments with Hugging Face `TrainingArguments` names, defaults and checks.

use std::path::PathBuf;

use lmtrain_optim::SchedulerKind;
use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// The most optimizer steps a run may take (`--max-steps`, `--warmup-steps`, and epochs times
/// steps per epoch).
pub const MAX_STEPS: u64 = 1_000_000_000;

/// When to evaluate / save (`--eval-strategy`, `--save-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalStrategy {
    /// Never.
    No,
    /// Every `--eval-steps` / `--save-steps` optimizer steps.
    Steps,
    /// At the end of every epoch.
    Epoch,
}

impl std::str::FromStr for IntervalStrategy {
    type Err = TrainerError;
    fn from_str(s: &str) -> Result<Self, TrainerError> {
        match s {
            "no" => Ok(Self::No),
            "steps" => Ok(Self::Steps),
            "epoch" => Ok(Self::Epoch),
            _ => Err(TrainerError::Args(format!("unknown strategy `{s}` (expected steps, epoch or no)"))),
        }
    }
}

impl std::fmt::Display for IntervalStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::No => "no",
            Self::Steps => "steps",
            Self::Epoch => "epoch",
        })
    }
}

/// Everything the training loop needs to know, with HF semantics: the Hugging Face
/// `TrainingArguments` names (kebab-case on the command line: `--learning-rate`) and defaults.
/// The `train` command line parses these flags straight into this struct (and a `--config` file
/// into the same flags), so no second list of them exists. Build it with [`TrainingArgs::new`]
/// and check it with [`TrainingArgs::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Parser)]
pub struct TrainingArgs {
    /// Where checkpoints, the metrics log and the final model go.
    #[arg(skip)]
    pub output_dir: PathBuf,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// Decoupled weight decay of the decaying group (never biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f32,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f32,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f32,
    /// Warmup as a fraction of the total steps (used when --warmup-steps is 0).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Warmup in optimizer steps (wins over the ratio).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Learning-rate schedule: linear, cosine, constant or constant_with_warmup.
    #[arg(long = "lr-scheduler", visible_alias = "lr-scheduler-type", value_name = "KIND", default_value_t = SchedulerKind::Linear)]
    pub lr_scheduler: SchedulerKind,
    /// Epochs to train (fractional allowed) when --max-steps is not given.
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Blocks per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    /// Blocks per evaluation batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// When to evaluate: steps, epoch or no.
    #[arg(long, value_name = "STRATEGY", default_value_t = IntervalStrategy::No)]
    pub eval_strategy: IntervalStrategy,
    /// Evaluate every this many steps [default: --logging-steps, as HF].
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Log the training loss every this many steps.
    #[arg(long, default_value_t = 500)]
    pub logging_steps: u64,
    /// When to write checkpoint-STEP/: steps, epoch or no.
    #[arg(long, value_name = "STRATEGY", default_value_t = IntervalStrategy::Steps)]
    pub save_strategy: IntervalStrategy,
    /// Save every this many steps.
    #[arg(long, default_value_t = 500)]
    pub save_steps: u64,
    /// Keep at most this many checkpoints (the best one is never deleted).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Load the checkpoint with the lowest eval loss at the end.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub load_best_model_at_end: bool,
    /// Seed of the data order, dropout and masking.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl TrainingArgs {
    /// HF defaults with the given output directory.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        let mut a = <Self as clap::Parser>::parse_from(["lmtrain"]);
        a.output_dir = output_dir.into();
        a
    }

    /// Evaluation interval in steps for the `steps` strategy.
    pub fn eval_interval(&self) -> u64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// Rejects values and combinations HF would reject (or that would silently do nothing).
    ///
    /// Numeric bounds (each error says the allowed range): `--learning-rate` finite, at
    /// least 0; `--adam-epsilon` in (0, 1]; `--weight-decay` in [0, 1]; `--max-grad-norm`
    /// finite, at least 0 (0 = no clipping); `--num-train-epochs` in [0, 1e6];
    /// `--max-steps` and `--warmup-steps` at most 1e9; batch sizes and
    /// `--gradient-accumulation-steps` 1 to 65,536.
    pub fn validate(&self) -> Result<(), TrainerError> {
        const MAX_EPOCHS: f64 = 1e6;
        const MAX_BATCH: usize = 1 << 16;
        let bad = |m: &str| Err(TrainerError::Args(m.to_string()));
        let bad_s = |m: String| Err(TrainerError::Args(m));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad_s(format!("--learning-rate must be a finite number >= 0, got {:?}", self.learning_rate));
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0 && self.adam_epsilon <= 1.0) {
            return bad_s(format!("--adam-epsilon must be in (0, 1], got {:?}", self.adam_epsilon));
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return bad_s(format!("--weight-decay must be in [0, 1], got {:?}", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad_s(format!("--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got {:?}", self.max_grad_norm));
        }
        if !(0.0..=MAX_EPOCHS).contains(&self.num_train_epochs) {
            return bad_s(format!("--num-train-epochs must be in [0, 1000000], got {:?}", self.num_train_epochs));
        }
        if let Some(n) = self.max_steps
            && n > MAX_STEPS
        {
            return bad_s(format!("--max-steps must be at most {MAX_STEPS}, got {n}"));
        }
        if self.warmup_steps > MAX_STEPS {
            return bad_s(format!("--warmup-steps must be at most {MAX_STEPS}, got {}", self.warmup_steps));
        }
        for (name, v) in [
            ("--per-device-train-batch-size", self.per_device_train_batch_size),
            ("--per-device-eval-batch-size", self.per_device_eval_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
        ] {
            if v > MAX_BATCH {
                return bad_s(format!("{name} must be 1 to {MAX_BATCH}, got {v}"));
            }
        }
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad("batch sizes must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("--gradient-accumulation-steps must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("--warmup-ratio must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("--adam-beta1 and --adam-beta2 must be in [0, 1)");
        }
        let epochs_positive = self.num_train_epochs.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
        if self.max_steps == Some(0) || (self.max_steps.is_none() && !epochs_positive) {
            return bad("nothing to train: --max-steps must be > 0 or --num-train-epochs > 0");
        }
        if self.logging_steps == 0 || self.save_steps == 0 || self.eval_steps == Some(0) {
            return bad("--logging-steps, --save-steps and --eval-steps must be at least 1");
        }
        if self.save_total_limit == Some(0) {
            return bad("--save-total-limit must be at least 1 (leave it out to keep every checkpoint)");
        }
        if self.load_best_model_at_end {
            if self.eval_strategy == IntervalStrategy::No {
                return bad("--load-best-model-at-end needs evaluation: set --eval-strategy steps or epoch");
            }
            if self.eval_strategy != self.save_strategy {
                return bad("--load-best-model-at-end needs --save-strategy equal to --eval-strategy");
            }
            if self.save_strategy == IntervalStrategy::Steps && !self.save_steps.is_multiple_of(self.eval_interval()) {
                return bad("--load-best-model-at-end needs --save-steps to be a multiple of --eval-steps");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_defaults_validate() {
        let a = TrainingArgs::new("out");
        assert_eq!(a.learning_rate, 5e-5);
        assert_eq!((a.adam_epsilon, a.num_train_epochs, a.per_device_train_batch_size, a.logging_steps), (1e-8, 3.0, 8, 500));
        assert_eq!(
            (a.eval_strategy, a.save_strategy, a.lr_scheduler),
            (IntervalStrategy::No, IntervalStrategy::Steps, SchedulerKind::Linear)
        );
        assert_eq!(a.max_grad_norm, 1.0);
        assert_eq!(a.eval_interval(), a.logging_steps);
        a.validate().unwrap();
    }

    #[test]
    fn contradictions_are_rejected() {
        let mut a = TrainingArgs::new("out");
        a.load_best_model_at_end = true;
        assert!(a.validate().unwrap_err().to_string().contains("needs evaluation"));
        a.eval_strategy = IntervalStrategy::Steps;
        a.eval_steps = Some(300);
        assert!(a.validate().unwrap_err().to_string().contains("multiple of --eval-steps"));
        a.save_steps = 600;
        a.validate().unwrap();
        a.save_strategy = IntervalStrategy::Epoch;
        assert!(a.validate().is_err());
        let mut b = TrainingArgs::new("out");
        b.max_steps = Some(0);
        assert!(b.validate().is_err());
        b.max_steps = None;
        b.gradient_accumulation_steps = 0;
        assert!(b.validate().is_err());
    }

    #[test]
    fn numeric_flags_outside_their_range_are_rejected_with_the_range() {
        type Set = fn(&mut TrainingArgs);
        let cases: [(&str, Set); 16] = [
            ("--adam-epsilon must be in (0, 1], got -1.0", |a| a.adam_epsilon = -1.0),
            ("--adam-epsilon must be in (0, 1], got inf", |a| a.adam_epsilon = f32::INFINITY),
            ("--adam-epsilon must be in (0, 1], got 0.0", |a| a.adam_epsilon = 0.0),
            ("--weight-decay must be in [0, 1], got -1.0", |a| a.weight_decay = -1.0),
            ("--weight-decay must be in [0, 1], got NaN", |a| a.weight_decay = f32::NAN),
            ("--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got NaN", |a| a.max_grad_norm = f32::NAN),
            ("--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got -1.0", |a| a.max_grad_norm = -1.0),
            ("--num-train-epochs must be in [0, 1000000], got inf", |a| a.num_train_epochs = f64::INFINITY),
            ("--num-train-epochs must be in [0, 1000000], got 1e308", |a| a.num_train_epochs = 1e308),
            ("--num-train-epochs must be in [0, 1000000], got NaN", |a| a.num_train_epochs = f64::NAN),
            ("--max-steps must be at most 1000000000, got 4294967296", |a| a.max_steps = Some(1 << 32)),
            ("--learning-rate must be a finite number >= 0, got NaN", |a| a.learning_rate = f64::NAN),
            ("--learning-rate must be a finite number >= 0, got -0.001", |a| a.learning_rate = -1e-3),
            ("--warmup-steps must be at most 1000000000, got 18446744073709551615", |a| a.warmup_steps = u64::MAX),
            ("--per-device-train-batch-size must be 1 to 65536, got 4294967296", |a| a.per_device_train_batch_size = 1 << 32),
            ("--gradient-accumulation-steps must be 1 to 65536, got 65537", |a| a.gradient_accumulation_steps = 65537),
        ];
        for (want, set) in cases {
            let mut a = TrainingArgs::new("out");
            set(&mut a);
            let got = a.validate().expect_err(want).to_string();
            assert!(got.contains(want), "{got}");
        }
        // The edges themselves are accepted.
        let mut a = TrainingArgs::new("out");
        a.adam_epsilon = 1.0;
        a.weight_decay = 1.0;
        a.max_grad_norm = 0.0;
        a.max_steps = Some(1_000_000_000);
        a.num_train_epochs = 1e6;
        a.validate().unwrap();
    }
}
