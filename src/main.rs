//! `train`: the lmtrain command line. Thin on purpose: it parses flags and hands
//! the work to the library crates; every error reaches the user as one line.

mod demo;
mod eval;
mod generate;
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
    #[command(long_about = prepare::LONG_ABOUT)]
    Prepare(prepare::PrepareArgs),
    /// Loss and perplexity of a checkpoint on a block store or a text file.
    Eval(eval::EvalArgs),
    /// Continue a prompt with a checkpoint (greedy or sampled, with a KV cache).
    Generate(generate::GenerateArgs),
}

fn main() {
    // No arguments at all: the embedded demonstration.
    let demo = std::env::args_os().len() == 1;
    let cli = Cli::parse();
    // The command runs on a worker of the rayon pool, so each parallel op starts from inside the
    // pool rather than waking it from outside (measured on 2 cores: GPT-2 training steps ~3%
    // faster). RAYON_NUM_THREADS sets the thread count as usual.
    let pool = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build();
    let result = match pool {
        Err(e) => Err(anyhow::anyhow!("could not start the worker threads: {e}")),
        Ok(pool) => pool.install(|| match cli.command {
            Some(Command::Prepare(args)) => prepare::run(args),
            Some(Command::Eval(args)) => eval::run(args),
            Some(Command::Generate(args)) => generate::run(args),
            None if demo => demo::run(),
            None => run::run(cli.train),
        }),
    };
    if let Err(err) = result {
        // One clear line (with its causes), non-zero exit.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
