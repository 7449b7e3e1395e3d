//! Whole training steps of real models on `lmtrain_cuda::CudaBackend` against the same models on
//! the CPU backend, from the same parameters: a tiny GPT-2 (causal, dropout on), a tiny BERT
//! (padding inside the batch, the padding id also at a real position, token types, -100 labels,
//! the masked-LM head on the labelled rows and on every row, dropout on), RoBERTa (position ids
//! from the padding, the position table's padding index) and DistilBERT. One forward + backward:
//! the loss within 1e-5 relative and every parameter's gradient within 1e-4 (max-norm relative
//! error, `max |got - want| / max |want|`); then a few AdamW steps (two accumulated
//! micro-batches, weight decay, gradient clipping active) whose losses and gradient norms stay
//! within 1e-4 relative. The ops these models do not reach are checked one by one, and the
//! emulator counts a step's host-device copies (the batch in, the step scalars out). Runs on the
//! CPU emulator (both thread orders, and once under AddressSanitizer) or, with
//! LMTRAIN_CUDA_REAL=1, on a GPU; prints SKIP without nvcc.

mod support;

use lmtrain_backend::{Backend, Epilogue, GemmDesc, GemmShape, HostBatch, Rows};
use lmtrain_cpu::Cpu;
use lmtrain_cuda::{CuBuf, CudaBackend, DeviceKind};
use lmtrain_model::bert::{BertConfig, RobertaConfig};
use lmtrain_model::distilbert::DistilBertConfig;
use lmtrain_model::encoder::{EncoderConfig, MaskedLm};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel};
use lmtrain_optim::{AdamW, AdamWConfig, decay_segments};
use support::{Child, Mode, on_device, rel_err, run_children};

/// Loss tolerance of one step (f32 on both sides; only summation orders differ).
const LOSS_TOL: f64 = 1e-5;
/// Gradient tolerance (max-norm relative error per parameter tensor).
const GRAD_TOL: f64 = 1e-4;
/// Loss tolerance after a few AdamW steps.
const TRAIN_TOL: f64 = 1e-4;
const STEPS: usize = 3;

/// An owned batch.
struct Batch {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    labels: Vec<i32>,
    mask: Option<Vec<bool>>,
    types: Option<Vec<u32>>,
}

impl Batch {
    fn input(&self) -> Input<'_> {
        Input {
            b: self.b,
            t: self.t,
            input_ids: &self.ids,
            labels: Some(&self.labels),
            attention_mask: self.mask.as_deref(),
            token_type_ids: self.types.as_deref(),
        }
    }
}

/// Loss and gradients of one forward + backward with dropout seed `seed`.
fn one_step<B: Backend, M: LanguageModel<B>>(m: &mut M, batch: &Batch, seed: u64) -> (f32, Vec<f32>) {
    let loss = m.loss_and_gradients(&batch.input(), Some(seed)).unwrap();
    let grads = m.backend().to_host(B::view(m.store().grads())).unwrap();
    (loss, grads)
}

/// `STEPS` AdamW steps of two accumulated micro-batches each (dropout seeds differ per
/// micro-batch and step): the loss and gradient norm of each step as the trainer reads them.
fn train<B: Backend, M: LanguageModel<B>>(m: &mut M, batch: &Batch) -> Vec<(f64, f32)> {
    let infos = m.param_infos().to_vec();
    let segments = decay_segments(infos.iter().map(|p| (p.offset, p.len, p.decay)), 0.01);
    let params = m.params_to_host().unwrap();
    let mut opt = AdamW::new(m.backend(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() }, &params, segments).unwrap();
    let mut out = Vec::new();
    for step in 0..STEPS as u64 {
        let mut stats = m.backend().new_stats().unwrap();
        m.zero_grad().unwrap();
        for micro in 0..2 {
            m.accumulate_gradients(&batch.input(), Some(100 + 10 * step + micro), &mut stats).unwrap();
        }
        let (be, store) = m.parts_mut();
        let (p, g) = store.params_and_grads_mut();
        opt.step(be, B::view_mut(p), B::view(g), 3e-3, 0.5, 2, &mut stats).unwrap();
        let read = be.read_stats(&stats).unwrap();
        out.push((read.loss / 2.0, opt.report(&read).grad_norm));
    }
    out
}

