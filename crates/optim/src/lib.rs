//! lmtrain-optim: the optimizer side of training, with Hugging Face / PyTorch semantics.
//!
//! * [`Schedule`]: learning-rate multipliers exactly as `transformers`'
//!   `get_{linear,cosine,constant}_schedule_with_warmup` (a `LambdaLR` evaluated at the number
//!   of optimizer steps already taken);
//! * [`decay_segments`]: weight-decay groups (HF Trainer: no decay on biases and LayerNorm weights);
//! * [`clip_scale`] (from `lmtrain-backend`, shared by every backend): `torch.nn.utils.clip_grad_norm_`
//!   as a gradient scale factor;
//! * [`AdamW`]: the optimizer state (first/second moments on the backend, step count) driving
//!   the backend's fused `adamw_update`; generic over [`Backend`], so a device backend plugs in
//!   unchanged.

use std::borrow::Cow;

use lmtrain_backend::{AdamWStep, Backend, BackendError, DecaySegment, OptimizerState};

pub use lmtrain_backend::clip_scale;
use serde::{Deserialize, Serialize};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The scheduler name is not one of the supported kinds.
    #[error("unknown learning-rate scheduler `{0}` (expected linear, cosine, constant or constant_with_warmup)")]
    UnknownScheduler(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Restored optimizer state does not match the parameter count.
    #[error("optimizer state holds {found} values per moment, the model has {expected} parameters")]
    StateSize {
        /// Parameter count of the model.
        expected: usize,
        /// Length of the restored moment buffers.
        found: usize,
    },
}

/// Kind of learning-rate schedule (`--lr-scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// Linear warmup from 0, then linear decay to 0 at the last step (HF default).
    Linear,
    /// Linear warmup, then half a cosine period down to 0.
    Cosine,
    /// Constant learning rate; warmup is ignored, as HF's `get_constant_schedule`.
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

impl std::str::FromStr for SchedulerKind {
    type Err = OptimError;
    fn from_str(s: &str) -> Result<Self, OptimError> {
        match s.replace('-', "_").as_str() {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            _ => Err(OptimError::UnknownScheduler(s.to_string())),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
        })
    }
}

/// A learning-rate schedule: `lr(k) = base_lr * multiplier(k)`, where `k` is the number of
/// optimizer steps already taken (0 for the first update), as PyTorch's `LambdaLR` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Schedule shape.
    pub kind: SchedulerKind,
    /// Warmup length in optimizer steps.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
}

