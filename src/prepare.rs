//! `train prepare`: corpus -> tokenizer -> block store.

/// Flags of `train prepare`.
#[derive(clap::Args)]
pub struct PrepareArgs {}

/// Runs `train prepare`.
pub fn run(_args: PrepareArgs) -> anyhow::Result<()> {
    anyhow::bail!("`train prepare` is not built yet")
}
