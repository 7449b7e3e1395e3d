//! `train` (no subcommand): the training loop.

/// Flags of `train`.
#[derive(clap::Args)]
pub struct TrainArgs {}

/// Runs training.
pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("training is not built yet")
}