/// Compares one step and a short training run of the CPU model `cpu` and the CUDA model
/// `cuda` (built from the same parameters).
fn compare<C: LanguageModel<Cpu>, G: LanguageModel<CudaBackend>>(name: &str, mut cpu: C, mut cuda: G, batch: &Batch) {
    let (loss_c, grads_c) = one_step(&mut cpu, batch, 7);
    let (loss_g, grads_g) = one_step(&mut cuda, batch, 7);
    let e = ((loss_g as f64 - loss_c as f64) / loss_c as f64).abs();
    println!("{name}: loss cpu {loss_c} cuda {loss_g}, relative error {e:.2e} (tolerance {LOSS_TOL:.0e})");
    assert!(loss_c.is_finite() && e <= LOSS_TOL, "{name}: loss {loss_g} on CUDA, {loss_c} on the CPU");
    let largest = grads_c.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    for p in cpu.param_infos() {
        let (g, c) = (&grads_g[p.offset..p.offset + p.len], &grads_c[p.offset..p.offset + p.len]);
        assert!(c.iter().any(|&x| x != 0.0), "{name}: {} has no gradient on the CPU", p.name);
        // A key bias adds a constant to a whole softmax row: its exact gradient is 0 and both
        // backends hold round-off, so it is measured against the model's largest gradient.
        let e = if ["key.bias", "k_lin.bias"].iter().any(|n| p.name.ends_with(n)) {
            g.iter().zip(c).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / largest
        } else {
            rel_err(g, c)
        };
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
        assert!(e <= GRAD_TOL, "{name}: gradient of {} differs by {e:.2e} (relative)", p.name);
    }
    println!("{name}: worst gradient {} {:.2e} (tolerance {GRAD_TOL:.0e})", worst.1, worst.0);
    let (run_c, run_g) = (train(&mut cpu, batch), train(&mut cuda, batch));
    for (i, ((lc, nc), (lg, ng))) in run_c.iter().zip(&run_g).enumerate() {
        let (e, en) = (((lg - lc) / lc).abs(), ((ng - nc) / nc).abs());
        println!("{name}: AdamW step {}: loss cpu {lc:.7} cuda {lg:.7} ({e:.2e}), grad norm cpu {nc:.5} cuda {ng:.5} ({en:.2e})", i + 1);
        assert!(lc.is_finite() && e <= TRAIN_TOL, "{name}: step {} loss {lg} on CUDA, {lc} on the CPU", i + 1);
        assert!(f64::from(en) <= TRAIN_TOL, "{name}: step {} gradient norm {ng} on CUDA, {nc} on the CPU", i + 1);
    }
    assert!(run_c[STEPS - 1].0 < run_c[0].0, "{name}: the loss does not fall ({run_c:?})");
    let params_c = cpu.params_to_host().unwrap();
    let params_g = cuda.params_to_host().unwrap();
    let e = rel_err(&params_g, &params_c);
    println!("{name}: parameters after {STEPS} steps, relative error {e:.2e}");
    assert!(e <= TRAIN_TOL, "{name}: parameters differ by {e:.2e} after {STEPS} steps");
}

fn backend() -> CudaBackend {
    CudaBackend::open(0).unwrap_or_else(|e| panic!("opening the CUDA backend: {e}"))
}

#[test]
fn gpt2_step_matches_cpu() {
    on_device("gpt2_step_matches_cpu", |_| {
        let cfg = Gpt2Config {
            vocab_size: 67,
            n_positions: 16,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            ..Gpt2Config::default()
        };
        let (b, t) = (2, 9);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % 67).collect();
        let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
        labels[4] = IGNORE_INDEX;
        let batch = Batch { b, t, ids, labels, mask: None, types: None };
        let cpu = Gpt2::new(Cpu, cfg.clone(), 5).unwrap();
        let cuda = Gpt2::from_params(backend(), cfg, cpu.params_to_host().unwrap()).unwrap();
        compare("gpt2", cpu, cuda, &batch);
    });
}

