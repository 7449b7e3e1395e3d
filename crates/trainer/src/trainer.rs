//! [`Trainer`]: the loop over optimizer steps, in small parts that read top to bottom.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmtrain_backend::{Backend, StepStats, mix_seed};
use lmtrain_model::{LanguageModel, ModelError};
use lmtrain_optim::{AdamW, AdamWConfig, Schedule, StepReport, decay_segments};
use lmtrain_store::{BlockStore, EpochOrder};
use serde_json::json;

use crate::args::MAX_STEPS;
use crate::checkpoint::{self, TrainerState};
use crate::collate::{Batch, BatchKey, Collator};
use crate::metrics::MetricsLog;
use crate::{EvalResult, IntervalStrategy, TrainerError, TrainingArgs, check_store_fits, evaluate};

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
    /// The stop flag ended the run before its last step (see [`Trainer::set_stop_flag`]): the
    /// final model was not saved; `last_checkpoint` is where to resume, when saving is on.
    pub stopped: bool,
}

/// One optimizer step's result, read from the backend once.
struct Step {
    loss: f64,
    report: StepReport,
    tokens: u64,
    end_of_epoch: bool,
    epoch: f64,
}

/// The logging window: losses and throughput since the last log line.
struct Window {
    loss: f64,
    steps: u64,
    tokens: u64,
    start: Instant,
    side: Duration,
}

impl Window {
    fn new() -> Self {
        Window { loss: 0.0, steps: 0, tokens: 0, start: Instant::now(), side: Duration::ZERO }
    }
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().saturating_sub(self.side).as_secs_f64().max(1e-9)
    }
}

/// The training loop over one model on one backend and one training store.
pub struct Trainer<B: Backend, M: LanguageModel<B>> {
    args: TrainingArgs,
    model: M,
    optimizer: AdamW<B>,
    schedule: Schedule,
    collator: Box<dyn Collator>,
    train: BlockStore,
    eval: Option<BlockStore>,
    tokenizer_json: Vec<u8>,
    state: TrainerState,
    steps_per_epoch: u64,
    show_progress: bool,
    stop: Option<Arc<AtomicBool>>,
}

