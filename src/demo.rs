//! `train` with no arguments (or only `--objective`): the end-to-end demonstration on the corpus
//! embedded in the binary (the King James Bible, public domain). It prepares the data (a small
//! tokenizer trained on the corpus, blocks of 128 tokens, 5 % held out), trains a small model on
//! the CPU for a few minutes, and shows validation perplexity before and after, a loss-curve PNG,
//! a checkpoint and the model in use. Everything lands in `./lmtrain-demo/`.
//!
//! - causal LM (the default): a GPT-2 on a byte-level BPE tokenizer, ending with a sample;
//! - `--objective mlm`: a BERT on a WordPiece tokenizer, 15% dynamic masking, evaluated on fixed
//!   masks, ending with a fill-mask example.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, BertConfig};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{LanguageModel, Objective};
use lmtrain_store::BlockStore;
use lmtrain_trainer::{CausalCollator, Collator, IntervalStrategy, Trainer, TrainingArgs};

use crate::sample::Decoding;

/// The corpus, gzip-compressed (1.3 MB), one verse per line.
static CORPUS_GZ: &[u8] = include_bytes!("../data/corpus/kjv.txt.gz");

/// Where the demo writes.
const DEMO_DIR: &str = "lmtrain-demo";
/// Vocabulary of the tokenizer trained on the corpus.
const VOCAB: usize = 4096;
/// Tokens per block (and the model's context).
const BLOCK: usize = 128;
/// Optimizer steps: sized for about three minutes on 2 cores.
const STEPS: u64 = 500;
/// Blocks per step.
const BATCH: usize = 16;

/// Runs the demonstration of `objective`.
pub fn run(objective: Objective) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let root = Path::new(DEMO_DIR);
    let (name, model_type) = match objective {
        Objective::CausalLm => ("gpt2", lmtrain_text::ModelType::Causal),
        Objective::MaskedLm => ("bert", lmtrain_text::ModelType::Masked),
    };
    let data_dir = root.join(if objective == Objective::CausalLm { "data".to_string() } else { format!("data-{name}") });
    let out_dir = root.join(if objective == Objective::CausalLm { "model".to_string() } else { format!("model-{name}") });
    // Start clean: both directories belong to the demo.
    for d in [&data_dir, &out_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    match objective {
        Objective::CausalLm => println!("lmtrain demo: a small GPT-2 trained on the King James Bible (embedded), on the CPU."),
        Objective::MaskedLm => {
            println!("lmtrain demo: a small BERT trained with masked language modeling on the King James Bible (embedded), on the CPU.")
        }
    }
    println!("(for your own data: `train prepare ...` then `train --data DIR ...`; see `train --help`)\n");

    // 1. Data: corpus -> tokenizer -> blocks.
    let corpus = root.join("kjv.txt.gz");
    std::fs::write(&corpus, CORPUS_GZ).with_context(|| format!("writing {}", corpus.display()))?;
    let mut opts = lmtrain_text::PrepareOptions::new(vec![corpus.clone()], data_dir.clone());
    opts.model_type = model_type;
    opts.vocab_size = VOCAB;
    opts.block_size = BLOCK;
    opts.validation_split = 0.05;
    opts.seed = 42;
    lmtrain_text::prepare(&opts).context("preparing the embedded corpus")?;
    let (train, eval, tokenizer_json) = crate::run::open_data(&data_dir)?;
    println!(
        "[1/4] data: {} training blocks and {} validation blocks of {BLOCK} tokens, tokenizer of {} tokens trained on the corpus ({:.1} s)",
        train.len(),
        eval.as_ref().map_or(0, |e| e.len()),
        train.header().vocab_size,
        t0.elapsed().as_secs_f64()
    );

    let mut args = TrainingArgs::new(&out_dir);
    args.learning_rate = 2e-3;
    args.weight_decay = 0.01;
    args.warmup_steps = STEPS / 20;
    args.lr_scheduler = lmtrain_optim::SchedulerKind::Cosine;
    args.max_steps = Some(STEPS);
    args.per_device_train_batch_size = BATCH;
    args.per_device_eval_batch_size = 32;
    args.logging_steps = 10;
    args.eval_strategy = IntervalStrategy::Steps;
    args.eval_steps = Some(STEPS / 4);
    args.save_strategy = IntervalStrategy::Steps;
    args.save_steps = STEPS / 2;
    args.save_total_limit = Some(1);

    // 2. Model: 4 layers of width 128, no dropout (the run is far from overfitting).
    let vocab_size = train.header().vocab_size as usize;
    match objective {
        Objective::CausalLm => {
            let eos = train.header().eos;
            let cfg = Gpt2Config {
                vocab_size,
                n_positions: BLOCK,
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                embd_pdrop: 0.0,
                attn_pdrop: 0.0,
                resid_pdrop: 0.0,
                bos_token_id: eos,
                eos_token_id: eos,
                ..Gpt2Config::default()
            };
            let model = Gpt2::new(Cpu, cfg, 42)?;
            let what = "GPT-2, 4 layers, 4 heads, width 128";
            train_and_report(args, model, Box::new(CausalCollator), train, eval, tokenizer_json, what, &out_dir)?;
            let (mut model, tokenizer) = crate::generate::load_model_and_tokenizer(Cpu, &out_dir)?;
            let prompt = "And God said";
            let decoding = Decoding::Sample { temperature: 0.8, top_k: 40, top_p: 1.0, seed: 42 };
            let text = crate::generate::continue_text(&mut model, &tokenizer, prompt, 80, decoding, false)?;
            println!("\nsample (temperature 0.8, top-k 40):\n{text}\n");
            println!(
                "total time {:.0} s. Next: `train generate --checkpoint {} --prompt \"In the beginning\"`",
                t0.elapsed().as_secs_f64(),
                out_dir.display()
            );
        }
        Objective::MaskedLm => {
            // Post-LN BERT wants a gentler peak than GPT-2's pre-LN blocks.
            args.learning_rate = 1e-3;
            let cfg = BertConfig {
                vocab_size,
                hidden_size: 128,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                intermediate_size: 512,
                max_position_embeddings: BLOCK,
                hidden_dropout_prob: 0.0,
                attention_probs_dropout_prob: 0.0,
                pad_token_id: train.header().pad,
                ..BertConfig::default()
            };
            let model = Bert::new(Cpu, cfg, 42)?;
            let collator = crate::run::masking_collator(&crate::run::MaskingArgs::default(), &train, args.seed)?;
            let what = "BERT, 4 layers, 4 heads, width 128, 15% of the tokens masked";
            train_and_report(args, model, Box::new(collator), train, eval, tokenizer_json, what, &out_dir)?;
            let mut model: Bert<Cpu> = lmtrain_hf::load_model(Cpu, &out_dir)?;
            let (tokenizer, _) = lmtrain_text::tok::load_tokenizer(&out_dir.join("tokenizer.json"))?;
            let prompt = "And God said, Let there be [MASK]: and there was light.";
            let (_, completions) = crate::fill_mask::fill_mask(&mut model, &tokenizer, prompt, 5)?;
            println!("\nfill-mask: {prompt}");
            for c in &completions[0] {
                println!("  {:.4}  {}", c.score, c.token_str);
            }
            println!(
                "\ntotal time {:.0} s. Next: `train fill-mask --checkpoint {} \"In the beginning God created the [MASK].\"`",
                t0.elapsed().as_secs_f64(),
                out_dir.display()
            );
        }
    }
    Ok(())
}