/// A masked-LM step of `cfg` with its head on `rows`: 3 rows ending in 0, 2 and 4 padding
/// positions (id `pad`, the padding index, also once at a real position: its gradient must
/// still not reach the word table's padding row), ~30% of the real positions labelled.
fn masked_lm<C: EncoderConfig>(name: &str, cfg: C, pad: u32, rows: Rows, token_types: bool) {
    let (b, t, vocab) = (3, 11, cfg.vocab_size() as u32);
    let mask: Vec<bool> = (0..b * t).map(|i| i % t < t - 2 * (i / t)).collect();
    let mut ids: Vec<u32> = (0..b * t).map(|i| if mask[i] { 5 + (i as u32 * 53 + 7) % (vocab - 5) } else { pad }).collect();
    ids[2] = pad;
    let labels: Vec<i32> =
        (0..b * t).map(|i| if mask[i] && (i * 7919) % 100 < 30 { ((i * 31) % vocab as usize) as i32 } else { IGNORE_INDEX }).collect();
    let types: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= t / 2)).collect();
    assert!(labels.iter().filter(|&&y| y != IGNORE_INDEX).count() >= 4);
    let batch = Batch { b, t, ids, labels, mask: Some(mask), types: token_types.then_some(types) };
    let mut cpu = MaskedLm::<Cpu, C>::new(Cpu, cfg.clone(), 9).unwrap();
    cpu.set_head_rows(rows);
    let mut cuda = MaskedLm::<CudaBackend, C>::from_params(backend(), cfg, cpu.params_to_host().unwrap()).unwrap();
    cuda.set_head_rows(rows);
    compare(name, cpu, cuda, &batch);
}

fn bert_config() -> BertConfig {
    BertConfig {
        vocab_size: 71,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 48,
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: Some(0),
        ..BertConfig::default()
    }
}

#[test]
fn bert_step_matches_cpu() {
    on_device("bert_step_matches_cpu", |_| {
        masked_lm("bert (head on the labelled rows)", bert_config(), 0, Rows::Labelled, true);
        masked_lm("bert (head on every row)", bert_config(), 0, Rows::All, true);
    });
}

/// RoBERTa (position ids from the padding, the position table's padding index) and
/// DistilBERT (no token types), one layer each.
#[test]
fn roberta_and_distilbert_steps_match_cpu() {
    on_device("roberta_and_distilbert_steps_match_cpu", |_| {
        let mut roberta = RobertaConfig::default();
        let r = &mut roberta.0;
        (r.vocab_size, r.hidden_size, r.num_hidden_layers, r.num_attention_heads) = (71, 32, 1, 2);
        (r.intermediate_size, r.max_position_embeddings) = (48, 11 + 2);
        assert_eq!(r.pad_token_id, Some(1));
        masked_lm("roberta", roberta, 1, Rows::Labelled, false);
        let distilbert = DistilBertConfig {
            vocab_size: 71,
            dim: 32,
            n_layers: 1,
            n_heads: 2,
            hidden_dim: 40,
            max_position_embeddings: 16,
            ..DistilBertConfig::default()
        };
        masked_lm("distilbert", distilbert, 0, Rows::Labelled, false);
    });
}

