//! Device memory of a training run: `--dry-run` (print what a configuration needs and stop),
//! the check before training (refuse a run that does not fit, naming the largest batch that
//! does) and `--auto-find-batch-size` (lower the batch until it fits, keeping the effective
//! batch with gradient accumulation).
//!
//! The needs are measured by [`lmtrain_trainer::memory::measure`]: the model built on a
//! metering backend runs one training step there. Added to them is a fixed workspace: on CUDA
//! 64 MiB, the 32 MiB cuBLASLt workspace cudarc allocates on an sm_90 device (4 MiB before
//! Hopper) and as much again for cuBLAS's own handle workspace and the kernels' small per-op
//! scratch; on the CPU 64 MiB for the matrix products' per-thread packing buffers and per-op
//! temporaries. The CUDA context is not counted: against an opened device the budget is its
//! free memory after the context is made; a `--device-memory` figure must leave room for it.
//! On the CPU a checkpoint copies the parameters and both moments to f32 host buffers while
//! the activations are held, so those 12 bytes a parameter count there when saving is on.

use std::marker::PhantomData;
use std::str::FromStr;

use anyhow::bail;
use lmtrain_backend::Backend;
use lmtrain_backend::meter::{AttnSaves, Meter, Profile};
use lmtrain_model::bert::{Bert, Roberta};
use lmtrain_model::deberta::Deberta;
use lmtrain_model::distilbert::DistilBert;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_model::{LanguageModel, Objective};
use lmtrain_store::BlockStore;
use lmtrain_trainer::memory::{Needs, StepShape, largest_batch, measure};
use lmtrain_trainer::{IntervalStrategy, TrainingArgs};

use crate::family::Dtype;
use crate::run::TrainArgs;

/// A size in bytes as `--device-memory` takes it: a number and a unit, `B`, `KB`, `MB`, `GB`,
/// `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), case-insensitive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim());
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(format!("`{s}`: expected a number and a unit (GB, GiB, MB, MiB, ...), e.g. 80GB")),
        };
        let value: f64 = number.parse().map_err(|_| format!("`{s}`: `{number}` is not a number"))?;
        let bytes = value * scale as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!("`{s}` is not a usable memory size"));
        }
        Ok(Bytes(bytes as u64))
    }
}

/// A family on backend `B` together with the same family on the metering backends.
pub trait Metered<B: Backend>: LanguageModel<B> {
    /// The family on a meter of compute dtype `F32`.
    type On<const F32: bool>: LanguageModel<Meter<F32>, Config = Self::Config>;
}

impl<B: Backend> Metered<B> for Gpt2<B> {
    type On<const F32: bool> = Gpt2<Meter<F32>>;
}
impl<B: Backend> Metered<B> for Bert<B> {
    type On<const F32: bool> = Bert<Meter<F32>>;
}
impl<B: Backend> Metered<B> for Roberta<B> {
    type On<const F32: bool> = Roberta<Meter<F32>>;
}
impl<B: Backend> Metered<B> for DistilBert<B> {
    type On<const F32: bool> = DistilBert<Meter<F32>>;
}
impl<B: Backend> Metered<B> for Deberta<B> {
    type On<const F32: bool> = Deberta<Meter<F32>>;
}

/// The memory a run is checked against.
struct Device {
    /// Where the budget comes from, for messages (`--device-memory`, the GPU's free memory, the
    /// host's available memory).
    name: String,
    /// Bytes a run may use.
    budget: u64,
    /// What attention keeps there.
    profile: Profile,
    /// Whether the compute dtype is f32.
    f32: bool,
    /// The fixed workspace added to every estimate.
    workspace: u64,
    /// Whether checkpoints copy the optimizer state to host memory counted here (the CPU).
    host: bool,
}

impl Device {
    /// `8.00 GB (--device-memory)`.
    fn has(&self) -> String {
        format!("{} ({})", gb(self.budget), self.name)
    }
}

/// Workspace assumed on either device (see the module documentation).
const WORKSPACE: u64 = 64 << 20;

