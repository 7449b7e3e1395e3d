//! Times `forward_backward` (plus an AdamW update) on the benchmark shape:
//! GPT-2 with n_layer 4, n_head 4, n_embd 256, vocab 50257, batch 8, block 128.
//!
//! `cargo run --release -p lmtrain-model --example gpt2_step [steps]`

use std::time::Instant;

use lmtrain_backend::{AdamWHyper, DecaySegment};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let cfg = Gpt2Config { n_layer: 4, n_head: 4, n_embd: 256, n_positions: 128, ..Gpt2Config::default() };
    let (b, t) = (8, 128);
    let mut model = Gpt2::new(cfg, 0);
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919) % 50257).collect();
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let n = model.params().len();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let segs = [DecaySegment { offset: 0, len: n, weight_decay: 0.0 }];
    let mut best = f64::MAX;
    for step in 0..steps {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        model.zero_grad();
        let loss = model.forward_backward(&ids, &labels, b, t, Some(step as u64));
        let t1 = Instant::now();
        let (p, g) = model.params_and_grads_mut();
        let hp = AdamWHyper { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: step as u32 + 1, grad_scale: 1.0 };
        lmtrain_cpu::ops::adamw_update(p, g, &mut m, &mut v, &segs, &hp);
        let dt = t0.elapsed().as_secs_f64();
        best = best.min(dt);
        println!(
            "step {step}: loss {loss:.4}  fwd+bwd {:.3}s  adamw {:.3}s  {:.0} tok/s  (process CPU {:.2}s)",
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
            (b * t) as f64 / dt,
            cpu_seconds() - c0
        );
    }
    println!("best: {:.3}s/step = {:.0} tokens/s", best, (b * t) as f64 / best);
}

/// Process CPU time (user + system) from /proc/self/stat: on a shared machine, CPU seconds per
/// step are a steadier measure than wall time.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}