/// The ops GPT-2 and BERT do not reach, through the trait on both backends: strided-batch
/// products with leading dimensions (every transpose, overwrite and accumulate), tanh forward
/// and backward, zero_padded_rows, empty buffers; and the ops without a CUDA kernel refuse with one line.
#[test]
fn other_ops_match_cpu() {
    on_device("other_ops_match_cpu", |_| {
        let be = backend();
        let mut rng = support::Rng::new(17);
        let up = |v: &[f32]| be.from_host(v.to_vec()).unwrap();
        let down = |v: &CuBuf| be.to_host(CudaBackend::view(v)).unwrap();
        // empty buffers (CUDA refuses empty allocations)
        let (e0, e1) = (be.alloc(0).unwrap(), up(&[]));
        assert!(CudaBackend::buf_len(&e0) == 0 && CudaBackend::buf_len(&e1) == 0 && down(&e1).is_empty(), "empty buffers");
        // C_i (+)= op(A_i) op(B_i), 3 products of 5 x 7 x 6 in padded rows at odd strides
        for (trans_a, trans_b, accumulate) in [(false, false, false), (true, false, true), (false, true, false), (true, true, true)] {
            let (m, n, k, batch) = (5, 7, 6, 3);
            let shape = GemmShape { m, n, k, trans_a, trans_b, accumulate };
            let (lda, ldb, ldc) = (if trans_a { m } else { k } + 2, if trans_b { k } else { n } + 1, n + 3);
            let (ra, rb) = (if trans_a { k } else { m }, if trans_b { n } else { k });
            let strides = [ra * lda + 4, rb * ldb + 1, m * ldc + 2];
            let d = GemmDesc { shape, lda, ldb, ldc, batch, strides };
            let a = rng.vec((batch - 1) * strides[0] + ra * lda, 1.0, 0.0);
            let b = rng.vec((batch - 1) * strides[1] + rb * ldb, 1.0, 0.0);
            let c0 = rng.vec((batch - 1) * strides[2] + m * ldc, 1.0, 0.0);
            let mut want = c0.clone();
            Cpu.gemm(&mut want, &a, &b, &d, Epilogue::None).unwrap();
            let (da, db, mut dc) = (up(&a), up(&b), up(&c0));
            be.gemm(CudaBackend::view_mut(&mut dc), CudaBackend::view(&da), CudaBackend::view(&db), &d, Epilogue::None).unwrap();
            support::assert_close(&format!("gemm {shape:?}"), &down(&dc), &want, LOSS_TOL);
        }
        let x = rng.vec(1037, 3.0, 0.0);
        let dout = rng.vec(1037, 1.0, 0.0);
        let acc = rng.vec(1037, 1.0, 0.0);
        let (mut y, mut dx) = (vec![0.0; 1037], acc.clone());
        Cpu.tanh_forward(&mut y, &x).unwrap();
        Cpu.tanh_backward(&mut dx, &y, &dout).unwrap();
        let (gx, gdout, mut gy, mut gdx) = (up(&x), up(&dout), be.alloc(1037).unwrap(), up(&acc));
        be.tanh_forward(CudaBackend::view_mut(&mut gy), CudaBackend::view(&gx)).unwrap();
        be.tanh_backward(CudaBackend::view_mut(&mut gdx), CudaBackend::view(&gy), CudaBackend::view(&gdout)).unwrap();
        support::assert_close("tanh_forward", &down(&gy), &y, LOSS_TOL);
        support::assert_close("tanh_backward", &down(&gdx), &dx, LOSS_TOL);
        // zero_padded_rows: 2 x 5 positions of 3 channels, 3 of them padding
        let (b, t, cols) = (2, 5, 3);
        let ids = vec![1u32; b * t];
        let mask: Vec<bool> = (0..b * t).map(|i| i % t < t - 1 - i / t).collect();
        let host =
            HostBatch { b, t, input_ids: &ids, targets: None, attention_mask: Some(&mask), token_type_ids: None, position_ids: None };
        let h = rng.vec(b * t * cols, 1.0, 0.0);
        let mut want = h.clone();
        Cpu.zero_padded_rows(&mut want, &Cpu.upload_batch(&host).unwrap(), cols).unwrap();
        let mut gh = up(&h);
        be.zero_padded_rows(CudaBackend::view_mut(&mut gh), &be.upload_batch(&host).unwrap(), cols).unwrap();
        assert_eq!(down(&gh), want, "zero_padded_rows");
        assert_eq!(want.iter().filter(|&&v| v == 0.0).count(), 3 * cols, "three rows zeroed");
        // no CUDA kernel yet: one line naming the op
        let mut out = be.alloc(b * t * cols * 3).unwrap();
        let e = be.conv1d_unfold(CudaBackend::view_mut(&mut out), CudaBackend::view(&gh), b, t, cols, 3).unwrap_err();
        assert_eq!(e.to_string(), "conv1d_unfold (DeBERTa) is not implemented on CUDA yet");
    });
}