impl Schedule {
    /// Multiplier of the base learning rate before optimizer step `k` (0-based).
    ///
    /// Computed in f64 like Python floats; HF's formulas use `max(1, ...)` guards so a zero
    /// warmup or a zero-length decay never divides by zero.
    pub fn multiplier(&self, k: u64) -> f64 {
        let (k, w, n) = (k as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warm = || k / w.max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup => {
                if k < w {
                    warm()
                } else {
                    1.0
                }
            }
            SchedulerKind::Linear => {
                if k < w {
                    warm()
                } else {
                    ((n - k) / (n - w).max(1.0)).max(0.0)
                }
            }
            SchedulerKind::Cosine => {
                if k < w {
                    warm()
                } else {
                    // num_cycles = 0.5: one half period from 1 down to 0.
                    let progress = (k - w) / (n - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        }
    }

    /// Learning rate for optimizer step `k` (0-based).
    pub fn lr(&self, k: u64) -> f64 {
        self.base_lr * self.multiplier(k)
    }
}

/// Warmup steps as HF `TrainingArguments.get_warmup_steps`: an explicit step count wins,
/// otherwise `ceil(total_steps * warmup_ratio)`.
pub fn warmup_steps(total_steps: u64, warmup_steps: u64, warmup_ratio: f64) -> u64 {
    if warmup_steps > 0 { warmup_steps } else { (total_steps as f64 * warmup_ratio).ceil() as u64 }
}

/// Builds the weight-decay segments covering a flat parameter buffer from
/// `(offset, len, decay)` triples (one per named parameter, in any order). Adjacent
/// parameters with the same decay flag merge into one segment.
pub fn decay_segments(params: impl IntoIterator<Item = (usize, usize, bool)>, weight_decay: f32) -> Vec<DecaySegment> {
    let mut items: Vec<(usize, usize, bool)> = params.into_iter().collect();
    items.sort_by_key(|&(offset, _, _)| offset);
    let mut out: Vec<DecaySegment> = Vec::new();
    for (offset, len, decay) in items {
        let wd = if decay { weight_decay } else { 0.0 };
        if let Some(last) = out.last_mut()
            && last.offset + last.len == offset
            && last.weight_decay == wd
        {
            last.len += len;
            continue;
        }
        out.push(DecaySegment { offset, len, weight_decay: wd });
    }
    out
}

/// Hyper-parameters of [`AdamW`] that do not change during a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay (`--adam-beta1`, 0.9).
    pub beta1: f32,
    /// Second-moment decay (`--adam-beta2`, 0.999).
    pub beta2: f32,
    /// Denominator epsilon (`--adam-epsilon`, 1e-8).
    pub eps: f32,
    /// Decoupled weight decay for the decaying group (`--weight-decay`, 0).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Result of one [`AdamW::step`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the (averaged) gradient before clipping, as HF logs `grad_norm`.
    pub grad_norm: f32,
    /// Learning rate the update used.
    pub lr: f32,
}

/// AdamW (`torch.optim.AdamW` semantics) over one flat parameter buffer, with averaging over
/// micro-batches and gradient clipping folded into the update as one scale factor (no extra pass
/// over the gradients).
///
/// The moments (and, on a backend whose compute dtype is not f32, the f32 master weights) live
/// on backend `B` next to the parameters, and every pass over them is one of the backend's ops
/// ([`Backend::global_norm`], [`Backend::adamw_update`]); the gradient norm stays in the
/// backend's step scalars, so the host reads it once, after the step.
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    segments: Vec<DecaySegment>,
    m: B::Master,
    v: B::Master,
    master: Option<B::Master>,
    step: u32,
    last: Option<AdamWStep>,
}

impl<B: Backend> std::fmt::Debug for AdamW<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("segments", &self.segments)
            .field("n_params", &B::master_len(&self.m))
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer (zero moments on `backend`, step 0) for the parameters `params` (f32,
    /// host) with the given decay segments (see [`decay_segments`]; they must cover them all).
    /// On a backend without f32 compute, `params` become the master weights
    /// ([`OptimizerState::alloc`]). Each buffer is an allocation of its own; the
    /// trainer allocates them with the parameters instead ([`AdamW::with_state`]).
    pub fn new<'p>(
        backend: &B,
        config: AdamWConfig,
        params: impl Into<Cow<'p, [f32]>>,
        segments: Vec<DecaySegment>,
    ) -> Result<Self, OptimError> {
        Ok(Self::with_state(config, OptimizerState::alloc(backend, &params.into())?, segments))
    }

    /// An optimizer at step 0 over the given state (zero moments; see
    /// `ParamStore::into_training`, which allocates it with the parameters).
    pub fn with_state(config: AdamWConfig, state: OptimizerState<B>, segments: Vec<DecaySegment>) -> Self {
        debug_assert_eq!(segments.iter().map(|s| s.len).sum::<usize>(), B::master_len(&state.exp_avg));
        let OptimizerState { exp_avg: m, exp_avg_sq: v, master } = state;
        Self { config, segments, m, v, master, step: 0, last: None }
    }