/// The device of `a` and its memory: `--device-memory` when given, else the host's available
/// memory (cpu) or the free memory of CUDA device 0. `None` when no figure is known (a CPU on a
/// platform that does not say).
fn device(a: &TrainArgs) -> anyhow::Result<Option<Device>> {
    a.target.check()?;
    let cuda = a.target.device == crate::family::Device::Cuda;
    let f32 = a.target.dtype() == Dtype::F32;
    // the CPU keeps attention probabilities and its head allocates per-row temporaries; the CUDA
    // backend keeps the row log-sum-exp and its fused head works in the logits buffer
    let profile = if cuda { Profile::from(AttnSaves::RowLogSumExp) } else { lmtrain_cpu::meter_profile() };
    let found = match (a.device_memory, cuda) {
        (Some(Bytes(b)), _) => Some(("--device-memory".to_string(), b)),
        (None, false) => {
            lmtrain_model::limits::host_memory().map(|m| (format!("available, of {} on this machine", gb(m.total)), m.available))
        }
        (None, true) => {
            // the device's context only: the run opens the device for work afterwards
            let (name, free, total) = lmtrain_cuda::CudaDevice::query_memory(0)
                .map_err(|e| anyhow::anyhow!("--device cuda: {e}; give --device-memory SIZE to estimate without the device"))?;
            Some((format!("free on {name}, of {}", gb(total)), free))
        }
    };
    Ok(found.map(|(name, budget)| Device { name, budget, profile, f32, workspace: WORKSPACE, host: !cuda }))
}

/// `bytes` in GB (10^9 bytes, two decimals), or MB / kB below one of them.
fn gb(bytes: u64) -> String {
    match bytes {
        1_000_000_000.. => format!("{:.2} GB", bytes as f64 / 1e9),
        1_000_000.. => format!("{:.1} MB", bytes as f64 / 1e6),
        _ => format!("{:.1} kB", bytes as f64 / 1e3),
    }
}

/// What a run of family `M` needs per batch, on one device.
struct Estimator<'a, B: Backend, M: Metered<B>> {
    config: &'a M::Config,
    device: Device,
    t: usize,
    mlm_probability: f64,
    /// `--recompute`.
    recompute: bool,
    /// Host copies a checkpoint makes, counted on the CPU when saving is on.
    checkpoint: u64,
    backend: PhantomData<fn() -> B>,
}

impl<B: Backend, M: Metered<B>> Estimator<'_, B, M> {
    fn needs(&self, b: usize) -> anyhow::Result<Needs> {
        let shape = StepShape { b, t: self.t, mlm_probability: self.mlm_probability, recompute: self.recompute };
        Ok(if self.device.f32 {
            measure::<M::On<true>, true>(self.config, self.device.profile, shape)?
        } else {
            measure::<M::On<false>, false>(self.config, self.device.profile, shape)?
        })
    }

    /// Everything a run at batch `b` needs.
    fn total(&self, b: usize) -> anyhow::Result<u64> {
        Ok(self.needs(b)?.total() + self.device.workspace + self.checkpoint)
    }

    fn fits(&self, b: usize) -> anyhow::Result<bool> {
        Ok(self.total(b)? <= self.device.budget)
    }

    /// The largest batch below `b` that fits (`b` does not).
    fn largest_below(&self, b: usize) -> anyhow::Result<Option<usize>> {
        largest_batch(b - 1, self.device.budget, |b| self.total(b))
    }

    /// The largest batch that fits when `b` does, from the growth of the need per row (the
    /// activations are linear in the batch: exactly for a causal LM, to within the head's
    /// rounding for a masked one).
    fn largest_above(&self, b: usize) -> anyhow::Result<usize> {
        let (at, next) = (self.total(b)?, self.total(b + 1)?);
        let per_row = (next - at).max(1);
        Ok(b + ((self.device.budget - at) / per_row) as usize)
    }

    /// The one-line breakdown of a run at batch `b`.
    fn breakdown(&self, b: usize) -> anyhow::Result<String> {
        let n = self.needs(b)?;
        let checkpoint = if self.checkpoint > 0 { format!(", checkpoint copies {}", gb(self.checkpoint)) } else { String::new() };
        Ok(format!(
            "needs {} (parameters {}, gradients {}, optimizer state {}, activations {} at batch {b} x {}, workspace {}{checkpoint})",
            gb(self.total(b)?),
            gb(n.params),
            gb(n.grads),
            gb(n.optimizer),
            gb(n.activations),
            self.t,
            gb(self.device.workspace)
        ))
    }
}

