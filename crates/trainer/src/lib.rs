//! lmtrain-trainer: the training loop with Hugging Face `Trainer` semantics.
//!
//! Batches come from a memory-mapped [`lmtrain_store::BlockStore`] in a seeded per-epoch order;
//! micro-batches accumulate gradients inside the model; [`lmtrain_optim::AdamW`] clips and
//! updates; evaluation reports loss and perplexity; checkpoints (`checkpoint-STEP/`) hold the
//! Hugging Face model files plus everything needed to resume the run bit for bit; metrics go to
//! `metrics.jsonl`; a progress bar shows step, loss, tokens/s and ETA.

pub mod args;
pub mod checkpoint;
pub mod data;
pub mod generate;
pub mod masking;
pub mod metrics;
pub mod plot;

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmtrain_backend::{Backend, mix64};
use lmtrain_cpu::Cpu;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_optim::{AdamW, AdamWConfig, Schedule, decay_segments};
use lmtrain_store::{BlockStore, EpochOrder};
use serde_json::json;

pub use args::{IntervalStrategy, TrainingArgs};
pub use checkpoint::TrainerState;
use data::Batch;
use metrics::MetricsLog;

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Invalid or contradictory arguments.
    #[error("{0}")]
    Args(String),
    /// The data does not fit the model (block size, vocabulary, tokenizer).
    #[error("{0}")]
    Mismatch(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint or log file is malformed.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Hugging Face model files could not be read or written.
    #[error(transparent)]
    Hf(#[from] lmtrain_hf::HfError),
    /// Optimizer state does not fit.
    #[error(transparent)]
    Optim(#[from] lmtrain_optim::OptimError),
    /// The loss or gradient norm became NaN or infinite.
    #[error(
        "{what} is {value} at step {step} (learning rate {lr:.3e}); training stopped and nothing was saved after it; {}; try a lower --learning-rate (or --max-grad-norm / more --warmup-steps)",
        match last_checkpoint { Some(p) => format!("the last good checkpoint is {}", p.display()), None => "no checkpoint had been written yet".to_string() }
    )]
    NonFinite {
        /// "loss" or "gradient norm".
        what: &'static str,
        /// The offending value.
        value: f32,
        /// Optimizer step (1-based) that produced it.
        step: u64,
        /// Learning rate of that step.
        lr: f64,
        /// The newest checkpoint on disk.
        last_checkpoint: Option<PathBuf>,
    },
}

impl TrainerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainerError::Io { path: path.to_path_buf(), source }
    }
}

/// Result of an evaluation pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Blocks evaluated.
    pub blocks: usize,
}

/// Checks that a block store can feed `model`: block size within `n_positions`, token ids
/// within the vocabulary and, when the tokenizer is known, the same tokenizer.
pub fn check_store_fits(store: &BlockStore, model: &Gpt2, tokenizer_json: Option<&[u8]>) -> Result<(), TrainerError> {
    let h = store.header();
    let cfg = model.config();
    let name = store.path().display();
    if h.block_size as usize > cfg.n_positions {
        return Err(TrainerError::Mismatch(format!(
            "{name}: block size {} exceeds the model's n_positions {}; re-run `train prepare` with --block-size {} or less",
            h.block_size, cfg.n_positions, cfg.n_positions
        )));
    }
    if h.vocab_size as usize > cfg.vocab_size {
        return Err(TrainerError::Mismatch(format!(
            "{name}: the store's vocabulary ({} tokens) is larger than the model's vocab_size {}",
            h.vocab_size, cfg.vocab_size
        )));
    }
    if let Some(tok) = tokenizer_json {
        let fp = lmtrain_text::tokenizer_fingerprint(tok);
        if fp != h.tokenizer_fingerprint {
            return Err(TrainerError::Mismatch(format!(
                "{name} was tokenized with a different tokenizer than the model's tokenizer.json (fingerprint {:016x} vs {fp:016x}); re-run `train prepare` with the model's tokenizer",
                h.tokenizer_fingerprint
            )));
        }
    }
    if store.is_empty() {
        return Err(TrainerError::Mismatch(format!("{name} holds no blocks")));
    }
    Ok(())
}

/// Mean loss and perplexity of `model` over every block of `store` (eval mode: no dropout),
/// batches of `batch` blocks, each batch weighted by its size as HF's evaluation loop does.
pub fn evaluate(model: &mut Gpt2, store: &BlockStore, batch: usize) -> EvalResult {
    let n = store.len();
    let mut sum = 0.0f64;
    let mut b = Batch::default();
    for lo in (0..n).step_by(batch) {
        let hi = (lo + batch).min(n);
        b.fill(store, lo..hi);
        sum += model.forward_loss(&b.input_ids, &b.labels, b.b, b.t) as f64 * b.b as f64;
    }
    let loss = sum / n.max(1) as f64;
    EvalResult { loss, perplexity: loss.exp(), blocks: n }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps taken in total.
    pub global_step: u64,
    /// Mean training loss of the last step.
    pub last_loss: f64,
    /// Training tokens consumed by this invocation.
    pub tokens: u64,
    /// Seconds spent training (forward, backward, optimizer) by this invocation; evaluation
    /// and checkpoint writing are not counted.
    pub seconds: f64,
    /// Last evaluation of this invocation.
    pub last_eval: Option<EvalResult>,
    /// Newest checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Best checkpoint (lowest eval loss), if tracked.
    pub best_checkpoint: Option<PathBuf>,
}

