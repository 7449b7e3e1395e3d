//! Training throughput of GPT-2 on the CPU backend, with a per-op time breakdown.
//!
//! The benchmark config: n_layer 4, n_head 4, n_embd 256, vocab 50257, batch 8,
//! block 128, HF default dropout 0.1, one optimizer step (AdamW, clipping 1.0) per batch.
//! `benches/train_gpt2_pytorch.py` runs the same step in PyTorch; `benches/train_compare.py`
//! runs both and prints the table.
//!
//!     cargo bench --bench train_gpt2 -- [--steps N] [--warmup N] [--json]
//!
//! The breakdown runs the same model on a backend that wraps the CPU backend and times every
//! op call (so it includes the per-call overhead of timing, a few µs per op).

#[path = "support/mod.rs"]
mod support;

use lmtrain_cpu::Cpu;
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{Input, LanguageModel};
use support::{Timed, breakdown, median, new_opt, ops_json, parse_opts, print_breakdown, time_steps, train_step};

fn bench_config() -> Gpt2Config {
    Gpt2Config { vocab_size: 50257, n_positions: 128, n_layer: 4, n_head: 4, n_embd: 256, ..Gpt2Config::default() }
}

fn main() {
    // Run on a worker of the rayon pool, as the `train` binary does (ops then start from inside
    // the pool instead of waking it from outside).
    let pool = rayon::ThreadPoolBuilder::new().build().expect("rayon pool");
    pool.install(bench);
}

fn bench() {
    let o = parse_opts();
    let cfg = bench_config();
    let (b, t) = (8usize, 128usize);
    // Deterministic pseudo-random tokens.
    let ids: Vec<u32> = (0..b * t).map(|i| (lmtrain_backend::mix64(i as u64) % cfg.vocab_size as u64) as u32).collect();
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let input = Input { b, t, input_ids: &ids, labels: Some(&labels), attention_mask: None, token_type_ids: None };
    let threads = rayon::current_num_threads();

    // Throughput on the plain CPU backend.
    let mut model = Gpt2::new(Cpu, cfg.clone(), 0).unwrap();
    let mut opt = new_opt(&model);
    let times = time_steps(o.warmup, o.steps, |s| {
        train_step(&mut model, &mut opt, &input, s);
    });
    let med = median(&times);
    let tok_s = (b * t) as f64 / med;
    let tok_s_mean = (b * t * times.len()) as f64 / times.iter().sum::<f64>();
    eprintln!(
        "lmtrain (CPU backend, {threads} threads): {tok_s:.0} tokens/s (median step {:.1} ms over {} steps; mean {tok_s_mean:.0} tokens/s), {:.2}M parameters",
        med * 1e3,
        times.len(),
        model.num_params() as f64 / 1e6
    );

    // Per-op breakdown on the timed backend.
    let mut timed_model = Gpt2::new(Timed { inner: Cpu, vocab: cfg.vocab_size }, cfg.clone(), 0).unwrap();
    let mut opt = new_opt(&timed_model);
    let (total, rows) = breakdown(o.breakdown_steps, |s| {
        train_step(&mut timed_model, &mut opt, &input, s);
    });
    print_breakdown(total, &rows, o.breakdown_steps);

    if o.json {
        println!(
            "{{\"impl\":\"lmtrain-cpu\",\"threads\":{threads},\"steps\":{},\"step_ms_median\":{:.3},\"tokens_per_s\":{tok_s:.1},\"tokens_per_s_mean\":{tok_s_mean:.1},\"params\":{},\"ops\":{}}}",
            times.len(),
            med * 1e3,
            model.num_params(),
            ops_json(&rows)
        );
    }
}