/// The largest divisor of `effective` that is at most `max` (a batch that keeps the effective
/// batch exactly with `effective / it` accumulation steps).
fn divisor_at_most(effective: usize, max: usize) -> usize {
    (1..=max.min(effective)).rev().find(|d| effective.is_multiple_of(*d)).unwrap_or(1)
}

/// The flags that run batch `largest` (or below) with the effective batch of `args`.
fn advice(args: &TrainingArgs, largest: usize) -> String {
    let effective = args.per_device_train_batch_size * args.gradient_accumulation_steps;
    let b = divisor_at_most(effective, largest);
    format!("use --per-device-train-batch-size {b} --gradient-accumulation-steps {}", effective / b)
}

fn estimator<'a, B: Backend, M: Metered<B>>(
    a: &TrainArgs,
    args: &TrainingArgs,
    config: &'a M::Config,
    train: &BlockStore,
) -> anyhow::Result<Option<Estimator<'a, B, M>>> {
    // the blocks must fit the model before a step of them can be measured
    lmtrain_trainer::check_store_fits(train, config, None)?;
    let Some(device) = device(a)? else { return Ok(None) };
    let n_params = M::param_table(config)?.last().map_or(0, |p| p.offset + p.len) as u64;
    let saving = device.host && args.save_strategy != IntervalStrategy::No;
    let mlm_probability = if M::OBJECTIVE == Objective::MaskedLm { a.masking.mlm_probability } else { 0.0 };
    Ok(Some(Estimator {
        config,
        device,
        t: train.block_size(),
        mlm_probability,
        recompute: a.recompute,
        checkpoint: if saving { 12 * n_params } else { 0 },
        backend: PhantomData,
    }))
}

/// Whether the run evaluates, at which batch.
fn eval_batch(args: &TrainingArgs, eval: Option<&BlockStore>) -> Option<usize> {
    (eval.is_some() && args.eval_strategy != IntervalStrategy::No).then_some(args.per_device_eval_batch_size)
}

/// Before training: refuses a run that does not fit the device (one line naming the largest
/// batch that does), or with `--auto-find-batch-size` lowers the batches until they fit.
pub fn fit<B: Backend, M: Metered<B>>(
    a: &TrainArgs,
    mut args: TrainingArgs,
    config: &M::Config,
    train: &BlockStore,
    eval: Option<&BlockStore>,
) -> anyhow::Result<TrainingArgs> {
    let Some(e) = estimator::<B, M>(a, &args, config, train)? else { return Ok(args) };
    let b = args.per_device_train_batch_size;
    if !e.fits(b)? {
        let Some(largest) = e.largest_below(b)? else {
            bail!("{}, the device has {}; not even batch 1 fits: use a smaller model or block size", e.breakdown(1)?, e.device.has());
        };
        if !a.auto_find_batch_size {
            bail!(
                "{}, the device has {}; the largest batch that fits is {largest}: {} (or --auto-find-batch-size)",
                e.breakdown(b)?,
                e.device.has(),
                advice(&args, largest)
            );
        }
        let effective = b * args.gradient_accumulation_steps;
        let lowered = divisor_at_most(effective, largest);
        args.per_device_train_batch_size = lowered;
        args.gradient_accumulation_steps = effective / lowered;
        eprintln!(
            "--auto-find-batch-size: batch {b} needs {}, the device has {}; training with --per-device-train-batch-size {lowered} --gradient-accumulation-steps {} (the same effective batch of {effective})",
            gb(e.total(b)?),
            e.device.has(),
            args.gradient_accumulation_steps
        );
    }
    if let Some(eb) = eval_batch(&args, eval).filter(|&eb| !e.fits(eb).unwrap_or(false)) {
        let largest = e.largest_below(eb)?.unwrap_or(1);
        if !a.auto_find_batch_size {
            bail!(
                "evaluation at --per-device-eval-batch-size {eb} {}, the device has {}; use --per-device-eval-batch-size {largest} (or --auto-find-batch-size)",
                e.breakdown(eb)?,
                e.device.has()
            );
        }
        args.per_device_eval_batch_size = largest;
        eprintln!("--auto-find-batch-size: evaluating with --per-device-eval-batch-size {largest} (batch {eb} does not fit)");
    }
    Ok(args)
}

