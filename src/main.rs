//! `train`: the lmtrain command line. Thin on purpose: it parses flags and hands
//! the work to the library crates; every error reaches the user as one line.

mod prepare;
mod run;

use clap::{Parser, Subcommand};

/// lmtrain: train GPT-2 (causal LM) and BERT-family (masked LM) models from one binary.
///
/// With no subcommand, `train` trains a model. With no arguments at all it trains a
/// small GPT-2 on the corpus embedded in the binary, as a demonstration.
#[derive(Parser)]
#[command(name = "train", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: run::TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize a text corpus and cut it into a memory-mapped block store.
    Prepare(prepare::PrepareArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Prepare(args)) => prepare::run(args),
        None => run::run(cli.train),
    };
    if let Err(err) = result {
        // One clear line (with its causes), non-zero exit.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