impl<B: Backend, M: LanguageModel<B>> Trainer<B, M> {
    /// Sets up a run: checks arguments and data, derives the step counts and the schedule.
    pub fn new(
        args: TrainingArgs,
        mut model: M,
        collator: Box<dyn Collator>,
        train: BlockStore,
        eval: Option<BlockStore>,
        tokenizer_json: Vec<u8>,
    ) -> Result<Self, TrainerError> {
        args.validate()?;
        check_store_fits(&train, model.config(), Some(&tokenizer_json))?;
        if let Some(e) = &eval {
            check_store_fits(e, model.config(), Some(&tokenizer_json))?;
        } else if args.eval_strategy != IntervalStrategy::No {
            return Err(TrainerError::Args(
                "--eval-strategy needs a validation set, and the data has no validation.bin (use --eval-strategy no, or `train prepare` with a validation split)".into(),
            ));
        }
        let micro_per_epoch = train.len().div_ceil(args.per_device_train_batch_size) as u64;
        let steps_per_epoch = micro_per_epoch.div_ceil(args.gradient_accumulation_steps as u64);
        let max_steps = match args.max_steps {
            Some(s) => s,
            None => {
                let steps = (args.num_train_epochs * steps_per_epoch as f64).ceil();
                if steps > MAX_STEPS as f64 {
                    return Err(TrainerError::Args(format!(
                        "--num-train-epochs {} x {steps_per_epoch} steps per epoch is {steps:.3e} optimizer steps, more than the {MAX_STEPS:.0e} allowed; give fewer epochs or --max-steps",
                        args.num_train_epochs
                    )));
                }
                steps as u64
            }
        };
        let schedule = Schedule {
            base_lr: args.learning_rate,
            kind: args.lr_scheduler,
            warmup_steps: lmtrain_optim::warmup_steps(max_steps, args.warmup_steps, args.warmup_ratio),
            total_steps: max_steps,
        };
        let segments = decay_segments(model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), args.weight_decay);
        let config =
            AdamWConfig { beta1: args.adam_beta1, beta2: args.adam_beta2, eps: args.adam_epsilon, weight_decay: args.weight_decay };
        let master = model.params_to_host()?;
        let (be, store) = model.parts_mut();
        let optimizer = AdamW::with_state(config, store.into_training(be, master)?, segments);
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
            collator,
            train,
            eval,
            tokenizer_json,
            state,
            steps_per_epoch,
            show_progress: true,
            stop: None,
        })
    }

    /// Turns the progress bar off (tests, scripted use). It is also hidden when stderr is not
    /// a terminal.
    pub fn set_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    /// Lets `flag` stop the run (e.g. set by a signal handler): once it is set, [`Trainer::train`]
    /// finishes the optimizer step under way (and its logging, evaluation and checkpoint), writes
    /// a checkpoint of that step unless saving is off (`--save-strategy no`) or it just did, and
    /// returns with [`TrainOutcome::stopped`] set, without saving the final model.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Mutable access to the model (e.g. for evaluation before training).
    pub fn model_mut(&mut self) -> &mut M {
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
        let loaded = lmtrain_hf::load_params::<B, M>(dir, lmtrain_hf::LoadMode::Exact)?;
        if loaded.params.len() != self.model.num_params() {
            return Err(TrainerError::Mismatch(format!(
                "{}: checkpoint model has {} parameters, this run's model {}",
                dir.display(),
                loaded.params.len(),
                self.model.num_params()
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
        // a damaged or edited trainer_state.json must not resume into a silently wrong run
        if st.step_in_epoch >= self.steps_per_epoch || st.global_step > st.max_steps || st.global_step > u32::MAX as u64 {
            return Err(TrainerError::Checkpoint {
                path: dir.join(checkpoint::STATE_FILE),
                msg: format!(
                    "inconsistent loop state (global_step {}, step_in_epoch {} of {} per epoch, max_steps {}); use another checkpoint",
                    st.global_step, st.step_in_epoch, self.steps_per_epoch, st.max_steps
                ),
            });
        }
        let (be, store) = self.model.parts_mut();
        self.optimizer.restore(be, restored.exp_avg, restored.exp_avg_sq, &loaded.params, st.global_step as u32)?;
        store.set_params(be, &loaded.params)?;
        let mut state = restored.state;
        state.args = self.args.clone();
        self.state = state;
        Ok(())
    }

    /// Evaluates on the validation store, if there is one.
    pub fn evaluate(&mut self) -> Result<Option<EvalResult>, TrainerError> {
        let Some(store) = self.eval.as_ref() else { return Ok(None) };
        Ok(Some(evaluate(&mut self.model, store, self.args.per_device_eval_batch_size, self.collator.as_ref())?))
    }

    fn epoch_float(&self) -> f64 {
        self.state.epoch as f64 + self.state.step_in_epoch as f64 / self.steps_per_epoch as f64
    }

    /// Runs the loop from the current state to the last step, then saves the final model
    /// (config.json, model.safetensors, tokenizer.json) into the output directory.
    pub fn train(&mut self) -> Result<TrainOutcome, TrainerError> {
        let out_dir = self.args.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| TrainerError::io(&out_dir, e))?;
        let removed = checkpoint::remove_stale_temps(&out_dir)?;
        if !removed.is_empty() {
            eprintln!("note: removed {} temporary files an interrupted run left in {}", removed.len(), out_dir.display());
        }
        let mut log = MetricsLog::open(&out_dir, self.state.global_step)?;
        let bar = self.progress_bar();
        let mut outcome = TrainOutcome {
            global_step: self.state.global_step,
            last_loss: f64::NAN,
            tokens: 0,
            seconds: 0.0,
            last_eval: None,
            last_checkpoint: checkpoint::list_checkpoints(&out_dir)?.pop().map(|c| c.1),
            best_checkpoint: self.state.best_model_checkpoint.clone(),
            stopped: false,
        };
        let start = Instant::now();
        let mut side_time = Duration::ZERO; // evaluation + checkpoints
        let mut window = Window::new();
        let mut order = EpochOrder::new(self.train.len(), self.state.seed, self.state.epoch);
        let mut order_epoch = self.state.epoch;
        let mut batch = Batch::default();

        while self.state.global_step < self.state.max_steps {
            if order_epoch != self.state.epoch {
                order = EpochOrder::new(self.train.len(), self.state.seed, self.state.epoch);
                order_epoch = self.state.epoch;
            }
            let step = match self.step(&order, &mut batch) {
                Ok(s) => s,
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(match e {
                        TrainerError::NonFinite { what, value, step, lr, .. } => {
                            TrainerError::NonFinite { what, value, step, lr, last_checkpoint: outcome.last_checkpoint }
                        }
                        other => other,
                    });
                }
            };
            outcome.tokens += step.tokens;
            outcome.last_loss = step.loss;
            let gs = self.state.global_step;
            let is_last = gs == self.state.max_steps;
            window.loss += step.loss;
            window.steps += 1;
            window.tokens += step.tokens;
            bar.set_position(gs);
            bar.set_message(format!("loss {:.4} | {} tok/s", step.loss, human(window.tokens_per_s())));
            if gs.is_multiple_of(self.args.logging_steps) || is_last {
                self.log(&mut log, &step, &window)?;
                window = Window::new();
            }

            let side_start = Instant::now();
            let eval_result = if self.evaluate_now(gs, step.end_of_epoch) { self.evaluate()? } else { None };
            if let Some(r) = eval_result {
                log.write(&json!({"step": gs, "epoch": step.epoch, "eval_loss": r.loss, "perplexity": r.perplexity}))?;
                bar.suspend(|| eprintln!("step {gs}: eval loss {:.4}, perplexity {:.2}", r.loss, r.perplexity));
                outcome.last_eval = Some(r);
            }
            let saved = self.save_now(gs, step.end_of_epoch, is_last);
            if saved {
                log.sync()?;
                outcome.last_checkpoint = Some(self.save_checkpoint(&out_dir, eval_result)?);
            }
            if !is_last && self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                if !saved && self.args.save_strategy != IntervalStrategy::No {
                    log.sync()?;
                    outcome.last_checkpoint = Some(self.save_checkpoint(&out_dir, None)?);
                }
                outcome.stopped = true;
            }
            // Evaluation and checkpoint time stay out of tokens/s.
            side_time += side_start.elapsed();
            window.side += side_start.elapsed();
            if outcome.stopped {
                break;
            }
        }
        bar.finish_and_clear();
        outcome.seconds = (start.elapsed() - side_time).as_secs_f64();
        outcome.global_step = self.state.global_step;
        if outcome.stopped {
            return Ok(outcome);
        }
        self.load_best_at_end(&out_dir)?;
        outcome.best_checkpoint = self.state.best_model_checkpoint.clone();
        self.save_final_model()?;
        Ok(outcome)
    }

    /// One optimizer step: the micro-batches of this step, each forward + backward with its
    /// gradients accumulating, then clipping and AdamW; the step's loss and gradient norm are
    /// read from the backend once, at the end, and checked there.
    fn step(&mut self, order: &EpochOrder, batch: &mut Batch) -> Result<Step, TrainerError> {
        let (n, bsz, accum) = (self.train.len(), self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps);
        let micro_per_epoch = n.div_ceil(bsz);
        let step = self.state.global_step; // steps already taken
        let lr = self.schedule.lr(step);
        let first = self.state.step_in_epoch as usize * accum;
        let last = (first + accum).min(micro_per_epoch);
        let mut stats = self.model.backend().new_stats().map_err(ModelError::from)?;
        self.model.zero_grad()?;
        let mut tokens = 0u64;
        let mut ids = Vec::with_capacity(bsz);
        for mi in first..last {
            let (lo, hi) = (mi * bsz, ((mi + 1) * bsz).min(n));
            ids.clear();
            ids.extend((lo..hi).map(|p| order.get(p)));
            // Dropout masks and collator draws: a pure function of (seed, step, micro-batch), so
            // a resumed run draws exactly what the uninterrupted run would have.
            let stream = step.wrapping_mul(1 << 20) + mi as u64;
            self.collator.collate(&self.train, &ids, BatchKey::Train { step, micro: mi as u64 }, batch);
            self.model.accumulate_gradients(&batch.input(), Some(mix_seed(self.state.seed, stream)), &mut stats)?;
            tokens += batch.tokens() as u64;
        }
        let n_micro = last - first;
        let (be, store) = self.model.parts_mut();
        let (params, grads) = store.params_and_grads_mut();
        self.optimizer.step(be, B::view_mut(params), B::view(grads), lr as f32, self.args.max_grad_norm, n_micro, &mut stats)?;
        let read: StepStats = be.read_stats(&stats).map_err(ModelError::from)?;
        let loss = read.loss / n_micro as f64;
        let report = self.optimizer.report(&read);
        for (what, value) in [("loss", loss as f32), ("gradient norm", report.grad_norm)] {
            if !value.is_finite() {
                return Err(TrainerError::NonFinite { what, value, step: step + 1, lr, last_checkpoint: None });
            }
        }
        self.state.global_step += 1;
        self.state.step_in_epoch += 1;
        self.state.tokens_seen += tokens;
        let end_of_epoch = self.state.step_in_epoch == self.steps_per_epoch;
        let epoch = self.epoch_float();
        if end_of_epoch {
            self.state.epoch += 1;
            self.state.step_in_epoch = 0;
        }
        Ok(Step { loss, report, tokens, end_of_epoch, epoch })
    }

    /// One `metrics.jsonl` record of the logging window.
    fn log(&self, log: &mut MetricsLog, step: &Step, window: &Window) -> Result<(), TrainerError> {
        let lr = self.schedule.lr(self.state.global_step - 1);
        log.write(&json!({
            "step": self.state.global_step, "epoch": step.epoch, "loss": window.loss / window.steps as f64,
            "learning_rate": lr, "grad_norm": step.report.grad_norm, "tokens_per_s": window.tokens_per_s(),
        }))
    }

    fn evaluate_now(&self, gs: u64, end_of_epoch: bool) -> bool {
        match self.args.eval_strategy {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => gs.is_multiple_of(self.args.eval_interval()),
            IntervalStrategy::Epoch => end_of_epoch,
        }
    }

    fn save_now(&self, gs: u64, end_of_epoch: bool, is_last: bool) -> bool {
        match self.args.save_strategy {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => gs.is_multiple_of(self.args.save_steps) || is_last,
            IntervalStrategy::Epoch => end_of_epoch || is_last,
        }
    }

    /// The f32 parameters to write: the optimizer's master copy, or the model's own.
    fn params_f32(&self) -> Result<Vec<f32>, TrainerError> {
        match self.optimizer.master_params(self.model.backend())? {
            Some(p) => Ok(p),
            None => Ok(self.model.params_to_host()?),
        }
    }

    /// Writes `checkpoint-STEP/` (tracking the best one by this step's evaluation) and rotates.
    fn save_checkpoint(&mut self, out_dir: &Path, eval: Option<EvalResult>) -> Result<PathBuf, TrainerError> {
        let path = out_dir.join(checkpoint::checkpoint_name(self.state.global_step));
        if let Some(r) = eval
            && self.state.best_metric.is_none_or(|best| r.loss < best)
        {
            self.state.best_metric = Some(r.loss);
            self.state.best_model_checkpoint = Some(path.clone());
        }
        let be = self.model.backend();
        let (params, exp_avg, exp_avg_sq) = (self.params_f32()?, self.optimizer.exp_avg(be)?, self.optimizer.exp_avg_sq(be)?);
        let tensors = checkpoint::Tensors { params: &params, exp_avg: &exp_avg, exp_avg_sq: &exp_avg_sq };
        let saved = checkpoint::save(out_dir, &self.model, tensors, &self.tokenizer_json, &self.state)?;
        if let Some(limit) = self.args.save_total_limit {
            checkpoint::rotate(out_dir, limit, self.state.best_model_checkpoint.as_deref())?;
        }
        Ok(saved)
    }

    /// `--load-best-model-at-end`: the best checkpoint's weights replace the final ones.
    fn load_best_at_end(&mut self, out_dir: &Path) -> Result<(), TrainerError> {
        if !self.args.load_best_model_at_end {
            return Ok(());
        }
        let Some(name) = self.state.best_model_checkpoint.as_deref().and_then(Path::file_name) else { return Ok(()) };
        // By name inside this run's output directory: the recorded path may be relative to the
        // working directory of an earlier, resumed invocation.
        let best = out_dir.join(name);
        let loaded = lmtrain_hf::load_params::<B, M>(&best, lmtrain_hf::LoadMode::Exact)?;
        let (be, store) = self.model.parts_mut();
        store.set_params(be, &loaded.params)?;
        eprintln!("loaded the best model (eval loss {:.4}) from {}", self.state.best_metric.unwrap_or(f64::NAN), best.display());
        Ok(())
    }

    /// Writes config.json, model.safetensors and tokenizer.json into the output directory
    /// (what HF `trainer.save_model()` leaves there).
    fn save_final_model(&self) -> Result<(), TrainerError> {
        let dir = &self.args.output_dir;
        let params = if self.args.load_best_model_at_end { self.model.params_to_host()? } else { self.params_f32()? };
        lmtrain_hf::save_params::<B, M>(self.model.config(), self.model.param_infos(), &params, dir)?;
        lmtrain_hf::write_atomic(&dir.join(checkpoint::TOKENIZER_FILE), &self.tokenizer_json)?;
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
