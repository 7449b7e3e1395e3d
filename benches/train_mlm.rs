//! Training throughput of a masked LM on the CPU backend, with a per-op time breakdown.
//!
//! The issues' benchmark configs: 4 layers, hidden 256, 4 heads, intermediate 1024, batch 8,
//! block 128, HF default dropout 0.1; `--family bert` (vocab 30522) or `--family deberta`
//! (DeBERTa-v3's attention: relative positions, c2p + p2c, 256 buckets, shared keys; vocab
//! 128100); 15% of the tokens chosen (80% `[MASK]`, 10%
//! random, 10% kept), one optimizer step (AdamW, clipping 1.0) per batch. It times the MLM head
//! on the labelled rows only (lmtrain's way), then the same step with the head's transform and
//! vocabulary products on all 1,024 positions, which is what Hugging Face computes (there every
//! position is given a label so that no row can be skipped: the FLOPs of HF's step), to show the
//! saving. `benches/train_mlm_pytorch.py` runs the same step in PyTorch;
//! `benches/train_compare.py --model bert|deberta` runs both and prints the table.
//!
//!     cargo bench --bench train_mlm -- [--family bert|deberta] [--steps N] [--warmup N] [--json]

#[path = "support/mod.rs"]
mod support;

use lmtrain_backend::{Backend, Rows, mix64};
use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, BertConfig};
use lmtrain_model::deberta::{Deberta, DebertaV2Config};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel, ModelConfig};
use support::{Opts, Timed, breakdown, median, new_opt, ops_json, parse_opts, print_breakdown, time_steps, train_step};

/// A `[MASK]` id (any id works for timing; bert-base-uncased's).
const MASK_ID: u32 = 103;

/// The masked-LM families of the benchmark.
trait MlmFamily<B: Backend>: LanguageModel<B> {
    fn head_rows(&mut self, rows: Rows);
}

impl<B: Backend> MlmFamily<B> for Bert<B> {
    fn head_rows(&mut self, rows: Rows) {
        self.set_head_rows(rows);
    }
}

impl<B: Backend> MlmFamily<B> for Deberta<B> {
    fn head_rows(&mut self, rows: Rows) {
        self.set_head_rows(rows);
    }
}

/// Random tokens, masked as `DataCollatorForLanguageModeling` does (deterministically); also
/// the labels of every position.
fn masked_batch(b: usize, t: usize, vocab: u32) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let original: Vec<u32> = (0..b * t).map(|i| 1000 + (mix64(i as u64) % (vocab as u64 - 1000)) as u32).collect();
    let mut ids = original.clone();
    let mut labels = vec![IGNORE_INDEX; b * t];
    for i in 0..b * t {
        let r = mix64(0x6d61_736b ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if r % 1000 < 150 {
            labels[i] = original[i] as i32;
            ids[i] = match (r >> 20) % 10 {
                0..=7 => MASK_ID,
                8 => 1000 + ((r >> 40) % (vocab as u64 - 1000)) as u32,
                _ => original[i],
            };
        }
    }
    let every = original.iter().map(|&x| x as i32).collect();
    (ids, labels, every)
}

fn main() {
    // Run on a worker of the rayon pool, as the `train` binary does.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("rayon pool");
    pool.install(|| {
        let o = parse_opts();
        match o.family.as_str() {
            "bert" => {
                let cfg = BertConfig {
                    vocab_size: 30522,
                    hidden_size: 256,
                    num_hidden_layers: 4,
                    num_attention_heads: 4,
                    intermediate_size: 1024,
                    max_position_embeddings: 128,
                    ..BertConfig::default()
                };
                bench::<Bert<Cpu>, Bert<Timed>>(&o, cfg)
            }
            "deberta" => {
                let cfg = DebertaV2Config {
                    vocab_size: 128100,
                    hidden_size: 256,
                    num_hidden_layers: 4,
                    num_attention_heads: 4,
                    intermediate_size: 1024,
                    ..DebertaV2Config::v3()
                };
                bench::<Deberta<Cpu>, Deberta<Timed>>(&o, cfg)
            }
            other => panic!("unknown --family {other} (bert or deberta)"),
        }
    });
}

fn bench<M: MlmFamily<Cpu>, T: MlmFamily<Timed, Config = M::Config>>(o: &Opts, cfg: M::Config) {
    let (b, t) = (8usize, 128usize);
    let (ids, labels, every) = masked_batch(b, t, cfg.vocab_size() as u32);
    let n_labels = labels.iter().filter(|&&y| y != IGNORE_INDEX).count();
    let input = Input { b, t, input_ids: &ids, labels: Some(&labels), attention_mask: None, token_type_ids: None };
    let all_positions = Input { labels: Some(&every), ..input };
    let threads = rayon::current_num_threads();

    // Throughput on the plain CPU backend, the head on the labelled rows, then on every row.
    let mut results = Vec::new();
    for (rows, input) in [(Rows::Labelled, &input), (Rows::All, &all_positions)] {
        let mut model = M::new(Cpu, cfg.clone(), 0).unwrap();
        model.head_rows(rows);
        let mut opt = new_opt(&model);
        let times = time_steps(o.warmup, o.steps, |s| {
            train_step(&mut model, &mut opt, input, s);
        });
        let med = median(&times);
        let tok_s = (b * t) as f64 / med;
        eprintln!(
            "lmtrain (CPU backend, {threads} threads, MLM head on {}): {tok_s:.0} tokens/s (median step {:.1} ms over {} steps), {:.2}M parameters",
            if rows == Rows::Labelled { format!("the {n_labels} labelled rows") } else { format!("all {} rows, as Hugging Face", b * t) },
            med * 1e3,
            times.len(),
            model.num_params() as f64 / 1e6
        );
        results.push((med, tok_s, model.num_params()));
    }

    // Per-op breakdown on the timed backend (labelled rows).
    let mut timed_model = T::new(Timed { inner: Cpu, vocab: cfg.vocab_size() }, cfg.clone(), 0).unwrap();
    let mut opt = new_opt(&timed_model);
    let (total, rows) = breakdown(o.breakdown_steps, |s| {
        train_step(&mut timed_model, &mut opt, &input, s);
    });
    print_breakdown(total, &rows, o.breakdown_steps);

    if o.json {
        let (med, tok_s, params) = results[0];
        let (all_med, all_tok_s, _) = results[1];
        println!(
            "{{\"impl\":\"lmtrain-cpu\",\"family\":\"{}\",\"threads\":{threads},\"steps\":{},\"labels\":{n_labels},\"step_ms_median\":{:.3},\"tokens_per_s\":{tok_s:.1},\"all_rows_step_ms_median\":{:.3},\"all_rows_tokens_per_s\":{all_tok_s:.1},\"params\":{params},\"ops\":{}}}",
            o.family,
            o.steps,
            med * 1e3,
            all_med * 1e3,
            ops_json(&rows)
        );
    }
}
