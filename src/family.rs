//! The model families `train` knows, by their Hugging Face `model_type`, and the one place that
//! maps a name to a type: a command is written once, generic over [`Family`], and
//! [`dispatch`] runs it for whichever family a checkpoint or a flag names.

use anyhow::bail;
use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::bert::{Bert, Roberta};
use lmtrain_model::deberta::Deberta;
use lmtrain_model::distilbert::DistilBert;
use lmtrain_model::gpt2::Gpt2;

use crate::memory::Metered;
use crate::run::ScratchConfig;

/// The `model_type`s [`dispatch`] accepts, for messages.
pub const MODEL_TYPES: &str = "gpt2, bert, distilbert, roberta or deberta-v2";

/// A model family on the CPU backend whose config can also be built from `train`'s flags, and
/// whose memory can be metered.
pub trait Family: LanguageModel<Cpu, Config: ScratchConfig> + Metered {}

impl<M: LanguageModel<Cpu, Config: ScratchConfig> + Metered> Family for M {}

/// A command generic over the family.
pub trait ForFamily {
    /// What the command returns.
    type Output;
    /// Runs the command for family `M`.
    fn run<M: Family>(self) -> anyhow::Result<Self::Output>;
}

/// Runs `f` for the family named `model_type`.
pub fn dispatch<F: ForFamily>(model_type: &str, f: F) -> anyhow::Result<F::Output> {
    match model_type {
        "gpt2" => f.run::<Gpt2<Cpu>>(),
        "bert" => f.run::<Bert<Cpu>>(),
        "distilbert" => f.run::<DistilBert<Cpu>>(),
        "roberta" => f.run::<Roberta<Cpu>>(),
        "deberta-v2" => f.run::<Deberta<Cpu>>(),
        other => bail!("model type {other:?} is not supported ({MODEL_TYPES})"),
    }
}
