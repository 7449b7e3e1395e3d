//! Criterion benches of the fused kernels at GPT-2 124M (B 8, T 1024, C 768, 12 heads, vocab
//! 50257) and BERT-base (B 32, T 128, C 768, 12 heads, vocab 30522, MLM on 15% of the tokens)
//! shapes, in bf16. Each iteration is timed with CUDA events (`iter_custom`), and criterion's
//! throughput is the bytes moved (memory-bound kernels) or the FLOPs (attention) of one call,
//! so its rates read as B/s or FLOP/s against the GPU's roofline (H100 SXM: ~3.35 TB/s HBM3,
//! ~990 TFLOP/s dense bf16).
//!
//!     cargo bench -p lmtrain-cuda --bench cuda_fused [-- <filter>]
//!
//! Needs a GPU: without one (or on the emulator) it prints SKIP and exits 0.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use lmtrain_backend::{AdamWHyper, AttnShape, DecaySegment, Dropout};
use lmtrain_cuda::{AttnOptions, ClassifierRows, CudaDevice, DeviceKind, EmbeddingBatch, Positions, Result};

/// One model's shapes.
struct Shapes {
    name: &'static str,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    vocab: usize,
    n_pos: usize,
    causal: bool,
    /// Fraction of tokens with a label (MLM) — the classifier's selected rows.
    labelled: f64,
    params: usize,
}

const GPT2: Shapes = Shapes {
    name: "gpt2-124M",
    b: 8,
    t: 1024,
    c: 768,
    nh: 12,
    vocab: 50257,
    n_pos: 1024,
    causal: true,
    labelled: 1.0,
    params: 124_439_808,
};
const BERT: Shapes = Shapes {
    name: "bert-base",
    b: 32,
    t: 128,
    c: 768,
    nh: 12,
    vocab: 30522,
    n_pos: 512,
    causal: false,
    labelled: 0.15,
    params: 109_482_240,
};

/// Mean time of `iters` calls of `f`, measured with CUDA events around the whole batch.
fn time_gpu(dev: &CudaDevice, iters: u64, mut f: impl FnMut() -> Result<()>) -> Duration {
    let ctx = dev.context();
    let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("CUDA event");
    let (start, end) = (ev(), ev());
    start.record(dev.stream()).expect("record");
    for _ in 0..iters {
        f().expect("kernel launch");
    }
    end.record(dev.stream()).expect("record");
    end.synchronize().expect("synchronize");
    Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).expect("elapsed")) * 1e-3)
}