/// The training loop over one model and one training store.
pub struct Trainer {
    args: TrainingArgs,
    model: Gpt2,
    optimizer: AdamW<Cpu>,
    schedule: Schedule,
    train: BlockStore,
    eval: Option<BlockStore>,
    tokenizer_json: Vec<u8>,
    state: TrainerState,
    steps_per_epoch: u64,
    show_progress: bool,
}

impl Trainer {
    /// Sets up a run: checks arguments and data, derives the step counts and the schedule.
    pub fn new(
        args: TrainingArgs,
        model: Gpt2,
        train: BlockStore,
        eval: Option<BlockStore>,
        tokenizer_json: Vec<u8>,
    ) -> Result<Self, TrainerError> {
        args.validate()?;
        check_store_fits(&train, &model, Some(&tokenizer_json))?;
        if let Some(e) = &eval {
            check_store_fits(e, &model, Some(&tokenizer_json))?;
        } else if args.eval_strategy != IntervalStrategy::No {
            return Err(TrainerError::Args(
                "--eval-strategy needs a validation set, and the data has no validation.bin (use --eval-strategy no, or `train prepare` with a validation split)".into(),
            ));
        }
        let micro_per_epoch = train.len().div_ceil(args.per_device_train_batch_size) as u64;
        let steps_per_epoch = micro_per_epoch.div_ceil(args.gradient_accumulation_steps as u64);
        let max_steps = args.max_steps.unwrap_or_else(|| (args.num_train_epochs * steps_per_epoch as f64).ceil() as u64);
        let schedule = Schedule {
            base_lr: args.learning_rate,
            kind: args.lr_scheduler,
            warmup_steps: lmtrain_optim::warmup_steps(max_steps, args.warmup_steps, args.warmup_ratio),
            total_steps: max_steps,
        };
        let segments = decay_segments(
            model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)),
            args.weight_decay,
        );
        let optimizer = AdamW::new(
            model.backend(),
            AdamWConfig {
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
            model.params().len(),
            segments,
        );
        let state = TrainerState {
            global_step: 0,
            epoch: 0,
            step_in_epoch: 0,
            max_steps,
            tokens_seen: 0,
            seed: args.seed,
            best_metric: None,
            best_model_checkpoint: None,
            args: args.clone(),
        };
        Ok(Self {
            args,
            model,
            optimizer,
            schedule,
            train,
            eval,
            tokenizer_json,
            state,
            steps_per_epoch,
            show_progress: true,
        })
    }

    /// Turns the progress bar off (tests, scripted use). It is also hidden when stderr is not
    /// a terminal.
    pub fn set_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    /// The model being trained.
    pub fn model(&self) -> &Gpt2 {
        &self.model
    }

    /// Mutable access to the model (e.g. for evaluation before training).
    pub fn model_mut(&mut self) -> &mut Gpt2 {
        &mut self.model
    }

    /// The loop state.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// Total optimizer steps of the run.
    pub fn max_steps(&self) -> u64 {
        self.state.max_steps
    }

    /// Continues from a checkpoint directory written by this trainer: weights, AdamW moments
    /// and the loop position. The run's step count must be the same as the checkpoint's (the
    /// learning-rate schedule depends on it).
    pub fn resume_from(&mut self, dir: &Path) -> Result<(), TrainerError> {
        let restored = checkpoint::load_state(dir)?;
        let model = lmtrain_hf::load_gpt2(dir)?;
        if model.params().len() != self.model.params().len() {
            return Err(TrainerError::Mismatch(format!(
                "{}: checkpoint model has {} parameters, this run's model {}",
                dir.display(),
                model.params().len(),
                self.model.params().len()
            )));
        }
        let st = &restored.state;
        if st.max_steps != self.state.max_steps {
            return Err(TrainerError::Args(format!(
                "{} belongs to a run of {} steps, these arguments give {}; resume with the original --max-steps / --num-train-epochs",
                dir.display(),
                st.max_steps,
                self.state.max_steps
            )));
        }
        if st.seed != self.args.seed
            || st.args.per_device_train_batch_size != self.args.per_device_train_batch_size
            || st.args.gradient_accumulation_steps != self.args.gradient_accumulation_steps
        {
            return Err(TrainerError::Args(format!(
                "{} was written with a different --seed, --per-device-train-batch-size or --gradient-accumulation-steps; resume with the original values",
                dir.display()
            )));
        }
        self.optimizer.restore(model.backend(), restored.exp_avg, restored.exp_avg_sq, st.global_step as u32)?;
        self.model = model;
        let mut state = restored.state;
        state.args = self.args.clone();
        self.state = state;
        Ok(())
    }

    /// Evaluates on the validation store, if there is one.
    pub fn evaluate(&mut self) -> Option<EvalResult> {
        let store = self.eval.as_ref()?;
        Some(evaluate(&mut self.model, store, self.args.per_device_eval_batch_size))
    }

    fn epoch_float(&self) -> f64 {
        self.state.epoch as f64 + self.state.step_in_epoch as f64 / self.steps_per_epoch as f64
    }

    /// Runs the loop from the current state to the last step, then saves the final model
    /// (config.json, model.safetensors, tokenizer.json) into the output directory.
    pub fn train(&mut self) -> Result<TrainOutcome, TrainerError> {
        let out_dir = self.args.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| TrainerError::io(&out_dir, e))?;
        let mut log = MetricsLog::open(&out_dir, self.state.global_step)?;
        let bar = self.progress_bar();

        let n = self.train.len();
        let batch = self.args.per_device_train_batch_size;
        let accum = self.args.gradient_accumulation_steps;
        let micro_per_epoch = n.div_ceil(batch);
        let mut order = EpochOrder::new(n, self.state.seed, self.state.epoch);
        let mut order_epoch = self.state.epoch;
        let mut b = Batch::default();
        let mut outcome = TrainOutcome {
            global_step: self.state.global_step,
            last_loss: f64::NAN,
            tokens: 0,
            seconds: 0.0,
            last_eval: None,
            last_checkpoint: checkpoint::list_checkpoints(&out_dir)?.pop().map(|c| c.1),
            best_checkpoint: self.state.best_model_checkpoint.clone(),
        };
        let start = Instant::now();
        let mut side_time = std::time::Duration::ZERO; // evaluation + checkpoints
        let (mut window_loss, mut window_steps, mut window_tokens) = (0.0f64, 0u64, 0u64);
        let (mut window_start, mut window_side) = (Instant::now(), std::time::Duration::ZERO);

        while self.state.global_step < self.state.max_steps {
            if order_epoch != self.state.epoch {
                order = EpochOrder::new(n, self.state.seed, self.state.epoch);
                order_epoch = self.state.epoch;
            }
            let step = self.state.global_step; // steps already taken
            let lr = self.schedule.lr(step);
            let first = self.state.step_in_epoch as usize * accum;
            let last = (first + accum).min(micro_per_epoch);
            self.model.zero_grad();
            let mut loss_sum = 0.0f64;
            let mut step_tokens = 0u64;
            for mi in first..last {
                let lo = mi * batch;
                let hi = (lo + batch).min(n);
                b.fill_ordered(&self.train, &order, lo, hi);
                // Dropout masks: a pure function of (seed, step, micro-batch), so a resumed run
                // draws exactly the masks the uninterrupted run would have.
                let dropout_seed = mix64(self.state.seed ^ mix64(step.wrapping_mul(1 << 20) + mi as u64));
                let loss = self.model.forward_backward(&b.input_ids, &b.labels, b.b, b.t, Some(dropout_seed));
                if !loss.is_finite() {
                    bar.finish_and_clear();
                    return Err(TrainerError::NonFinite {
                        what: "loss",
                        value: loss,
                        step: step + 1,
                        lr,
                        last_checkpoint: outcome.last_checkpoint,
                    });
                }
                loss_sum += loss as f64;
                step_tokens += b.tokens() as u64;
            }
            let n_micro = last - first;
            let report = {
                let (backend, params, grads) = self.model.backend_and_bufs_mut();
                self.optimizer.step(
                    backend,
                    Cpu::view_mut(params),
                    Cpu::view(grads),
                    lr as f32,
                    self.args.max_grad_norm,
                    n_micro,
                )
            };
            if !report.grad_norm.is_finite() {
                bar.finish_and_clear();
                return Err(TrainerError::NonFinite {
                    what: "gradient norm",
                    value: report.grad_norm,
                    step: step + 1,
                    lr,
                    last_checkpoint: outcome.last_checkpoint,
                });
            }
            let step_loss = loss_sum / n_micro as f64;
            self.state.global_step += 1;
            self.state.step_in_epoch += 1;
            self.state.tokens_seen += step_tokens;
            outcome.tokens += step_tokens;
            outcome.last_loss = step_loss;
            let end_of_epoch = self.state.step_in_epoch == self.steps_per_epoch;
            let epoch_f = self.epoch_float();
            if end_of_epoch {
                self.state.epoch += 1;
                self.state.step_in_epoch = 0;
            }
            let gs = self.state.global_step;
            let is_last = gs == self.state.max_steps;
            window_loss += step_loss;
            window_steps += 1;
            window_tokens += step_tokens;

            let elapsed = window_start.elapsed().saturating_sub(window_side).as_secs_f64().max(1e-9);
            let tok_s = window_tokens as f64 / elapsed;
            bar.set_position(gs);
            bar.set_message(format!("loss {step_loss:.4} | {} tok/s", human(tok_s)));

            if gs.is_multiple_of(self.args.logging_steps) || is_last {
                log.write(&json!({
                    "step": gs, "epoch": epoch_f, "loss": window_loss / window_steps as f64,
                    "learning_rate": lr, "grad_norm": report.grad_norm, "tokens_per_s": tok_s,
                }))?;
                (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
                (window_start, window_side) = (Instant::now(), std::time::Duration::ZERO);
            }

            let eval_now = match self.args.eval_strategy {
                IntervalStrategy::No => false,
                IntervalStrategy::Steps => gs.is_multiple_of(self.args.eval_interval()),
                IntervalStrategy::Epoch => end_of_epoch,
            };
            let mut eval_result = None;
            let side_start = Instant::now();
            if eval_now && let Some(r) = self.evaluate() {
                log.write(&json!({"step": gs, "epoch": epoch_f, "eval_loss": r.loss, "perplexity": r.perplexity}))?;
                bar.suspend(|| eprintln!("step {gs}: eval loss {:.4}, perplexity {:.2}", r.loss, r.perplexity));
                eval_result = Some(r);
                outcome.last_eval = Some(r);
            }

            let save_now = match self.args.save_strategy {
                IntervalStrategy::No => false,
                IntervalStrategy::Steps => gs.is_multiple_of(self.args.save_steps) || is_last,
                IntervalStrategy::Epoch => end_of_epoch || is_last,
            };
            if save_now {
                let path = out_dir.join(checkpoint::checkpoint_name(gs));
                if let Some(r) = eval_result
                    && self.state.best_metric.is_none_or(|best| r.loss < best)
                {
                    self.state.best_metric = Some(r.loss);
                    self.state.best_model_checkpoint = Some(path.clone());
                }
                let saved = checkpoint::save(
                    &out_dir,
                    &self.model,
                    &self.optimizer.exp_avg(self.model.backend()),
                    &self.optimizer.exp_avg_sq(self.model.backend()),
                    &self.tokenizer_json,
                    &self.state,
                )?;
                if let Some(limit) = self.args.save_total_limit {
                    checkpoint::rotate(&out_dir, limit, self.state.best_model_checkpoint.as_deref())?;
                }
                outcome.last_checkpoint = Some(saved);
            }
            // Evaluation and checkpoint time stay out of tokens/s.
            side_time += side_start.elapsed();
            window_side += side_start.elapsed();
        }
        bar.finish_and_clear();
        outcome.seconds = (start.elapsed() - side_time).as_secs_f64();
        outcome.global_step = self.state.global_step;

        if self.args.load_best_model_at_end
            && let Some(name) = self.state.best_model_checkpoint.as_deref().and_then(Path::file_name)
        {
            // By name inside this run's output directory: the recorded path may be relative to
            // the working directory of an earlier, resumed invocation.
            let best = out_dir.join(name);
            self.model = lmtrain_hf::load_gpt2(&best)?;
            eprintln!("loaded the best model (eval loss {:.4}) from {}", self.state.best_metric.unwrap_or(f64::NAN), best.display());
        }
        outcome.best_checkpoint = self.state.best_model_checkpoint.clone();
        self.save_final_model()?;
        Ok(outcome)
    }

    /// Writes config.json, model.safetensors and tokenizer.json into the output directory
    /// (what HF `trainer.save_model()` leaves there).
    fn save_final_model(&self) -> Result<(), TrainerError> {
        let dir = &self.args.output_dir;
        lmtrain_hf::save_gpt2(&self.model, dir)?;
        let tok = dir.join(checkpoint::TOKENIZER_FILE);
        let tmp = dir.join(format!(".{}.tmp", checkpoint::TOKENIZER_FILE));
        std::fs::write(&tmp, &self.tokenizer_json).map_err(|e| TrainerError::io(&tmp, e))?;
        std::fs::rename(&tmp, &tok).map_err(|e| TrainerError::io(&tok, e))?;
        Ok(())
    }

    fn progress_bar(&self) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(
            Some(self.state.max_steps),
            if self.show_progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
        );
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} | {msg} | {elapsed_precise} < ETA {eta_precise}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(self.state.global_step);
        bar.reset_eta();
        bar
    }
}

/// 12345.6 -> "12.3k".
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