    /// The fixed hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> u32 {
        self.step
    }

    /// First moments (`exp_avg`), copied to host memory.
    pub fn exp_avg(&self, backend: &B) -> Result<Vec<f32>, OptimError> {
        Ok(backend.master_to_host(&self.m)?)
    }

    /// Second moments (`exp_avg_sq`), copied to host memory.
    pub fn exp_avg_sq(&self, backend: &B) -> Result<Vec<f32>, OptimError> {
        Ok(backend.master_to_host(&self.v)?)
    }

    /// The f32 master weights, when the backend keeps them apart from its working copy (what a
    /// checkpoint must save instead of the working copy).
    pub fn master_params(&self, backend: &B) -> Result<Option<Vec<f32>>, OptimError> {
        Ok(self.master.as_ref().map(|m| backend.master_to_host(m)).transpose()?)
    }

    /// Restores the state saved by a checkpoint (its moments, step count and f32 parameters),
    /// uploading it to `backend`.
    pub fn restore(&mut self, backend: &B, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>, params: &[f32], step: u32) -> Result<(), OptimError> {
        let expected = B::master_len(&self.m);
        for found in [exp_avg.len(), exp_avg_sq.len(), params.len()] {
            if found != expected {
                return Err(OptimError::StateSize { expected, found });
            }
        }
        // in place: the state may be a part of one allocation with the parameters
        backend.master_write(&mut self.m, &exp_avg)?;
        backend.master_write(&mut self.v, &exp_avg_sq)?;
        if let Some(master) = self.master.as_mut() {
            backend.master_write(master, params)?;
        }
        self.step = step;
        Ok(())
    }

    /// One update on `backend`. `grads` holds the SUM of `accum` micro-batch gradients (the
    /// model accumulates); they are averaged, clipped to `max_norm` (when > 0) and applied with
    /// learning rate `lr` to `params`. The gradient norm goes to `stats`; `grads` itself is not
    /// modified.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        backend: &B,
        params: B::ViewMut<'_>,
        grads: B::View<'_>,
        lr: f32,
        max_norm: f32,
        accum: usize,
        stats: &mut B::Stats,
    ) -> Result<(), OptimError> {
        backend.global_norm(grads, stats)?;
        self.step += 1;
        let step = AdamWStep {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            step: self.step,
            max_grad_norm: max_norm,
            accum: accum as u32,
        };
        backend.adamw_update(params, self.master.as_mut(), grads, &mut self.m, &mut self.v, &self.segments, &step, stats)?;
        self.last = Some(step);
        Ok(())
    }

    /// What the last step did, given the step scalars the host read after it.
    pub fn report(&self, stats: &lmtrain_backend::StepStats) -> StepReport {
        let step = self.last.expect("a step was taken");
        StepReport { grad_norm: step.grad_scale(stats.grad_norm).0, lr: step.lr }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmtrain_backend::Backend;
    use lmtrain_cpu::Cpu;

    fn sched(kind: SchedulerKind, warmup: u64, total: u64) -> Schedule {
        Schedule { base_lr: 1.0, kind, warmup_steps: warmup, total_steps: total }
    }

    /// Values printed by `transformers` 5.23: `get_*_schedule_with_warmup(opt, 3, 10)` with
    /// lr 1.0, reading `scheduler.get_last_lr()` before each of the 10 optimizer steps.
    #[test]
    fn linear_matches_hf() {
        let s = sched(SchedulerKind::Linear, 3, 10);
        let hf = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 6.0 / 7.0, 5.0 / 7.0, 4.0 / 7.0, 3.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];
        for (k, want) in hf.iter().enumerate() {
            assert!((s.multiplier(k as u64) - want).abs() < 1e-12, "step {k}");
        }
        assert_eq!(s.multiplier(10), 0.0);
        assert_eq!(s.multiplier(12), 0.0, "clamped at 0 past the end");
    }

    #[test]
    fn cosine_matches_hf() {
        let s = sched(SchedulerKind::Cosine, 3, 10);
        let hf = [
            0.0,
            0.3333333333333333,
            0.6666666666666666,
            1.0,
            0.9504844339512095,
            0.8117449009293668,
            0.6112604669781572,
            0.38873953302184283,
            0.18825509907063326,
            0.04951556604879048,
        ];
        for (k, want) in hf.iter().enumerate() {
            assert!((s.multiplier(k as u64) - want).abs() < 1e-12, "step {k}: {}", s.multiplier(k as u64));
        }
    }

    #[test]
    fn constant_kinds() {
        let c = sched(SchedulerKind::Constant, 3, 10);
        assert!((0..12).all(|k| c.multiplier(k) == 1.0));
        let w = sched(SchedulerKind::ConstantWithWarmup, 4, 10);
        assert_eq!(w.multiplier(0), 0.0);
        assert_eq!(w.multiplier(2), 0.5);
        assert_eq!(w.multiplier(4), 1.0);
        assert_eq!(w.multiplier(9), 1.0);
    }

    #[test]
    fn zero_warmup_starts_at_peak() {
        let s = sched(SchedulerKind::Linear, 0, 4);
        assert_eq!(s.multiplier(0), 1.0);
        assert_eq!(s.multiplier(2), 0.5);
    }

    #[test]
    fn warmup_from_ratio_rounds_up() {
        assert_eq!(warmup_steps(1000, 0, 0.1), 100);
        assert_eq!(warmup_steps(15, 0, 0.1), 2);
        assert_eq!(warmup_steps(15, 7, 0.1), 7);
        assert_eq!(warmup_steps(15, 0, 0.0), 0);
    }

    #[test]
    fn scheduler_names_parse() {
        assert_eq!("cosine".parse::<SchedulerKind>().unwrap(), SchedulerKind::Cosine);
        assert_eq!("constant-with-warmup".parse::<SchedulerKind>().unwrap(), SchedulerKind::ConstantWithWarmup);
        assert!("exponential".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn segments_merge_by_decay_flag() {
        let segs = decay_segments([(10, 5, false), (0, 6, true), (6, 4, true), (15, 3, true)], 0.1);
        let got: Vec<_> = segs.iter().map(|s| (s.offset, s.len, s.weight_decay)).collect();
        assert_eq!(got, vec![(0, 10, 0.1), (10, 5, 0.0), (15, 3, 0.1)]);
    }

    #[test]
    fn clip_matches_torch_formula() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        let c = clip_scale(4.0, 1.0);
        assert_eq!(c, 1.0f32 / (4.0f32 + 1e-6));
        assert_eq!(clip_scale(100.0, 0.0), 1.0);
    }

    /// One AdamW step against a hand computation of torch.optim.AdamW, with accumulation
    /// (grads summed over 2 micro-batches) and clipping active.
    #[test]
    fn adamw_step_matches_reference() {
        let segs = decay_segments([(0, 2, true), (2, 1, false)], 0.1);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut opt = AdamW::new(&Cpu, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }, &p, segs).unwrap();
        let g_sum = [6.0f32, 8.0, 0.0]; // averaged over 2: [3, 4, 0], norm 5
        let mut stats = Cpu.new_stats().unwrap();
        opt.step(&Cpu, &mut p, &g_sum, 0.01, 1.0, 2, &mut stats).unwrap();
        let r = opt.report(&stats);
        assert!((r.grad_norm - 5.0).abs() < 1e-6);
        let coef = 1.0f64 / (5.0 + 1e-6);
        let want = |p0: f64, g: f64, wd: f64| {
            let g = g * coef;
            let p1 = p0 * (1.0 - 0.01 * wd);
            let m = 0.1 * g;
            let v = 0.001 * g * g;
            let mhat = m / 0.1;
            let vhat = v / 0.001;
            p1 - 0.01 * mhat / (vhat.sqrt() + 1e-8)
        };
        let expect = [want(1.0, 3.0, 0.1), want(-2.0, 4.0, 0.1), want(0.5, 0.0, 0.0)];
        for i in 0..3 {
            assert!((p[i] as f64 - expect[i]).abs() < 1e-6, "param {i}: {} vs {}", p[i], expect[i]);
        }
        assert_eq!(opt.step_count(), 1);
        assert!(opt.restore(&Cpu, vec![0.0; 2], vec![0.0; 3], &[0.0; 3], 1).is_err());
    }
}