/// Trains `model` with validation perplexity before and after, logs the untrained model as step
/// 0 and draws the loss curve.
#[allow(clippy::too_many_arguments)]
fn train_and_report<M: LanguageModel<Cpu>>(
    args: TrainingArgs,
    model: M,
    collator: Box<dyn Collator>,
    train: BlockStore,
    eval: Option<BlockStore>,
    tokenizer_json: Vec<u8>,
    what: &str,
    out_dir: &Path,
) -> anyhow::Result<()> {
    let (steps, batch, lr) = (args.max_steps.unwrap_or(0), args.per_device_train_batch_size, args.learning_rate);
    let mut trainer = Trainer::new(args, model, collator, train, eval, tokenizer_json)?;
    println!("[2/4] model: {what}, context {BLOCK}, {:.2}M parameters", trainer.model().num_params() as f64 / 1e6);

    // 3. Train, with validation perplexity before and after.
    let before = trainer.evaluate()?.context("the demo data has a validation set")?;
    println!("      validation perplexity before training: {:.1} (loss {:.3})", before.perplexity, before.loss);
    // Logged as step 0, so the loss curve starts from the untrained model.
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    lmtrain_trainer::metrics::MetricsLog::open(out_dir, 0)?.write(&serde_json::json!({
        "step": 0, "epoch": 0.0, "eval_loss": before.loss, "perplexity": before.perplexity,
    }))?;
    println!("[3/4] training {steps} steps of {batch} x {BLOCK} tokens (cosine schedule, peak lr {lr:e})...");
    let outcome = trainer.train()?;
    let after = trainer.evaluate()?.context("the demo data has a validation set")?;
    println!(
        "      {} steps in {:.0} s, {:.0} tokens/s",
        outcome.global_step,
        outcome.seconds,
        outcome.tokens as f64 / outcome.seconds.max(1e-9)
    );
    println!(
        "      validation perplexity after training: {:.1} (loss {:.3}), down from {:.1}",
        after.perplexity, after.loss, before.perplexity
    );

    // 4. Artifacts.
    let png = out_dir.join("loss.png");
    crate::plot::plot_losses(&out_dir.join(lmtrain_trainer::metrics::METRICS_FILE), &png)?;
    println!("[4/4] checkpoint: {}", outcome.last_checkpoint.as_deref().unwrap_or(out_dir).display());
    println!("      final model (transformers loads it): {}", out_dir.display());
    println!("      loss curve: {}", png.display());
    println!("      metrics: {}", out_dir.join(lmtrain_trainer::metrics::METRICS_FILE).display());
    Ok(())
}
