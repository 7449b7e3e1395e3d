//! Process-CPU-time per call of the non-GEMM ops on the GPT-2 benchmark shapes.
//! `cargo run --release -p lmtrain-cpu --example op_times`

use lmtrain_backend::{AttnMask, AttnShape, Dropout, GeluKind};
use lmtrain_cpu::ops;

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn time(name: &str, reps: usize, mut f: impl FnMut()) {
    f();
    let t0 = cpu();
    let w0 = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    println!("{name:28} {:8.2} ms CPU  {:8.2} ms wall", (cpu() - t0) * 1e3 / reps as f64, w0.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn main() {
    let (bt, c, v, f) = (1024usize, 256usize, 50257usize, 1024usize);
    let mut logits: Vec<f32> = (0..bt * v).map(|i| ((i * 7919) % 1000) as f32 * 0.01).collect();
    let targets: Vec<i32> = (0..bt).map(|i| (i * 13 % v) as i32).collect();
    let orig = logits.clone();
    time("cross_entropy fwd+bwd", 5, || {
        logits.copy_from_slice(&orig);
        ops::cross_entropy(&mut logits, &targets, bt, v, Some(1.0 / 1024.0));
    });
    time("  (copy 206MB alone)", 5, || logits.copy_from_slice(&orig));
    let x: Vec<f32> = (0..bt * f).map(|i| ((i % 100) as f32 - 50.0) * 0.05).collect();
    let mut y = vec![0f32; bt * f];
    time("gelu fwd (1M)", 20, || ops::gelu_forward(&mut y, &x, GeluKind::Tanh));
    time("gelu bwd (1M)", 20, || ops::gelu_backward(&mut y, &x, &x, GeluKind::Tanh));
    let xc = &x[..bt * c];
    let (w, b) = (vec![1f32; c], vec![0f32; c]);
    let (mut o, mut m, mut r) = (vec![0f32; bt * c], vec![0f32; bt], vec![0f32; bt]);
    time("layernorm fwd", 50, || ops::layernorm_forward(&mut o, &mut m, &mut r, xc, &w, &b, bt, c, 1e-5));
    let (mut dw, mut db, mut dx) = (vec![0f32; c], vec![0f32; c], vec![0f32; bt * c]);
    time("layernorm bwd", 50, || ops::layernorm_backward(&mut dx, &mut dw, &mut db, xc, xc, &w, &m, &r, bt, c));
    let s = AttnShape { b: 8, t: 128, n_head: 4, head_size: 64 };
    let qkv: Vec<f32> = (0..bt * 3 * c).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let mut probs = vec![0f32; s.probs_len()];
    let mut att = vec![0f32; bt * c];
    let mask = AttnMask { causal: true, key_padding: None };
    time("attention fwd", 20, || ops::attention_forward(&mut att, &mut probs, &qkv, s, mask, Dropout::NONE));
    time("attention fwd (dropout)", 20, || ops::attention_forward(&mut att, &mut probs, &qkv, s, mask, Dropout { p: 0.1, seed: 1 }));
    let mut dqkv = vec![0f32; bt * 3 * c];
    time("attention bwd", 20, || ops::attention_backward(&mut dqkv, &att, &qkv, &probs, s, Dropout::NONE));
    time("attention bwd (dropout)", 20, || ops::attention_backward(&mut dqkv, &att, &qkv, &probs, s, Dropout { p: 0.1, seed: 1 }));
    let mut dwte = vec![0f32; v * c];
    let mut dwpe = vec![0f32; 128 * c];
    let ids: Vec<u32> = (0..bt as u32).map(|i| i * 31 % v as u32).collect();
    time("embedding bwd", 20, || ops::embedding_backward(&mut dwte, &mut dwpe, xc, &ids, 8, 128, c));
    time("bias bwd (F)", 50, || ops::bias_backward(&mut db[..], &x[..bt * c], bt, c));
    let mut d = x.clone();
    time("dropout (BT*C)", 50, || ops::dropout_inplace(&mut d[..bt * c], Dropout { p: 0.1, seed: 3 }));
}