/// Host-device copies made so far (the emulator's counters; `None` on a GPU).
fn copy_counts(be: &CudaBackend) -> Option<(u64, u64)> {
    if be.device().kind() != DeviceKind::Emulator {
        return None;
    }
    // SAFETY: the fake libcuda.so this process already loaded (through LD_LIBRARY_PATH), and its
    // `void cuemu_copy_counts(unsigned long long*, unsigned long long*)`.
    unsafe {
        let lib = libloading::Library::new("libcuda.so").expect("the emulator's libcuda.so");
        let f: libloading::Symbol<'_, unsafe extern "C" fn(*mut u64, *mut u64)> = lib.get(b"cuemu_copy_counts").expect("cuemu_copy_counts");
        let (mut htod, mut dtoh) = (0, 0);
        f(&mut htod, &mut dtoh);
        Some((htod, dtoh))
    }
}

/// Copies between host and device in one training step after the first (two micro-batches):
/// the batch's arrays going in and the one read of the step scalars coming out, the same
/// number whatever the depth of the model (nothing per layer or per op).
#[test]
fn a_step_copies_only_the_batch_and_the_stats() {
    on_device("a_step_copies_only_the_batch_and_the_stats", |_| {
        let mut per_depth = Vec::new();
        for n_layer in [1, 3] {
            let cfg = Gpt2Config { vocab_size: 67, n_positions: 16, n_embd: 32, n_layer, n_head: 2, ..Gpt2Config::default() };
            let ids: Vec<u32> = (0..18u32).map(|i| (i * 37 + 11) % 67).collect();
            let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            let batch = Batch { b: 2, t: 9, ids, labels, mask: None, types: None };
            let be = backend();
            let before = copy_counts(&be);
            let mut m = Gpt2::new(be, cfg, 5).unwrap();
            let steps = |m: &mut Gpt2<CudaBackend>, n| {
                let params = m.params_to_host().unwrap();
                let segments = decay_segments(m.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.0);
                let mut opt = AdamW::new(m.backend(), AdamWConfig::default(), &params, segments).unwrap();
                let mut counts = Vec::new();
                for step in 0..n {
                    let start = copy_counts(m.backend());
                    let mut stats = m.backend().new_stats().unwrap();
                    m.zero_grad().unwrap();
                    for micro in 0..2 {
                        m.accumulate_gradients(&batch.input(), Some(step * 2 + micro), &mut stats).unwrap();
                    }
                    let (be, store) = m.parts_mut();
                    let (p, g) = store.params_and_grads_mut();
                    opt.step(be, CudaBackend::view_mut(p), CudaBackend::view(g), 1e-3, 1.0, 2, &mut stats).unwrap();
                    be.read_stats(&stats).unwrap();
                    counts.push(start.zip(copy_counts(be)).map(|((h0, d0), (h1, d1))| (h1 - h0, d1 - d0)));
                }
                counts
            };
            let counts = steps(&mut m, 3);
            if before.is_none() {
                return support::skip("a_step_copies_only_the_batch_and_the_stats", "the copy counters are the emulator's");
            }
            let counts: Vec<(u64, u64)> = counts.into_iter().flatten().collect();
            println!("GPT-2, {n_layer} layer(s): copies per step (host to device, device to host): {counts:?}");
            assert_eq!(counts[1], counts[2], "every step after the first copies the same");
            assert_eq!(counts[1].1, 2, "one read of the step scalars (loss and norm) per step");
            per_depth.push(counts[1]);
        }
        assert_eq!(per_depth[0], per_depth[1], "copies per step depend on the depth of the model");
    });
}

/// Every device test above once more in one child whose fake libraries are built with
/// AddressSanitizer.
#[test]
fn address_sanitizer_pass() {
    match support::mode() {
        Mode::Direct => {}
        Mode::Skip(why) => support::skip("address_sanitizer_pass", why),
        Mode::Emulate(_) => match (lmtrain_cuda_emu::ASAN_DIR, lmtrain_cuda_emu::ASAN_RUNTIME) {
            (Some(dir), Some(rt)) => run_children(
                &[
                    "gpt2_step_matches_cpu",
                    "bert_step_matches_cpu",
                    "roberta_and_distilbert_steps_match_cpu",
                    "other_ops_match_cpu",
                    "a_step_copies_only_the_batch_and_the_stats",
                ],
                &Child { lib_dir: dir, order: "forward", asan_runtime: Some(rt), allow_emulator: true },
            ),
            _ => support::skip("address_sanitizer_pass", "the host compiler has no AddressSanitizer runtime"),
        },
    }
}
