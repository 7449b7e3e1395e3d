//! GFLOP/s of `lmtrain_cpu::ops::matmul` on the GPT-2 benchmark shapes (quick look; the
//! criterion version is `cargo bench --bench ops`).
//!
//! `cargo run --release -p lmtrain-cpu --example gemm_shapes`

use std::time::Instant;

use lmtrain_backend::GemmShape;

fn main() {
    if std::env::var("CHUNKED").is_ok() {
        chunked();
        return;
    }
    let shapes = [
        ("qkv fwd", 1024, 768, 256, false, false),
        ("fc fwd", 1024, 1024, 256, false, false),
        ("fc_proj fwd", 1024, 256, 1024, false, false),
        ("fc dW", 256, 1024, 1024, true, false),
        ("fc dX", 1024, 256, 1024, false, true),
        ("logits fwd", 1024, 50257, 256, false, true),
        ("lm_head dX", 1024, 256, 50257, false, false),
        ("lm_head dW", 50257, 256, 1024, true, false),
    ];
    for (name, m, n, k, ta, tb) in shapes {
        let a = vec![0.01f32; m * k];
        let b = vec![0.02f32; k * n];
        let mut c = vec![0f32; m * n];
        let s = GemmShape { m, n, k, trans_a: ta, trans_b: tb, accumulate: true };
        lmtrain_cpu::ops::matmul(&mut c, &a, &b, s);
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil() as usize + 1;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t0 = Instant::now();
            lmtrain_cpu::ops::matmul(&mut c, &a, &b, s);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("{name:12} {m:>6}x{n:<6}x{k:<6} ta={ta:<5} tb={tb:<5} {:7.1} GFLOP/s  {:8.2} ms", 2.0 * (m * n * k) as f64 / best / 1e9, best * 1e3);
    }
}

#[allow(dead_code)]
fn chunked() {
    let (bt, c, v) = (1024usize, 256usize, 50257usize);
    let x = vec![0.01f32; bt * c];
    let wte = vec![0.02f32; v * c];
    let mut logits = vec![0f32; bt * v];
    let mut dx = vec![0f32; bt * c];
    let mut dw = vec![0f32; v * c];
    for vc in [512usize, 1024, 50257] {
        let (mut f, mut dxt, mut dwt) = (0.0, 0.0, 0.0);
        for _ in 0..3 {
            let t0 = cpu();
            let mut off = 0;
            while off < v {
                let len = vc.min(v - off);
                let s = GemmShape { m: bt, n: len, k: c, trans_a: false, trans_b: true, accumulate: false };
                lmtrain_cpu::ops::matmul(&mut logits[off * bt..(off + len) * bt], &x, &wte[off * c..], s);
                off += len;
            }
            let t1 = cpu();
            let mut off = 0;
            while off < v {
                let len = vc.min(v - off);
                let s = GemmShape { m: bt, n: c, k: len, trans_a: false, trans_b: false, accumulate: off > 0 };
                lmtrain_cpu::ops::matmul(&mut dx, &logits[off * bt..(off + len) * bt], &wte[off * c..], s);
                off += len;
            }
            let t2 = cpu();
            let mut off = 0;
            while off < v {
                let len = vc.min(v - off);
                let s = GemmShape { m: len, n: c, k: bt, trans_a: true, trans_b: false, accumulate: true };
                lmtrain_cpu::ops::matmul(&mut dw[off * c..(off + len) * c], &logits[off * bt..(off + len) * bt], &x, s);
                off += len;
            }
            let t3 = cpu();
            f += t1 - t0;
            dxt += t2 - t1;
            dwt += t3 - t2;
        }
        let fl = 3.0 * 2.0 * (bt * c * v) as f64 / 1e9;
        println!("chunk {vc:5}: fwd {:.1} dX {:.1} dW {:.1} GFLOP per CPU-second", fl / f, fl / dxt, fl / dwt);
    }
}

/// Process CPU time (user + system) in seconds, from /proc/self/stat (10 ms ticks).
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}
