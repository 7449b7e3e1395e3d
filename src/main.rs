//! `train`: the lmtrain command line. Thin on purpose: it parses flags and hands
//! the work to the library crates; every error reaches the user as one line.

mod demo;
mod eval;
mod family;
mod fill_mask;
mod generate;
mod memory;
mod plot;
mod prepare;
mod run;
mod sample;
mod signals;

use clap::{CommandFactory, FromArgMatches, Subcommand};
use lmtrain_model::Objective;

/// lmtrain: train GPT-2 (causal LM) and BERT-family (masked LM) models from one binary.
///
/// With no subcommand, `train` trains a model. With no arguments at all it trains a
/// small GPT-2 on the corpus embedded in the binary, as a demonstration (`train --objective mlm`:
/// a small BERT with masked language modeling).
#[derive(clap::Parser)]
#[command(name = "train", version, args_conflicts_with_subcommands = true, args_override_self = true)]
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
    /// Fill in the mask tokens of a prompt with a masked-LM checkpoint (top-k with scores).
    FillMask(fill_mask::FillMaskArgs),
}

/// Parses the command line; a `--config FILE` of `train` becomes flags placed before the
/// command line's (so those win). Returns the parsed flags and which ones were set.
fn parse() -> anyhow::Result<(Cli, clap::ArgMatches)> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Cli::command().get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(path) = cli.command.is_none().then_some(()).and(cli.train.config.clone()) else {
        return Ok((cli, matches));
    };
    let file = run::config_file_flags(&path)?;
    // the file's flags alone first, so a bad key is reported against the file
    let bin = argv[0].clone();
    if let Err(e) = Cli::command().try_get_matches_from(std::iter::once(bin.clone()).chain(file.iter().cloned())) {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ");
        anyhow::bail!("{}: {first}", path.display());
    }
    let merged: Vec<std::ffi::OsString> = std::iter::once(bin).chain(file).chain(argv[1..].iter().cloned()).collect();
    let matches = Cli::command().get_matches_from(merged);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((cli, matches))
}

/// Rust starts programs with SIGPIPE ignored, so `train ... | head` would make every later
/// `println!` panic ("failed printing to stdout"); restoring the default makes `train` end quietly
/// when its reader goes away, as other Unix tools do.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    default_sigpipe();
    let (cli, matches) = match parse() {
        Ok(p) => p,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    };
    let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    // No arguments at all, or only `--objective`: the embedded demonstration.
    let demo = (cli.command.is_none() && cli.train.config.is_none() && matches.ids().all(|id| id == "objective" || !given(id.as_str())))
        .then(|| if cli.train.objective.as_deref() == Some("mlm") { Objective::MaskedLm } else { Objective::CausalLm });
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
            Some(Command::FillMask(args)) => fill_mask::run(args),
            None if demo.is_some() => demo::run(demo.expect("checked")),
            None => run::run(cli.train, &given),
        }),
    };
    if let Err(err) = result {
        // A run stopped by a signal has said where to resume; its status names the signal.
        if let Some(run::Interrupted(status)) = err.downcast_ref::<run::Interrupted>() {
            std::process::exit(*status);
        }
        // One clear line (with its causes), non-zero exit.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