/// `--dry-run`: prints what one training step of `config` needs (and an evaluation batch, when
/// the run evaluates) and whether it fits; an error (one line) when it does not.
pub fn dry_run<B: Backend, M: Metered<B>>(
    a: &TrainArgs,
    args: &TrainingArgs,
    config: &M::Config,
    train: &BlockStore,
    eval: Option<&BlockStore>,
) -> anyhow::Result<()> {
    let Some(e) = estimator::<B, M>(a, args, config, train)? else {
        bail!("--dry-run: this platform does not report its memory; give --device-memory SIZE");
    };
    let b = args.per_device_train_batch_size;
    let n = e.needs(b)?;
    let n_params = M::param_table(config)?.last().map_or(0, |p| p.offset + p.len);
    let dtype = if e.device.f32 { "f32" } else { "bf16" };
    println!(
        "{}: {:.2}M parameters, {dtype}, one training step at batch {b} x {} positions",
        M::HF.architecture,
        n_params as f64 / 1e6,
        e.t
    );
    let optimizer = if e.device.f32 { "AdamW moments, f32" } else { "AdamW moments and master weights, f32" };
    let workspace = if e.device.host { "matrix-product packing, per-op temporaries" } else { "cuBLAS and cuBLASLt" };
    let mut rows = vec![
        ("parameters", n.params, dtype),
        ("gradients", n.grads, dtype),
        ("optimizer state", n.optimizer, optimizer),
        ("activations", n.activations, "saved for the backward, their gradients, logits"),
        ("workspace", e.device.workspace, workspace),
    ];
    if e.checkpoint > 0 {
        rows.push(("checkpoint copies", e.checkpoint, "f32 host copies while saving"));
    }
    let total = e.total(b)?;
    rows.push(("total", total, ""));
    for (what, bytes, note) in rows {
        println!("{}", format!("  {what:<18} {:>10} {bytes:>16} bytes  {note}", gb(bytes)).trim_end());
    }
    println!("device memory: {}", e.device.has());
    if total > e.device.budget {
        let largest = match e.largest_below(b)? {
            Some(l) => format!("the largest batch that fits is {l}: {}", advice(args, l)),
            None => "not even batch 1 fits: use a smaller model or block size".to_string(),
        };
        bail!("batch {b} does not fit: it {}, the device has {}; {largest}", e.breakdown(b)?, e.device.has());
    }
    println!("fits; the largest per-device batch that fits is {}", e.largest_above(b)?);
    if let Some(eb) = eval_batch(args, eval) {
        let need = e.total(eb)?;
        if need > e.device.budget {
            let largest = e.largest_below(eb)?.unwrap_or(1);
            bail!(
                "evaluation at --per-device-eval-batch-size {eb} needs {}, the device has {}; use --per-device-eval-batch-size {largest}",
                gb(need),
                e.device.has()
            );
        }
        println!("evaluation at batch {eb} x {}: {} in all, fits", e.t, gb(need));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_base_10_and_base_2() {
        let b = |s: &str| s.parse::<Bytes>().map(|b| b.0);
        assert_eq!(b("80GB"), Ok(80_000_000_000));
        assert_eq!(b("80GiB"), Ok(80 << 30));
        assert_eq!(b("1.5 mb"), Ok(1_500_000));
        assert_eq!(b("512MiB"), Ok(512 << 20));
        assert_eq!(b("123B"), Ok(123));
        assert!(b("80").unwrap_err().contains("expected a number and a unit"));
        assert!(b("1.2.3GB").unwrap_err().contains("is not a number"));
        assert!(b("0GB").is_err());
    }

    #[test]
    fn a_lowered_batch_divides_the_effective_batch() {
        assert_eq!(divisor_at_most(8, 2), 2);
        assert_eq!(divisor_at_most(8, 5), 4);
        assert_eq!(divisor_at_most(24, 7), 6);
        assert_eq!(divisor_at_most(7, 6), 1);
        assert_eq!(divisor_at_most(8, 100), 8);
    }
}