fn bench_model(c: &mut Criterion, dev: &CudaDevice, s: &Shapes) -> Result<()> {
    let (b, t, ch, nh) = (s.b, s.t, s.c, s.nh);
    let n = b * t;
    let e = size_of::<bf16>();
    let mut g = c.benchmark_group(s.name);
    g.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(10);

    // attention forward + backward (flash), head size 64
    let shape = AttnShape { b, t, n_head: nh, head_size: ch / nh };
    let qkv = dev.zeros::<bf16>(n * 3 * ch)?;
    let (mut out, mut lse) = (dev.zeros::<bf16>(n * ch)?, dev.zeros::<f32>(b * nh * t)?);
    let (mut dqkv, mut scratch) = (dev.zeros::<bf16>(n * 3 * ch)?, dev.zeros::<f32>(b * nh * t)?);
    let dout = dev.zeros::<bf16>(n * ch)?;
    let kv = dev.upload(&vec![1u8; n])?;
    let kv_view = kv.as_view();
    let opt = AttnOptions { causal: s.causal, key_valid: (!s.causal).then_some(&kv_view), dropout: Dropout::NONE };
    let causal_half = if s.causal { 0.5 } else { 1.0 };
    let attn_flops = 4.0 * (b * nh * t * t * (ch / nh)) as f64 * causal_half;
    g.throughput(Throughput::Elements(attn_flops as u64));
    g.bench_function("attention_fwd_bf16 (FLOP)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || dev.attention_forward(&mut out.as_view_mut(), &mut lse.as_view_mut(), &qkv.as_view(), shape, opt))
        })
    });
    // backward: dV, dK, dQ plus the S and dP' recomputed in both kernels (10 vs the forward's 4)
    g.throughput(Throughput::Elements((attn_flops * 2.5) as u64));
    g.bench_function("attention_bwd_bf16 (FLOP)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.attention_backward(
                    &mut dqkv.as_view_mut(),
                    &mut scratch.as_view_mut(),
                    &dout.as_view(),
                    &qkv.as_view(),
                    &out.as_view(),
                    &lse.as_view(),
                    shape,
                    opt,
                )
            })
        })
    });

    // fused classifier over the labelled rows
    let sel_n = ((n as f64 * s.labelled) as usize).max(1);
    let rows: Vec<u32> = (0..sel_n as u32).collect();
    let targets: Vec<i32> = (0..sel_n).map(|i| (i * 7 % s.vocab) as i32).collect();
    let sel = ClassifierRows::new(dev, &rows, &targets, sel_n, s.vocab)?;
    let mut logits = dev.zeros::<bf16>(sel_n * s.vocab)?;
    let (mut losses, mut total) = (dev.zeros::<f32>(sel_n)?, dev.zeros::<f64>(1)?);
    g.throughput(Throughput::Bytes((3 * sel_n * s.vocab * e) as u64));
    g.bench_function("classifier_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.classifier(
                    &mut logits.as_view_mut(),
                    &mut losses.as_view_mut(),
                    &mut total.as_view_mut(),
                    &sel,
                    Some(1.0 / sel_n as f32),
                )
            })
        })
    });

    // residual + LayerNorm forward, LayerNorm backward
    let (a, bb, w, bias) = (dev.zeros::<bf16>(n * ch)?, dev.zeros::<bf16>(n * ch)?, dev.zeros::<bf16>(ch)?, dev.zeros::<bf16>(ch)?);
    let (mut res, mut y) = (dev.zeros::<bf16>(n * ch)?, dev.zeros::<bf16>(n * ch)?);
    let (mut mean, mut rstd) = (dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?);
    g.throughput(Throughput::Bytes((4 * n * ch * e) as u64));
    g.bench_function("residual_layernorm_fwd_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.residual_layernorm_forward(
                    &mut res.as_view_mut(),
                    &mut y.as_view_mut(),
                    &mut mean.as_view_mut(),
                    &mut rstd.as_view_mut(),
                    &a.as_view(),
                    &bb.as_view(),
                    &w.as_view(),
                    &bias.as_view(),
                    n,
                    ch,
                    1e-5,
                )
            })
        })
    });
    let (mut dinp, mut dw, mut db) = (dev.zeros::<bf16>(n * ch)?, dev.zeros::<f32>(ch)?, dev.zeros::<f32>(ch)?);
    let mut lscratch = dev.zeros::<f32>(lmtrain_cuda::layernorm_backward_scratch(n, ch))?;
    g.throughput(Throughput::Bytes((4 * n * ch * e) as u64));
    g.bench_function("layernorm_bwd_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.layernorm_backward(
                    &mut dinp.as_view_mut(),
                    &mut dw.as_view_mut(),
                    &mut db.as_view_mut(),
                    &mut lscratch.as_view_mut(),
                    &y.as_view(),
                    &res.as_view(),
                    &w.as_view(),
                    &mean.as_view(),
                    &rstd.as_view(),
                    n,
                    ch,
                )
            })
        })
    });

    // bias gradient of the MLP's first layer (4C wide)
    let h = dev.zeros::<bf16>(n * 4 * ch)?;
    let mut dbias = dev.zeros::<f32>(4 * ch)?;
    let mut bscratch = dev.zeros::<f32>(lmtrain_cuda::bias_backward_scratch(n, 4 * ch))?;
    g.throughput(Throughput::Bytes((n * 4 * ch * e) as u64));
    g.bench_function("bias_backward_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || dev.bias_backward(&mut dbias.as_view_mut(), &mut bscratch.as_view_mut(), &h.as_view(), n, 4 * ch))
        })
    });

    // embeddings
    let ids: Vec<u32> = (0..n).map(|i| (i * 7919 % s.vocab) as u32).collect();
    let batch = EmbeddingBatch::new(dev, b, t, &ids, Positions::Offset(0), None, s.vocab, s.n_pos, 0)?;
    let (wte, wpe) = (dev.zeros::<bf16>(s.vocab * ch)?, dev.zeros::<bf16>(s.n_pos * ch)?);
    let (mut dwte, mut dwpe) = (dev.zeros::<f32>(s.vocab * ch)?, dev.zeros::<f32>(s.n_pos * ch)?);
    g.throughput(Throughput::Bytes((3 * n * ch * e) as u64));
    g.bench_function("embedding_fwd_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || dev.embedding_forward(&mut y.as_view_mut(), &batch, &wte.as_view(), Some(&wpe.as_view()), None))
        })
    });
    g.throughput(Throughput::Bytes((2 * n * ch * e + 2 * n * ch * 4) as u64));
    g.bench_function("embedding_bwd_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.embedding_backward(&mut dwte.as_view_mut(), Some(&mut dwpe.as_view_mut()), None, &y.as_view(), &batch)
            })
        })
    });

    // dropout on the residual stream
    g.throughput(Throughput::Bytes((2 * n * ch * e) as u64));
    g.bench_function("dropout_bf16 (bytes)", |it| {
        it.iter_custom(|iters| time_gpu(dev, iters, || dev.dropout_inplace(&mut y.as_view_mut(), Dropout { p: 0.1, seed: 1 })))
    });

    // gradient norm + AdamW with device-side clipping and stochastic rounding
    let p = s.params;
    let grads = dev.zeros::<bf16>(p)?;
    let mut norm = dev.zeros::<f32>(2)?;
    let mut nscratch = dev.zeros::<f64>(lmtrain_cuda::grad_norm_scratch(p))?;
    g.throughput(Throughput::Bytes((p * e) as u64));
    g.bench_function("grad_norm_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || dev.grad_norm(&mut norm.as_view_mut(), &mut nscratch.as_view_mut(), &grads.as_view(), 1.0))
        })
    });
    let (mut master, mut wb) = (dev.zeros::<f32>(p)?, dev.zeros::<bf16>(p)?);
    let (mut m, mut v) = (dev.zeros::<f32>(p)?, dev.zeros::<f32>(p)?);
    let segs = [DecaySegment { offset: 0, len: p, weight_decay: 0.1 }];
    let hp = AdamWHyper { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, grad_scale: 1.0 };
    g.throughput(Throughput::Bytes((28 * p) as u64));
    g.bench_function("adamw_bf16 (bytes)", |it| {
        it.iter_custom(|iters| {
            time_gpu(dev, iters, || {
                dev.adamw_update_bf16(
                    &mut master.as_view_mut(),
                    &mut wb.as_view_mut(),
                    &grads.as_view(),
                    &mut m.as_view_mut(),
                    &mut v.as_view_mut(),
                    Some(&norm.as_view()),
                    &segs,
                    &hp,
                    7,
                )
            })
        })
    });
    g.finish();
    Ok(())
}

fn main() {
    let dev = match CudaDevice::open(0) {
        Ok(d) if d.kind() == DeviceKind::Gpu => d,
        Ok(_) => {
            println!("SKIP cuda_fused bench: the emulator times nothing useful");
            return;
        }
        Err(e) => {
            println!("SKIP cuda_fused bench: {e}");
            return;
        }
    };
    println!("device: {}", dev.name());
    let mut c = Criterion::default().configure_from_args();
    for s in [&GPT2, &BERT] {
        if let Err(e) = bench_model(&mut c, &dev, s) {
            eprintln!("error: {}: {e}", s.name);
            std::process::exit(1);
        }
    }
    c.final_summary();
}
