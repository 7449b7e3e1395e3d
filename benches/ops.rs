//! Criterion micro-benchmarks of the CPU ops on the shapes of the GPT-2 training benchmark
//! (n_layer 4, n_head 4, n_embd 256, vocab 50257, batch 8 x block 128 = 1024 rows).
//! GEMM throughput is reported as elements/s where one element is one floating-point operation,
//! i.e. read "Gelem/s" as GFLOP/s.
//!
//! `cargo bench --bench ops` (about 2 minutes; `cargo bench --bench ops -- gemm` for GEMMs only)

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtrain_backend::{AttnMask, AttnShape, Dropout, GeluKind, GemmShape, HeadGrads};
use lmtrain_cpu::ops;

const BT: usize = 1024;
const C: usize = 256;
const F: usize = 1024;
const V: usize = 50257;

fn filled(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed) % 1009) as f32 - 504.0) * 2e-3).collect()
}

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    // (name, m, n, k, trans_a, trans_b): forward X·W, backward dX = dY·W^T and dW = X^T·dY
    let shapes = [
        ("qkv_fwd_1024x768x256", BT, 3 * C, C, false, false),
        ("fc_fwd_1024x1024x256", BT, F, C, false, false),
        ("fcproj_fwd_1024x256x1024", BT, C, F, false, false),
        ("fc_dx_1024x256x1024_tb", BT, C, F, false, true),
        ("fc_dw_256x1024x1024_ta", C, F, BT, true, false),
        ("lmhead_fwd_1024x50257x256_tb", BT, V, C, false, true),
        ("lmhead_dx_1024x256x50257", BT, C, V, false, false),
        ("lmhead_dw_50257x256x1024_ta", V, C, BT, true, false),
    ];
    for (name, m, n, k, trans_a, trans_b) in shapes {
        let a = filled(m * k, 1);
        let b = filled(k * n, 2);
        let mut out = vec![0f32; m * n];
        let s = GemmShape { m, n, k, trans_a, trans_b, accumulate: false };
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        g.bench_function(name, |bench| bench.iter(|| ops::matmul(&mut out, &a, &b, s)));
    }
    g.finish();
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));

    let logits = filled(BT * V, 3);
    let targets: Vec<i32> = (0..BT).map(|i| ((i * 13) % V) as i32).collect();
    let mut work = logits.clone();
    g.throughput(Throughput::Elements((BT * V) as u64));
    g.bench_function("cross_entropy_fwd_bwd_1024x50257", |bench| {
        bench.iter(|| {
            // restoring the logits is part of the measured time (a 206 MB copy)
            work.copy_from_slice(&logits);
            ops::cross_entropy(&mut work, &targets, BT, V, Some(1.0 / BT as f32))
        })
    });

    // the fused tied head: forward (one product) and forward + backward (three products);
    // throughput counts the products' floating-point operations
    let xh = filled(BT * C, 7);
    let wte = filled(V * C, 8);
    let mut scratch = vec![0f32; BT * V];
    let (mut dx, mut dwte) = (vec![0f32; BT * C], vec![0f32; V * C]);
    g.throughput(Throughput::Elements(2 * (BT * V * C) as u64));
    g.bench_function("lm_head_loss_fwd_1024x50257x256", |bench| {
        bench.iter(|| ops::lm_head_loss(&mut scratch, &xh, &wte, None, &targets, BT, V, C, None))
    });
    g.throughput(Throughput::Elements(6 * (BT * V * C) as u64));
    g.bench_function("lm_head_loss_fwd_bwd_1024x50257x256", |bench| {
        bench.iter(|| {
            ops::lm_head_loss(
                &mut scratch,
                &xh,
                &wte,
                None,
                &targets,
                BT,
                V,
                C,
                Some(HeadGrads { dx: &mut dx, dwte: &mut dwte, dbias: None, dloss: 1.0 / BT as f32 }),
            )
        })
    });

    let x = filled(BT * C, 4);
    let (w, b) = (filled(C, 5), filled(C, 6));
    let (mut out, mut mean, mut rstd) = (vec![0f32; BT * C], vec![0f32; BT], vec![0f32; BT]);
    g.throughput(Throughput::Elements((BT * C) as u64));
    g.bench_function("layernorm_fwd_1024x256", |bench| {
        bench.iter(|| ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, BT, C, 1e-5))
    });
    let (mut dx, mut dw, mut db) = (vec![0f32; BT * C], vec![0f32; C], vec![0f32; C]);
    g.bench_function("layernorm_bwd_1024x256", |bench| {
        bench.iter(|| ops::layernorm_backward(&mut dx, &mut dw, &mut db, &x, &x, &w, &mean, &rstd, BT, C))
    });

    let h = filled(BT * F, 7);
    let mut hout = vec![0f32; BT * F];
    g.throughput(Throughput::Elements((BT * F) as u64));
    g.bench_function("gelu_tanh_fwd_1024x1024", |bench| bench.iter(|| ops::gelu_forward(&mut hout, &h, GeluKind::Tanh)));
    g.bench_function("gelu_tanh_bwd_1024x1024", |bench| bench.iter(|| ops::gelu_backward(&mut hout, &h, &h, GeluKind::Tanh)));

    let s = AttnShape { b: 8, t: 128, n_head: 4, head_size: 64 };
    let qkv = filled(BT * 3 * C, 8);
    let mut att = vec![0f32; BT * C];
    let mut probs = vec![0f32; s.probs_len()];
    let mut dqkv = vec![0f32; BT * 3 * C];
    let mask = AttnMask { causal: true, key_padding: None };
    // 4 products of [128 x 128 x 64] per (batch, head) counted as in a dense kernel
    g.throughput(Throughput::Elements((8 * 4 * 2 * 2 * 128 * 128 * 64) as u64));
    g.bench_function("attention_fwd_b8_h4_t128_d64", |bench| {
        bench.iter(|| ops::attention_forward(&mut att, &mut probs, &qkv, s, mask, Dropout::NONE))
    });
    g.bench_function("attention_bwd_b8_h4_t128_d64", |bench| {
        bench.iter(|| ops::attention_backward(&mut dqkv, &att, &qkv, &probs, s, Dropout::NONE))
    });
    g.finish();
}

criterion_group!(benches, gemm, layers);
criterion_main!(benches);
