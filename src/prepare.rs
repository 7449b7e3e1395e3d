//! `train prepare`: corpus -> tokenizer -> block store.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmtrain_text::{CorpusFormat, ModelType, Phase, PrepareOptions, PrepareSummary, ReadOptions, TxtDocuments};

/// Long help of `train prepare` (main.rs attaches it to the subcommand).
pub const LONG_ABOUT: &str = "\
Tokenize a text corpus and cut it into fixed-size blocks of token ids, written as a
memory-mapped block store that `train` reads.

Writes OUTPUT_DIR/train.bin, OUTPUT_DIR/validation.bin (when a validation set is asked
for) and OUTPUT_DIR/tokenizer.json. Files are written under temporary names and moved
into place only when everything succeeded.

Documents: in .txt files every non-blank line is a document (--paragraphs: blank-line
separated paragraphs); .jsonl: one JSON object per line, text in --text-field; .csv:
header row, text in --text-column; .parquet: text in --text-column (only that column
is read). Any of .txt/.jsonl/.csv may be gzip-compressed (.gz). Directories are read
recursively, files in name order.

Causal LM (--model-type causal): the end-of-text token (GPT-2's <|endoftext|>) is
appended after every document, then the documents are concatenated and cut into
blocks. Masked LM (--model-type masked): each document is wrapped in [CLS] ... [SEP] by
the tokenizer. The last incomplete block is dropped.

--line-by-line (Hugging Face run_mlm.py's option): every document (every non-blank line of
a .txt file) is one sequence of its own, truncated to --block-size and padded, with its
length stored so that training masks the padding (a version 2 store).

Limits: documents longer than 1 MiB are cut into pieces (counted in the summary); a JSON
Lines line or CSV record may be at most 64 MiB; ZIP (.docx, .xlsx, .epub), PDF and other
binary files and devices are refused; JSON Lines / CSV / Parquet records whose text is null
or blank are skipped and counted. Temporary files left by a killed earlier run in
OUTPUT_DIR are removed.

Example:
  train prepare corpus.txt.gz --tokenizer gpt2.tokenizer.json \\
      --validation-split 0.05 --output-dir data/kjv";

/// Flags of `train prepare`.
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// Corpus files or directories (read recursively): .txt (one document per non-blank
    /// line), .jsonl, .csv, .parquet; .txt/.jsonl/.csv may be gzip-compressed (.gz).
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,

    /// Directory for train.bin, validation.bin and tokenizer.json (created if missing).
    #[arg(short, long, value_name = "DIR")]
    output_dir: PathBuf,

    /// Hugging Face tokenizer.json to use. Without it a tokenizer is trained on the
    /// training documents (byte-level BPE for causal, WordPiece for masked) and saved.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,

    /// Vocabulary size of a trained tokenizer, 300 to 1048576 (ignored with --tokenizer).
    #[arg(long, default_value_t = 8192, value_name = "N")]
    vocab_size: usize,

    /// causal (GPT-2: EOS between documents) or masked (BERT: [CLS] ... [SEP] per document).
    #[arg(long, value_enum, default_value_t = ModelKind::Causal)]
    model_type: ModelKind,

    /// Tokens per block, 1 to 1048576; the remainder at the end is dropped.
    #[arg(long, default_value_t = 128, value_name = "N")]
    block_size: usize,

    /// One sequence per document (per non-blank line of a .txt file), truncated to the
    /// block size and padded, instead of concatenating documents and cutting blocks.
    #[arg(long)]
    line_by_line: bool,

    /// Separate validation corpus (repeatable); same formats as INPUT.
    #[arg(long, value_name = "PATH", conflicts_with = "validation_split")]
    validation_file: Vec<PathBuf>,

    /// Fraction of documents held out for validation, e.g. 0.05 (chosen by --seed).
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    validation_split: f64,

    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Keep only the first N training blocks (stops reading once they are written).
    #[arg(long, value_name = "N")]
    max_train_blocks: Option<u64>,

    /// Read every input as this format instead of deciding by extension.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,

    /// In .txt files, a document is a blank-line-separated paragraph, not a line.
    #[arg(long)]
    paragraphs: bool,

    /// JSON Lines field holding the text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    text_field: String,

    /// CSV / Parquet column holding the text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    text_column: String,

    /// Skip documents that are not valid UTF-8 (and report how many) instead of failing.
    #[arg(long)]
    skip_invalid: bool,

    /// Token appended after each document for causal LM (default: found in the tokenizer,
    /// e.g. <|endoftext|> or </s>).
    #[arg(long, value_name = "TOKEN")]
    eos_token: Option<String>,

    /// Replace a store in OUTPUT_DIR even if it was made with another tokenizer or block size.
    #[arg(long)]
    overwrite: bool,

    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelKind {
    /// GPT-2 style causal language model.
    #[value(alias = "gpt2")]
    Causal,
    /// BERT style masked language model.
    #[value(alias = "bert")]
    Masked,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Txt,
    Jsonl,
    Csv,
    Parquet,
}

/// Runs `train prepare`.
pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    let mut opts = PrepareOptions::new(args.inputs, args.output_dir);
    opts.read = ReadOptions {
        format: args.format.map(|f| match f {
            FormatArg::Txt => CorpusFormat::Txt,
            FormatArg::Jsonl => CorpusFormat::Jsonl,
            FormatArg::Csv => CorpusFormat::Csv,
            FormatArg::Parquet => CorpusFormat::Parquet,
        }),
        txt_documents: if args.paragraphs { TxtDocuments::Paragraphs } else { TxtDocuments::Lines },
        text_field: args.text_field,
        text_column: args.text_column,
        skip_invalid: args.skip_invalid,
    };
    opts.tokenizer = args.tokenizer;
    opts.vocab_size = args.vocab_size;
    opts.model_type = match args.model_type {
        ModelKind::Causal => ModelType::Causal,
        ModelKind::Masked => ModelType::Masked,
    };
    opts.block_size = args.block_size;
    opts.validation_files = args.validation_file;
    opts.validation_split = args.validation_split;
    opts.seed = args.seed;
    opts.max_train_blocks = args.max_train_blocks;
    opts.overwrite = args.overwrite;
    opts.eos_token = args.eos_token;
    opts.line_by_line = args.line_by_line;

    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()) };
    bar.set_style(
        ProgressStyle::with_template("{msg:18} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {prefix}")
            .expect("valid progress template"),
    );
    bar.set_message("starting");
    bar.enable_steady_tick(Duration::from_millis(250));
    let summary = lmtrain_text::prepare_with_progress(&opts, &|p| {
        bar.set_message(match p.phase {
            Phase::TrainingTokenizer => "training tokenizer",
            Phase::Train => "tokenizing",
            Phase::Validation => "tokenizing (valid.)",
        });
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        if p.tokens > 0 {
            bar.set_prefix(format!("{} tokens", p.tokens));
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    print_summary(&summary);
    Ok(())
}

fn print_summary(s: &PrepareSummary) {
    let line = |name: &str, x: &lmtrain_text::SplitSummary| {
        let padding = if x.padding_tokens > 0 { format!(", {} padding", x.padding_tokens) } else { String::new() };
        println!(
            "{name:<10} {:>10} documents {:>12} tokens {:>9} blocks ({} tokens dropped{padding}) -> {}",
            x.documents,
            x.tokens,
            x.blocks,
            x.dropped_tokens,
            x.path.display()
        );
    };
    line("train", &s.train);
    if let Some(v) = &s.validation {
        line("validation", v);
    }
    if s.skipped_invalid > 0 {
        println!("skipped    {} documents with invalid UTF-8", s.skipped_invalid);
    }
    if s.skipped_empty > 0 {
        println!("skipped    {} records whose text is null or blank", s.skipped_empty);
    }
    if s.split_documents > 0 {
        println!(
            "split      {} documents longer than {} bytes into {} pieces",
            s.split_documents,
            lmtrain_text::MAX_PIECE_BYTES,
            s.split_pieces
        );
    }
    if !s.removed_temp_files.is_empty() {
        println!("removed    {} stale temporary files of an interrupted earlier run", s.removed_temp_files.len());
    }
    let how = if s.tokenizer_trained { format!("trained in {:.1} s", s.tokenizer_seconds) } else { "copied".into() };
    println!(
        "tokenizer  vocabulary {}, fingerprint {:016x}, {how} -> {}",
        s.vocab_size,
        s.tokenizer_fingerprint,
        s.tokenizer_path.display()
    );
    println!("throughput {:.0} tokens/s ({:.2} s reading, tokenizing and writing)", s.tokens_per_second(), s.tokenize_seconds);
}
