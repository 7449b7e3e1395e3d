//! The model families `train` knows, by their Hugging Face `model_type`, the backends it runs
//! them on (`--device`, `--dtype`), and the one place that maps names to types: a command is
//! written once, generic over the backend and the [`Family`], and [`dispatch`] runs it for
//! whichever family a checkpoint or a flag names on whichever backend the flags choose.

use anyhow::bail;
use lmtrain_backend::Backend;
use lmtrain_cpu::Cpu;
use lmtrain_cuda::{CudaBackend, KernelDtype};
use lmtrain_model::LanguageModel;
use lmtrain_model::bert::{Bert, Roberta};
use lmtrain_model::deberta::Deberta;
use lmtrain_model::distilbert::DistilBert;
use lmtrain_model::gpt2::Gpt2;

use crate::memory::Metered;
use crate::run::ScratchConfig;

/// The `model_type`s [`dispatch`] accepts, for messages.
pub const MODEL_TYPES: &str = "gpt2, bert, distilbert, roberta or deberta-v2";
const KNOWN: [&str; 5] = ["gpt2", "bert", "distilbert", "roberta", "deberta-v2"];

/// A model family on backend `B` whose config can also be built from `train`'s flags, and whose
/// memory can be metered.
pub trait Family<B: Backend>: LanguageModel<B, Config: ScratchConfig> + Metered<B> {}

impl<B: Backend, M: LanguageModel<B, Config: ScratchConfig> + Metered<B>> Family<B> for M {}

/// A command generic over the backend and the family.
pub trait ForFamily {
    /// What the command returns.
    type Output;
    /// Runs the command for family `M` on `backend`.
    fn run<B: Backend, M: Family<B>>(self, backend: B) -> anyhow::Result<Self::Output>;
}

/// `--device`: where the model is trained or run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU backend (every family; the reference of the others).
    #[default]
    Cpu,
    /// The first NVIDIA GPU (every family too).
    Cuda,
}

/// `--dtype`: the dtype activations and the working copy of the weights are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// f32 everywhere (the CPU's only dtype).
    F32,
    /// bf16 storage with f32 accumulation and f32 master weights (CUDA).
    Bf16,
}

/// The backend a command runs on: `--device` and `--dtype` together.
#[derive(clap::Args, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Where to run: cpu, or cuda (the first NVIDIA GPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Storage dtype of activations and of the weights' working copy: f32, or bf16 (f32 master
    /// weights and accumulation) [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
}

impl Target {
    /// The dtype in effect.
    pub fn dtype(&self) -> Dtype {
        self.dtype.unwrap_or(match self.device {
            Device::Cpu => Dtype::F32,
            Device::Cuda => Dtype::Bf16,
        })
    }

    /// Refuses combinations no backend has, before anything is opened or read.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.device == Device::Cpu && self.dtype() == Dtype::Bf16 {
            bail!("--dtype bf16 needs --device cuda; the CPU backend computes in f32 (drop --dtype)");
        }
        Ok(())
    }
}

/// A command generic over the backend only (its family is fixed).
pub trait ForBackend {
    /// What the command returns.
    type Output;
    /// Runs the command on `backend`.
    fn run<B: Backend>(self, backend: B) -> anyhow::Result<Self::Output>;
}

/// Runs `f` on the backend `target` names.
pub fn on_target<F: ForBackend>(target: Target, f: F) -> anyhow::Result<F::Output> {
    target.check()?;
    match (target.device, target.dtype()) {
        (Device::Cpu, _) => f.run(Cpu),
        (Device::Cuda, Dtype::F32) => f.run(open_cuda::<f32>()?),
        (Device::Cuda, Dtype::Bf16) => f.run(open_cuda::<half::bf16>()?),
    }
}

/// Runs `f` for the family named `model_type` on the backend `target` names.
pub fn dispatch<F: ForFamily>(model_type: &str, target: Target, f: F) -> anyhow::Result<F::Output> {
    check_runs_on(model_type, target)?;
    on_target(target, Families { model_type, f })
}

/// Refuses an unknown family, and a backend `target` that does not exist, before anything is
/// opened or read (every backend runs every family).
pub fn check_runs_on(model_type: &str, target: Target) -> anyhow::Result<()> {
    target.check()?;
    if !KNOWN.contains(&model_type) {
        bail!("model type {model_type:?} is not supported ({MODEL_TYPES})");
    }
    Ok(())
}

/// Opens the first GPU; the error says what is missing and what to use instead.
fn open_cuda<T: KernelDtype>() -> anyhow::Result<CudaBackend<T>> {
    let backend = CudaBackend::<T>::open(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}; use --device cpu"))?;
    eprintln!("device: {}", backend.device().name());
    Ok(backend)
}

/// A family command on one backend, the family by name.
struct Families<'a, F> {
    model_type: &'a str,
    f: F,
}

impl<F: ForFamily> ForBackend for Families<'_, F> {
    type Output = F::Output;

    fn run<B: Backend>(self, backend: B) -> anyhow::Result<F::Output> {
        match self.model_type {
            "gpt2" => self.f.run::<B, Gpt2<B>>(backend),
            "bert" => self.f.run::<B, Bert<B>>(backend),
            "distilbert" => self.f.run::<B, DistilBert<B>>(backend),
            "roberta" => self.f.run::<B, Roberta<B>>(backend),
            "deberta-v2" => self.f.run::<B, Deberta<B>>(backend),
            other => bail!("model type {other:?} is not supported ({MODEL_TYPES})"),
        }
    }
}
