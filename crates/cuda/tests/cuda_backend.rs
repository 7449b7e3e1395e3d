//! Whole training steps of real models on `lmtrain_cuda::CudaBackend` against the same models on
//! the CPU backend, from the same parameters: a tiny GPT-2 (causal, dropout on), a tiny BERT
//! (padding inside the batch, the padding id also at a real position, token types, -100 labels,
//! the masked-LM head on the labelled rows and on every row, dropout on), RoBERTa (position ids
//! from the padding, the position table's padding index), DistilBERT and DeBERTa (the v3 shape
//! without a position table, and a v2 with one, token types and the convolution layer; relative
//! attention with c2p and p2c over log buckets, dropout on). One forward + backward:
//! the loss within 1e-5 relative and every parameter's gradient within 1e-4 (max-norm relative
//! error, `max |got - want| / max |want|`); then a few AdamW steps (two accumulated
//! micro-batches, weight decay, gradient clipping active) whose losses and gradient norms stay
//! within 1e-4 relative. The ops these models do not reach are checked one by one, and the
//! emulator counts a step's host-device copies (the batch in, the step scalars out; f32 and bf16)
//! and allocations (the training state is one; a step allocates nothing per layer).
//!
//! The bf16 backend (`CudaBackend<bf16>`, f32 master weights) against the same f32 CPU models
//! from bf16-representable parameters: its ops one by one (each within one or two bf16 roundings
//! of the CPU), one whole step of GPT-2 and of BERT (padding, -100 labels; loss within 1e-2
//! relative, every parameter gradient's cosine similarity at least 0.999, AdamW's moments and
//! update, the stochastically rounded working copy) and of DeBERTa, two steps from one state
//! giving the same bits, and 20-step training curves of GPT-2, BERT and DeBERTa on f32 and bf16
//! (every step's loss within 1e-4 / 2e-2 of the CPU's).
//!
//! Runs on the CPU emulator (both thread orders, and once under AddressSanitizer; the training
//! curves once, forward order: their kernels are the steps') or, with LMTRAIN_CUDA_REAL=1, on a
//! GPU; prints SKIP without nvcc.

mod support;

use half::bf16;
use lmtrain_backend::{Backend, EmbeddingTables, Epilogue, GeluKind, GemmDesc, GemmShape, HostBatch, PaddingIdx, Rows};
use lmtrain_cpu::Cpu;
use lmtrain_cuda::{CuBuf, CudaBackend, DeviceKind, KernelDtype};
use lmtrain_model::bert::{BertConfig, RobertaConfig};
use lmtrain_model::deberta::{Deberta, DebertaV2Config, PosAttType};
use lmtrain_model::distilbert::DistilBertConfig;
use lmtrain_model::encoder::{EncoderConfig, MaskedLm};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel, ModelConfig};
use lmtrain_optim::{AdamW, AdamWConfig, decay_segments};
use support::{Child, Mode, on_device, on_device_once, rel_err, run_children};

/// Biases whose exact gradient is 0: each adds a constant to a whole softmax row (a key bias to
/// every score `q_i . k_j` of a row; DeBERTa's `pos_key_proj` bias to every c2p term `q_i . kr`
/// of a row, when the relative keys have their own projection).
const ZERO_GRADIENT_BIASES: [&str; 3] = ["key.bias", "k_lin.bias", "pos_key_proj.bias"];
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
        let e = if ZERO_GRADIENT_BIASES.iter().any(|n| p.name.ends_with(n)) {
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
        let (cfg, batch) = (gpt2_config(), gpt2_batch());
        let cpu = Gpt2::new(Cpu, cfg.clone(), 5).unwrap();
        let cuda = Gpt2::from_params(backend(), cfg, cpu.params_to_host().unwrap()).unwrap();
        compare("gpt2", cpu, cuda, &batch);
    });
}

/// A masked-LM batch for `cfg`: 3 rows ending in 0, 2 and 4 padding positions (id `pad`, the
/// padding index, also once at a real position: its gradient must still not reach the word
/// table's padding row), ~30% of the real positions labelled.
fn mlm_batch<C: ModelConfig>(cfg: &C, pad: u32, token_types: bool) -> Batch {
    let (b, t, vocab) = (3, 11, cfg.vocab_size() as u32);
    let mask: Vec<bool> = (0..b * t).map(|i| i % t < t - 2 * (i / t)).collect();
    let mut ids: Vec<u32> = (0..b * t).map(|i| if mask[i] { 5 + (i as u32 * 53 + 7) % (vocab - 5) } else { pad }).collect();
    ids[2] = pad;
    let labels: Vec<i32> =
        (0..b * t).map(|i| if mask[i] && (i * 7919) % 100 < 30 { ((i * 31) % vocab as usize) as i32 } else { IGNORE_INDEX }).collect();
    let types: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= t / 2)).collect();
    assert!(labels.iter().filter(|&&y| y != IGNORE_INDEX).count() >= 4);
    Batch { b, t, ids, labels, mask: Some(mask), types: token_types.then_some(types) }
}

/// A masked-LM step of `cfg` with its head on `rows` on [`mlm_batch`].
fn masked_lm<C: EncoderConfig>(name: &str, cfg: C, pad: u32, rows: Rows, token_types: bool) {
    let batch = mlm_batch(&cfg, pad, token_types);
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
/// Three products of 5 x 7 x 6 in padded rows at odd strides, every transpose (accumulating
/// in half of them): each descriptor with the lengths of A, B and C.
fn strided_gemm_cases() -> impl Iterator<Item = (GemmDesc, [usize; 3])> {
    [(false, false, false), (true, false, true), (false, true, false), (true, true, true)].into_iter().map(
        |(trans_a, trans_b, accumulate)| {
            let (m, n, k, batch) = (5, 7, 6, 3);
            let shape = GemmShape { m, n, k, trans_a, trans_b, accumulate };
            let (lda, ldb, ldc) = (if trans_a { m } else { k } + 2, if trans_b { k } else { n } + 1, n + 3);
            let (ra, rb) = (if trans_a { k } else { m }, if trans_b { n } else { k });
            let strides = [ra * lda + 4, rb * ldb + 1, m * ldc + 2];
            let lens = [(batch - 1) * strides[0] + ra * lda, (batch - 1) * strides[1] + rb * ldb, (batch - 1) * strides[2] + m * ldc];
            (GemmDesc { shape, lda, ldb, ldc, batch, strides }, lens)
        },
    )
}

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
        for (d, [la, lb, lc]) in strided_gemm_cases() {
            let shape = d.shape;
            let (a, b, c0) = (rng.vec(la, 1.0, 0.0), rng.vec(lb, 1.0, 0.0), rng.vec(lc, 1.0, 0.0));
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
    });
}

/// A tiny DeBERTa-v2 (`v3`: the DeBERTa-v3 shape, without a position table or token types) or a
/// v2 with an absolute position table, token types, a narrower embedding and the convolution
/// layer. Both: relative attention with c2p and p2c over 4 log buckets (shorter than the
/// sequence), dropout on.
fn deberta_config(v3: bool) -> DebertaV2Config {
    DebertaV2Config {
        vocab_size: 61,
        hidden_size: 32,
        embedding_size: Some(if v3 { 32 } else { 24 }),
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 40,
        max_position_embeddings: 16,
        type_vocab_size: if v3 { 0 } else { 2 },
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        relative_attention: true,
        position_buckets: 4,
        max_relative_positions: 12,
        pos_att_type: Some(PosAttType::List(vec!["p2c".into(), "c2p".into()])),
        share_att_key: v3,
        norm_rel_ebd: if v3 { "layer_norm".into() } else { "none".into() },
        position_biased_input: !v3,
        conv_kernel_size: if v3 { 0 } else { 3 },
        legacy: !v3,
        ..DebertaV2Config::default()
    }
}

/// A DeBERTa masked-LM step and a few AdamW steps on the f32 backend against the CPU (see
/// [`compare`]), with padding and -100 labels, the head on the labelled rows and on every row.
#[test]
fn deberta_step_matches_cpu() {
    on_device("deberta_step_matches_cpu", |_| {
        for (v3, rows) in [(true, Rows::Labelled), (false, Rows::All)] {
            let cfg = deberta_config(v3);
            let batch = mlm_batch(&cfg, 0, !v3);
            let mut cpu = Deberta::new(Cpu, cfg.clone(), 9).unwrap();
            cpu.set_head_rows(rows);
            let mut cuda = Deberta::from_params(backend(), cfg, cpu.params_to_host().unwrap()).unwrap();
            cuda.set_head_rows(rows);
            compare(&format!("deberta (v3 {v3}, head on {rows:?})"), cpu, cuda, &batch);
        }
    });
}

/// One of the emulator's pairs of counters, by the name of the fake `libcuda.so`'s
/// `void NAME(unsigned long long*, unsigned long long*)` (`None` on a GPU).
fn emu_counters<T: KernelDtype>(be: &CudaBackend<T>, name: &[u8]) -> Option<(u64, u64)> {
    if be.device().kind() != DeviceKind::Emulator {
        return None;
    }
    // SAFETY: the fake libcuda.so this process already loaded (through LD_LIBRARY_PATH), and
    // its counter function of that signature.
    unsafe {
        let lib = libloading::Library::new("libcuda.so").expect("the emulator's libcuda.so");
        let f: libloading::Symbol<'_, unsafe extern "C" fn(*mut u64, *mut u64)> = lib.get(name).expect("the emulator's counters");
        let (mut a, mut b) = (0, 0);
        f(&mut a, &mut b);
        Some((a, b))
    }
}

/// Host-device copies made so far: (host to device, device to host).
fn copy_counts<T: KernelDtype>(be: &CudaBackend<T>) -> Option<(u64, u64)> {
    emu_counters(be, b"cuemu_copy_counts")
}

/// Device allocations: (made so far, live now).
fn alloc_counts<T: KernelDtype>(be: &CudaBackend<T>) -> Option<(u64, u64)> {
    emu_counters(be, b"cuemu_alloc_counts")
}

/// What the emulator counted while a model was set up for training and took 3 training steps
/// (two micro-batches each).
struct StepCounts {
    /// Allocations made by moving the parameters into the training state.
    state_allocs: u64,
    /// Per step: (host-to-device copies, device-to-host copies, allocations).
    steps: Vec<(u64, u64, u64)>,
}

/// [`StepCounts`] of `m` on `batch`, set up as the trainer does (`ParamStore::into_training`,
/// `AdamW::with_state`; `None` on a GPU).
fn step_counts<T: KernelDtype, M: LanguageModel<CudaBackend<T>>>(mut m: M, batch: &Batch) -> Option<StepCounts> {
    let params = m.params_to_host().unwrap();
    let segments = decay_segments(m.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.0);
    let (be, store) = m.parts_mut();
    let (made0, live0) = alloc_counts(be)?;
    let state = store.into_training(be, params).unwrap();
    let (made1, live1) = alloc_counts(be)?;
    // the separate parameter and gradient buffers went, one allocation came
    assert_eq!(live1, live0 - 1, "live allocations before {live0}, after {live1}");
    let mut opt = AdamW::with_state(AdamWConfig::default(), state, segments);
    let mut steps = Vec::new();
    for step in 0..3 {
        let ((h0, d0), (a0, _)) = (copy_counts(m.backend())?, alloc_counts(m.backend())?);
        let mut stats = m.backend().new_stats().unwrap();
        m.zero_grad().unwrap();
        for micro in 0..2 {
            m.accumulate_gradients(&batch.input(), Some(step * 2 + micro), &mut stats).unwrap();
        }
        let (be, store) = m.parts_mut();
        let (p, g) = store.params_and_grads_mut();
        opt.step(be, CudaBackend::view_mut(p), CudaBackend::view(g), 1e-3, 1.0, 2, &mut stats).unwrap();
        be.read_stats(&stats).unwrap();
        let ((h1, d1), (a1, _)) = (copy_counts(be)?, alloc_counts(be)?);
        steps.push((h1 - h0, d1 - d0, a1 - a0));
    }
    Some(StepCounts { state_allocs: made1 - made0, steps })
}

/// [`step_counts`] of a GPT-2 of `n_layer` layers.
fn gpt2_counts<T: KernelDtype>(be: CudaBackend<T>, n_layer: usize) -> Option<StepCounts> {
    let cfg = Gpt2Config { vocab_size: 67, n_positions: 16, n_embd: 32, n_layer, n_head: 2, ..Gpt2Config::default() };
    let ids: Vec<u32> = (0..18u32).map(|i| (i * 37 + 11) % 67).collect();
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    step_counts(Gpt2::new(be, cfg, 5).unwrap(), &Batch { b: 2, t: 9, ids, labels, mask: None, types: None })
}

/// [`step_counts`] of the DeBERTa-v3 of [`deberta_config`] with `n_layer` layers, on its padded
/// masked-LM batch.
fn deberta_counts<T: KernelDtype>(be: CudaBackend<T>, n_layer: usize) -> Option<StepCounts> {
    let cfg = DebertaV2Config { num_hidden_layers: n_layer, ..deberta_config(true) };
    let batch = mlm_batch(&cfg, 0, false);
    step_counts(Deberta::new(be, cfg, 5).unwrap(), &batch)
}

/// The training state (parameters, gradients, AdamW's moments and, for bf16, the master
/// weights) is ONE device allocation; a training step after the first copies only the batch's
/// arrays in and the one read of the step scalars out, and allocates only the batch's arrays
/// and the step scalars: the same numbers whatever the depth of the model (nothing per layer or
/// per op), on the f32 and the bf16 backend alike; for GPT-2 and for DeBERTa (whose
/// relative-position tables are uploaded once, not per layer or step).
#[test]
fn the_training_state_is_one_allocation_and_a_step_copies_only_the_batch_and_the_stats() {
    const NAME: &str = "the_training_state_is_one_allocation_and_a_step_copies_only_the_batch_and_the_stats";
    on_device(NAME, |_| {
        type Counts = fn(usize) -> Option<StepCounts>;
        let families: [(&str, Counts, Counts); 2] = [
            ("GPT-2", |n| gpt2_counts(backend(), n), |n| gpt2_counts(backend_bf16(), n)),
            ("DeBERTa", |n| deberta_counts(backend(), n), |n| deberta_counts(backend_bf16(), n)),
        ];
        for (name, f32_counts, bf16_counts) in families {
            let mut per_depth = Vec::new();
            for (dtype, n_layer) in [("f32", 1), ("f32", 3), ("bf16", 1), ("bf16", 3)] {
                let counts = if dtype == "f32" { f32_counts(n_layer) } else { bf16_counts(n_layer) };
                let Some(StepCounts { state_allocs, steps }) = counts else {
                    return support::skip(NAME, "the copy and allocation counters are the emulator's");
                };
                println!(
                    "{name} {dtype}, {n_layer} layer(s): training state {state_allocs} allocation(s); per step (copies host to device, device to host, allocations): {steps:?}"
                );
                assert_eq!(state_allocs, 1, "{name} {dtype}: the training state takes one allocation");
                assert_eq!(steps[1], steps[2], "{name} {dtype}: every step after the first copies and allocates the same");
                assert_eq!(steps[1].1, 2, "{name} {dtype}: one read of the step scalars (loss and norm) per step");
                assert!(steps[0].2 > steps[1].2, "{name} {dtype}: the first step allocates the activations, the later ones do not");
                per_depth.push(steps[1]);
            }
            assert!(
                per_depth.iter().all(|&c| c == per_depth[0]),
                "{name}: copies or allocations per step depend on the depth or the dtype: {per_depth:?}"
            );
        }
    });
}

// ---- bf16 -----------------------------------------------------------------------------------

/// The bf16 backend.
fn backend_bf16() -> CudaBackend<bf16> {
    CudaBackend::<bf16>::open(0).unwrap_or_else(|e| panic!("opening the bf16 CUDA backend: {e}"))
}

/// The values bf16 storage holds of `x` (round to nearest even).
fn to_bf16(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect()
}

/// Cosine similarity of two vectors, in f64.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// Loss tolerance of one bf16 step (relative).
const BF16_LOSS_TOL: f64 = 1e-2;
/// Every parameter gradient of a bf16 step has at least this cosine similarity to the CPU's.
const BF16_GRAD_COS: f64 = 0.999;

/// One bf16 step (forward, backward, clipping, AdamW) of `gpu` against the f32 CPU model `cpu`,
/// both holding the same bf16-representable parameters: the loss, every parameter's gradient
/// (cosine similarity), the gradient norm, AdamW's first moments and its update of the master
/// weights, and the bf16 working copy: one of the two bf16 neighbours of its master weight,
/// rounded stochastically (no bias towards zero). Returns the worst gradient cosine.
fn compare_bf16<C: LanguageModel<Cpu>, G: LanguageModel<CudaBackend<bf16>>>(name: &str, mut cpu: C, mut gpu: G, batch: &Batch) -> f64 {
    let (loss_c, grads_c) = one_step(&mut cpu, batch, 7);
    let (loss_g, grads_g) = one_step(&mut gpu, batch, 7);
    let e = ((loss_g as f64 - loss_c as f64) / loss_c as f64).abs();
    println!("{name} bf16: loss cpu {loss_c} cuda {loss_g}, relative error {e:.2e} (tolerance {BF16_LOSS_TOL:.0e})");
    assert!(loss_c.is_finite() && e <= BF16_LOSS_TOL, "{name} bf16: loss {loss_g} on CUDA, {loss_c} on the CPU");
    let largest = grads_c.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let (mut worst, mut worst_zero) = ((1.0f64, String::new()), None::<f64>);
    for p in cpu.param_infos() {
        let (g, c) = (&grads_g[p.offset..p.offset + p.len], &grads_c[p.offset..p.offset + p.len]);
        // A key bias's exact gradient is 0 (see `compare`): both sides hold round-off, which has
        // no direction to agree on; it must stay round-off of the model's largest gradient.
        if ZERO_GRADIENT_BIASES.iter().any(|n| p.name.ends_with(n)) {
            let e = g.iter().zip(c).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / largest;
            worst_zero = Some(worst_zero.map_or(e, |w| w.max(e)));
            continue;
        }
        let cos = cosine(g, c);
        if cos.is_nan() || cos < worst.0 {
            worst = (cos, p.name.clone());
        }
    }
    println!("{name} bf16: worst gradient cosine similarity {:.6} ({}) (at least {BF16_GRAD_COS})", worst.0, worst.1);
    assert!(worst.0 >= BF16_GRAD_COS, "{name} bf16: the gradient of {} has cosine similarity {:.6}", worst.1, worst.0);
    if let Some(e) = worst_zero {
        println!("{name} bf16: key-bias gradients (exactly 0) within {e:.2e} of the largest gradient");
        assert!(e <= ONE_ROUNDING, "{name} bf16: a key bias's gradient reaches {e:.2e} of the largest gradient");
    }

    // AdamW from these gradients, clipping active
    let (lr, max_norm) = (1e-3, 0.5);
    let params0 = cpu.params_to_host().unwrap();
    let (norm_c, m_c, after_c) = adamw_once(&mut cpu, &params0, lr, max_norm);
    let (norm_g, m_g, master) = adamw_once(&mut gpu, &params0, lr, max_norm);
    let en = f64::from(((norm_g - norm_c) / norm_c).abs());
    let cos_m = cosine(&m_g, &m_c);
    let delta = |after: &[f32]| after.iter().zip(&params0).map(|(a, p)| a - p).collect::<Vec<f32>>();
    let cos_update = cosine(&delta(&master), &delta(&after_c));
    println!(
        "{name} bf16 AdamW: grad norm cpu {norm_c} cuda {norm_g} ({en:.2e}); first moments cosine {cos_m:.6}; \
         update of the master weights cosine {cos_update:.6}"
    );
    assert!(en <= BF16_LOSS_TOL, "{name} bf16: gradient norm {norm_g} on CUDA, {norm_c} on the CPU");
    assert!(cos_m >= BF16_GRAD_COS, "{name} bf16: AdamW's first moments have cosine similarity {cos_m}");
    // Adam's first update is about ±lr whatever the gradient's size: only the signs of the
    // gradients that are round-off on both sides (key biases) may differ
    assert!(cos_update >= 0.99, "{name} bf16: the update of the master weights has cosine similarity {cos_update}");
    let working = gpu.params_to_host().unwrap();
    let mut bias = 0.0f64;
    for (i, (&w, &m)) in working.iter().zip(&master).enumerate() {
        let (lo, hi) = bf16_neighbours(m);
        assert!(w == lo || w == hi, "{name} bf16: working weight {i} is {w}, not a bf16 neighbour of its master weight {m}");
        if lo != hi {
            // (w - m) / (hi - lo): its mean is 0 for unbiased rounding, -1/2 for truncation
            bias += f64::from((w - m) / (hi - lo)) * f64::from(m.signum());
        }
    }
    let bias = bias / working.len() as f64;
    println!("{name} bf16: stochastic rounding's mean offset towards larger magnitudes {bias:.4} (ulp)");
    assert!(bias.abs() < 0.05, "{name} bf16: the working copy is rounded with a bias of {bias:.4} ulp");
    worst.0
}

/// The bf16 values just below and above `x` (both `x` when it is one).
fn bf16_neighbours(x: f32) -> (f32, f32) {
    let down = f32::from_bits(x.to_bits() & 0xFFFF_0000);
    let up = bf16::from_bits(bf16::from_f32(down).to_bits() + 1).to_f32();
    if down == x {
        (x, x)
    } else if x > 0.0 {
        (down, up)
    } else {
        (up, down)
    }
}

/// One AdamW step of `m` (master weights `params0`) from the gradients it holds: the gradient
/// norm, the first moments and the (master) parameters after the step.
fn adamw_once<B: Backend, M: LanguageModel<B>>(m: &mut M, params0: &[f32], lr: f32, max_norm: f32) -> (f32, Vec<f32>, Vec<f32>) {
    let segments = decay_segments(m.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.01);
    let mut opt = AdamW::new(m.backend(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() }, params0, segments).unwrap();
    let (be, store) = m.parts_mut();
    let mut stats = be.new_stats().unwrap();
    let (p, g) = store.params_and_grads_mut();
    opt.step(be, B::view_mut(p), B::view(g), lr, max_norm, 1, &mut stats).unwrap();
    let norm = opt.report(&be.read_stats(&stats).unwrap()).grad_norm;
    let after = match opt.master_params(be).unwrap() {
        Some(master) => master,
        None => m.params_to_host().unwrap(),
    };
    (norm, opt.exp_avg(m.backend()).unwrap(), after)
}

/// One rounding to bf16 of every result, measured against the largest: `2^-8`.
const ONE_ROUNDING: f64 = 1.0 / 256.0;

/// Every op of the bf16 backend whose kernel the models reach only in part, through the trait
/// against the CPU backend on bf16-representable inputs (odd sizes): the host conversions (round
/// to nearest even, ties included), products (every transpose, strided batches, accumulation, the
/// bias and bias + GELU epilogues), the element-wise and row kernels, LayerNorm with its
/// statistics in bf16, and the parameter-gradient reductions into bf16 gradients (bias, LayerNorm,
/// embedding tables with a padding index). Results are one bf16 rounding from the CPU's f32 (the
/// LayerNorm backward: the rounding of the saved statistics too).
#[test]
fn bf16_ops_match_cpu() {
    on_device("bf16_ops_match_cpu", |_| {
        type G = CudaBackend<bf16>;
        let be = backend_bf16();
        let mut rng = support::Rng::new(23);
        let up = |v: &[f32]| be.from_host(v.to_vec()).unwrap();
        let down = |v: &CuBuf<bf16>| be.to_host(G::view(v)).unwrap();
        let rand = |rng: &mut support::Rng, n: usize, scale: f32| to_bf16(rng.vec(n, scale, 0.0));
        // round to nearest even: ties go to the even neighbour, in both directions
        let ties = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0), 3.0e-39, f32::MAX, 0.1];
        let want: Vec<f32> = ties.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(down(&up(&ties)), want, "from_host rounds to nearest even");
        assert_eq!(want[..3], [1.0, 1.0 + 4.0 / 256.0, -1.0], "ties to even");
        // products: 3 of 5 x 7 x 6 in padded rows at odd strides, every transpose
        for (d, [la, lb, lc]) in strided_gemm_cases() {
            let shape = d.shape;
            let (a, b, c0) = (rand(&mut rng, la, 1.0), rand(&mut rng, lb, 1.0), rand(&mut rng, lc, 1.0));
            let mut want = c0.clone();
            Cpu.gemm(&mut want, &a, &b, &d, Epilogue::None).unwrap();
            let (da, db, mut dc) = (up(&a), up(&b), up(&c0));
            be.gemm(G::view_mut(&mut dc), G::view(&da), G::view(&db), &d, Epilogue::None).unwrap();
            support::assert_close(&format!("bf16 gemm {shape:?}"), &down(&dc), &want, ONE_ROUNDING);
        }
        // the epilogues (cuBLASLt's bias epilogue; GELU on the stored pre-activation), 13 x 37 x 19
        let (m, n, k) = (13, 37, 19);
        let d = GemmDesc::from(GemmShape { m, n, k, trans_a: false, trans_b: true, accumulate: false });
        let (a, b, bias) = (rand(&mut rng, m * k, 1.0), rand(&mut rng, n * k, 1.0), rand(&mut rng, n, 1.0));
        let (da, db, dbias) = (up(&a), up(&b), up(&bias));
        let mut want = vec![0.0; m * n];
        Cpu.gemm(&mut want, &a, &b, &d, Epilogue::Bias(&bias[..])).unwrap();
        let mut dc = be.alloc(m * n).unwrap();
        be.gemm(G::view_mut(&mut dc), G::view(&da), G::view(&db), &d, Epilogue::Bias(G::view(&dbias))).unwrap();
        // the bias is added to the f32 product, rounded once
        support::assert_close("bf16 gemm + bias", &down(&dc), &want, ONE_ROUNDING);
        let (mut want, mut want_pre) = (vec![0.0; m * n], vec![0.0; m * n]);
        Cpu.gemm(&mut want, &a, &b, &d, Epilogue::BiasGelu { bias: &bias, kind: GeluKind::Erf, pre: &mut want_pre }).unwrap();
        let (mut dc, mut dpre) = (be.alloc(m * n).unwrap(), be.alloc(m * n).unwrap());
        let epi = Epilogue::BiasGelu { bias: G::view(&dbias), kind: GeluKind::Erf, pre: G::view_mut(&mut dpre) };
        be.gemm(G::view_mut(&mut dc), G::view(&da), G::view(&db), &d, epi).unwrap();
        support::assert_close("bf16 gemm + bias + gelu: pre-activation", &down(&dpre), &want_pre, ONE_ROUNDING);
        support::assert_close("bf16 gemm + bias + gelu", &down(&dc), &want, 2.0 * ONE_ROUNDING);
        // element-wise, 1037 elements
        let nel = 1037;
        let (x, y, acc) = (rand(&mut rng, nel, 3.0), rand(&mut rng, nel, 1.0), rand(&mut rng, nel, 1.0));
        let (dx, dy) = (up(&x), up(&y));
        let mut want = vec![0.0; nel];
        Cpu.residual_forward(&mut want, &x, &y).unwrap();
        let mut got = be.alloc(nel).unwrap();
        be.residual_forward(G::view_mut(&mut got), G::view(&dx), G::view(&dy)).unwrap();
        support::assert_close("bf16 residual_forward", &down(&got), &want, ONE_ROUNDING);
        let mut want = acc.clone();
        Cpu.add_inplace(&mut want, &y).unwrap();
        let mut got = up(&acc);
        be.add_inplace(G::view_mut(&mut got), G::view(&dy)).unwrap();
        support::assert_close("bf16 add_inplace", &down(&got), &want, ONE_ROUNDING);
        let mut th = vec![0.0; nel];
        Cpu.tanh_forward(&mut th, &x).unwrap();
        let mut gth = be.alloc(nel).unwrap();
        be.tanh_forward(G::view_mut(&mut gth), G::view(&dx)).unwrap();
        support::assert_close("bf16 tanh_forward", &down(&gth), &th, ONE_ROUNDING);
        // the backward from the stored (rounded) output, as the GPU reads it
        let (th, mut want) = (down(&gth), acc.clone());
        Cpu.tanh_backward(&mut want, &th, &y).unwrap();
        let mut got = up(&acc);
        be.tanh_backward(G::view_mut(&mut got), G::view(&gth), G::view(&dy)).unwrap();
        support::assert_close("bf16 tanh_backward", &down(&got), &want, ONE_ROUNDING);
        // a batch of 3 x 7 with padding and labels; 19 channels
        let (b, t, c, vocab, n_pos) = (3, 7, 19, 11, 9);
        let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 5 + 3) % vocab as u32).collect();
        let mask: Vec<bool> = (0..b * t).map(|i| i % t < t - i / t).collect();
        let labels: Vec<i32> = (0..b * t).map(|i| if i % 3 == 1 { (i % vocab) as i32 } else { IGNORE_INDEX }).collect();
        let host = HostBatch {
            b,
            t,
            input_ids: &ids,
            targets: Some(&labels),
            attention_mask: Some(&mask),
            token_type_ids: None,
            position_ids: None,
        };
        let (cb, gb) = (Cpu.upload_batch(&host).unwrap(), be.upload_batch(&host).unwrap());
        let h = rand(&mut rng, b * t * c, 1.0);
        let mut want = h.clone();
        Cpu.zero_padded_rows(&mut want, &cb, c).unwrap();
        let mut got = up(&h);
        be.zero_padded_rows(G::view_mut(&mut got), &gb, c).unwrap();
        assert_eq!(down(&got), want, "bf16 zero_padded_rows");
        let n_sel = labels.iter().filter(|&&y| y != IGNORE_INDEX).count();
        let mut want = vec![0.0; n_sel * c];
        Cpu.gather_rows(&mut want, &h, &cb, c).unwrap();
        let (dh, mut got) = (up(&h), be.alloc(n_sel * c).unwrap());
        be.gather_rows(G::view_mut(&mut got), G::view(&dh), &gb, c).unwrap();
        assert_eq!(down(&got), want, "bf16 gather_rows");
        let dsel = rand(&mut rng, n_sel * c, 1.0);
        let mut want = h.clone();
        Cpu.scatter_add_rows(&mut want, &dsel, &cb, c).unwrap();
        let mut got = up(&h);
        be.scatter_add_rows(G::view_mut(&mut got), G::view(&up(&dsel)), &gb, c).unwrap();
        support::assert_close("bf16 scatter_add_rows", &down(&got), &want, ONE_ROUNDING);
        // parameter gradients into bf16: bias (column_sum_bf16), 21 rows
        let (rows, dout, db0) = (b * t, rand(&mut rng, b * t * c, 1.0), rand(&mut rng, c, 1.0));
        let ddout = up(&dout);
        let mut want = db0.clone();
        Cpu.bias_backward(&mut want, &dout, rows, c).unwrap();
        let mut got = up(&db0);
        be.bias_backward(G::view_mut(&mut got), G::view(&ddout), rows, c).unwrap();
        support::assert_close("bf16 bias_backward", &down(&got), &want, ONE_ROUNDING);
        // LayerNorm: statistics saved in f32 (one spare row: only the first `rows` are used)
        let (inp, w, bb) = (rand(&mut rng, rows * c, 2.0), rand(&mut rng, c, 1.0), rand(&mut rng, c, 1.0));
        let (dinp, dw, dbb) = (up(&inp), up(&w), up(&bb));
        let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        Cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bb, rows, c, 1e-5).unwrap();
        let mut gout = be.alloc(rows * c).unwrap();
        let (mut gmean, mut grstd) = (be.master_from_host(vec![0.0; rows + 1]).unwrap(), be.master_from_host(vec![0.0; rows + 1]).unwrap());
        let vo = G::view_mut(&mut gout);
        be.layernorm_forward(vo, &mut gmean, &mut grstd, G::view(&dinp), G::view(&dw), G::view(&dbb), rows, c, 1e-5).unwrap();
        support::assert_close("bf16 layernorm_forward", &down(&gout), &out, ONE_ROUNDING);
        let (gm, gr) = (be.master_to_host(&gmean).unwrap(), be.master_to_host(&grstd).unwrap());
        support::assert_close("bf16 layernorm_forward: the mean, in f32", &gm[..rows], &mean, support::F32_TOL);
        support::assert_close("bf16 layernorm_forward: rstd, in f32", &gr[..rows], &rstd, support::F32_TOL);
        assert_eq!((gm[rows], gr[rows]), (0.0, 0.0), "bf16 layernorm_forward: the spare row untouched");
        let (dx0, gw0, gb0) = (rand(&mut rng, rows * c, 1.0), rand(&mut rng, c, 1.0), rand(&mut rng, c, 1.0));
        let (mut dx, mut gw, mut gbias) = (dx0.clone(), gw0.clone(), gb0.clone());
        Cpu.layernorm_backward(&mut dx, &mut gw, &mut gbias, &dout, &inp, &w, &mean, &rstd, rows, c).unwrap();
        let (mut ddx, mut dgw, mut dgb) = (up(&dx0), up(&gw0), up(&gb0));
        let (vx, vw, vb) = (G::view_mut(&mut ddx), G::view_mut(&mut dgw), G::view_mut(&mut dgb));
        be.layernorm_backward(vx, vw, vb, G::view(&ddout), G::view(&dinp), G::view(&dw), &gmean, &grstd, rows, c).unwrap();
        support::assert_close("bf16 layernorm_backward dinp", &down(&ddx), &dx, support::BF16_TOL);
        support::assert_close("bf16 layernorm_backward dweight", &down(&dgw), &gw, support::BF16_TOL);
        support::assert_close("bf16 layernorm_backward dbias", &down(&dgb), &gbias, ONE_ROUNDING);
        // embedding tables' gradients in bf16 (embedding_bwd_bf16_grad_bf16), token 0 the padding
        let (wte0, wpe0) = (rand(&mut rng, vocab * c, 1.0), rand(&mut rng, n_pos * c, 1.0));
        let pad = PaddingIdx { word: Some(0), position: None };
        let (mut wte, mut wpe) = (wte0.clone(), wpe0.clone());
        let tables = EmbeddingTables { word: &mut wte[..], position: Some(&mut wpe[..]), token_type: None };
        Cpu.embedding_backward(tables, &dout, &cb, c, pad).unwrap();
        let (mut gwte, mut gwpe) = (up(&wte0), up(&wpe0));
        let tables = EmbeddingTables { word: G::view_mut(&mut gwte), position: Some(G::view_mut(&mut gwpe)), token_type: None };
        be.embedding_backward(tables, G::view(&ddout), &gb, c, pad).unwrap();
        support::assert_close("bf16 embedding_backward word table", &down(&gwte), &wte, ONE_ROUNDING);
        support::assert_close("bf16 embedding_backward position table", &down(&gwpe), &wpe, ONE_ROUNDING);
        assert!(ids.contains(&0) && down(&gwte)[..c] == wte0[..c], "the padding row of the word table is untouched");
    });
}

fn gpt2_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 67,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        resid_pdrop: 0.1,
        embd_pdrop: 0.1,
        attn_pdrop: 0.1,
        ..Gpt2Config::default()
    }
}

/// The GPT-2 batch: 2 x 9, one label ignored.
fn gpt2_batch() -> Batch {
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % 67).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    labels[4] = IGNORE_INDEX;
    Batch { b, t, ids, labels, mask: None, types: None }
}

/// GPT-2 on the bf16 backend against the CPU, one step (see [`compare_bf16`]).
#[test]
fn bf16_gpt2_step_matches_cpu() {
    on_device("bf16_gpt2_step_matches_cpu", |_| {
        let params = to_bf16(Gpt2::new(Cpu, gpt2_config(), 5).unwrap().params_to_host().unwrap());
        let cpu = Gpt2::from_params(Cpu, gpt2_config(), params.clone()).unwrap();
        let gpu = Gpt2::from_params(backend_bf16(), gpt2_config(), params).unwrap();
        compare_bf16("gpt2", cpu, gpu, &gpt2_batch());
    });
}

/// BERT (padding inside the batch, -100 labels, token types, the head on the labelled rows) on
/// the bf16 backend against the CPU, one step.
#[test]
fn bf16_bert_step_matches_cpu() {
    on_device("bf16_bert_step_matches_cpu", |_| {
        let cfg = bert_config();
        let batch = mlm_batch(&cfg, 0, true);
        let params = to_bf16(MaskedLm::<Cpu, BertConfig>::new(Cpu, cfg.clone(), 9).unwrap().params_to_host().unwrap());
        let cpu = MaskedLm::<Cpu, BertConfig>::from_params(Cpu, cfg.clone(), params.clone()).unwrap();
        let gpu = MaskedLm::<CudaBackend<bf16>, BertConfig>::from_params(backend_bf16(), cfg, params).unwrap();
        compare_bf16("bert", cpu, gpu, &batch);
    });
}

/// Two bf16 steps (forward, backward, AdamW with its stochastic rounding) from the same state
/// give the same bits: loss, gradients, master and working weights.
#[test]
fn bf16_steps_are_deterministic() {
    on_device("bf16_steps_are_deterministic", |_| {
        let cfg = bert_config();
        let batch = mlm_batch(&cfg, 0, true);
        let params = to_bf16(MaskedLm::<Cpu, BertConfig>::new(Cpu, cfg.clone(), 9).unwrap().params_to_host().unwrap());
        let run = || {
            let mut m = MaskedLm::<CudaBackend<bf16>, BertConfig>::from_params(backend_bf16(), cfg.clone(), params.clone()).unwrap();
            let (loss, grads) = one_step(&mut m, &batch, 7);
            let (norm, moments, master) = adamw_once(&mut m, &params, 1e-3, 0.5);
            (loss.to_bits(), bits_of(&grads), norm.to_bits(), bits_of(&moments), bits_of(&master), bits_of(&m.params_to_host().unwrap()))
        };
        let (first, second) = (run(), run());
        assert!(first == second, "two bf16 steps from the same state differ");
        assert!(first.5 != bits_of(&params), "the step changed the working weights");
    });
}

/// DeBERTa (both shapes of [`deberta_config`]) on the bf16 backend against the CPU, one step.
#[test]
fn bf16_deberta_step_matches_cpu() {
    on_device("bf16_deberta_step_matches_cpu", |_| {
        for v3 in [true, false] {
            let cfg = deberta_config(v3);
            let batch = mlm_batch(&cfg, 0, !v3);
            // relative embeddings 10x their initialisation, so that the key bias's gradient (0 from
            // the content scores, a constant per softmax row) has a p2c part well above bf16's
            // round-off of the content part
            let m = Deberta::new(Cpu, cfg.clone(), 9).unwrap();
            let mut params = m.params_to_host().unwrap();
            for p in m.param_infos().iter().filter(|p| p.name.ends_with("rel_embeddings.weight")) {
                params[p.offset..p.offset + p.len].iter_mut().for_each(|x| *x *= 10.0);
            }
            let params = to_bf16(params);
            let cpu = Deberta::from_params(Cpu, cfg.clone(), params.clone()).unwrap();
            let gpu = Deberta::from_params(backend_bf16(), cfg, params).unwrap();
            compare_bf16(&format!("deberta (v3 {v3})"), cpu, gpu, &batch);
        }
    });
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Optimizer steps of the training-curve tests.
const CURVE_STEPS: u64 = 20;
/// Each step's loss on the f32 CUDA backend against the CPU's (relative).
const CURVE_F32_TOL: f64 = 1e-4;
/// Each step's loss on the bf16 CUDA backend against the CPU's (relative).
const CURVE_BF16_TOL: f64 = 2e-2;

/// The loss of each of [`CURVE_STEPS`] AdamW steps on the fixed `batch` (dropout seeds per step,
/// clipping at 1, weight decay), from the model's parameters (the master weights' start).
fn curve<B: Backend, M: LanguageModel<B>>(mut m: M, batch: &Batch, lr: f32) -> Vec<f64> {
    let params = m.params_to_host().unwrap();
    let segments = decay_segments(m.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.01);
    let mut opt = AdamW::new(m.backend(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() }, &params, segments).unwrap();
    (0..CURVE_STEPS)
        .map(|step| {
            let mut stats = m.backend().new_stats().unwrap();
            m.zero_grad().unwrap();
            m.accumulate_gradients(&batch.input(), Some(1000 + step), &mut stats).unwrap();
            let (be, store) = m.parts_mut();
            let (p, g) = store.params_and_grads_mut();
            opt.step(be, B::view_mut(p), B::view(g), lr, 1.0, 1, &mut stats).unwrap();
            be.read_stats(&stats).unwrap().loss
        })
        .collect()
}

/// The training curves of the CPU, f32 CUDA and bf16 CUDA models (built from the same
/// bf16-representable parameters): the loss falls by a third or more, and every step's loss on
/// CUDA is within [`CURVE_F32_TOL`] / [`CURVE_BF16_TOL`] of the CPU's.
fn compare_curves<C: LanguageModel<Cpu>, F: LanguageModel<CudaBackend>, H: LanguageModel<CudaBackend<bf16>>>(
    name: &str,
    (cpu, f32m, bf16m): (C, F, H),
    batch: &Batch,
    lr: f32,
) {
    let (c, f, h) = (curve(cpu, batch, lr), curve(f32m, batch, lr), curve(bf16m, batch, lr));
    let (mut worst_f, mut worst_h) = (0.0f64, 0.0f64);
    for i in 0..c.len() {
        let (ef, eh) = (((f[i] - c[i]) / c[i]).abs(), ((h[i] - c[i]) / c[i]).abs());
        println!("{name} step {:2}: loss cpu {:.6} cuda f32 {:.6} ({ef:.1e}) cuda bf16 {:.6} ({eh:.1e})", i + 1, c[i], f[i], h[i]);
        (worst_f, worst_h) = (worst_f.max(ef), worst_h.max(eh));
    }
    println!(
        "{name}: largest deviation from the CPU's curve: f32 {worst_f:.2e} (tolerance {CURVE_F32_TOL:.0e}), bf16 {worst_h:.2e} (tolerance {CURVE_BF16_TOL:.0e})"
    );
    assert!(c.iter().all(|l| l.is_finite()) && c[c.len() - 1] < c[0] * (2.0 / 3.0), "{name}: the loss does not fall by a third ({c:?})");
    assert!(worst_f <= CURVE_F32_TOL, "{name}: the f32 CUDA curve is {worst_f:.2e} from the CPU's");
    assert!(worst_h <= CURVE_BF16_TOL, "{name}: the bf16 CUDA curve is {worst_h:.2e} from the CPU's");
}

#[test]
fn gpt2_training_curves_match_cpu() {
    on_device_once("gpt2_training_curves_match_cpu", |_| {
        let cfg = gpt2_config();
        let params = to_bf16(Gpt2::new(Cpu, cfg.clone(), 5).unwrap().params_to_host().unwrap());
        let models = (
            Gpt2::from_params(Cpu, cfg.clone(), params.clone()).unwrap(),
            Gpt2::from_params(backend(), cfg.clone(), params.clone()).unwrap(),
            Gpt2::from_params(backend_bf16(), cfg, params).unwrap(),
        );
        compare_curves("gpt2", models, &gpt2_batch(), 3e-3);
    });
}

#[test]
fn bert_training_curves_match_cpu() {
    on_device_once("bert_training_curves_match_cpu", |_| {
        let cfg = bert_config();
        let params = to_bf16(MaskedLm::<Cpu, BertConfig>::new(Cpu, cfg.clone(), 9).unwrap().params_to_host().unwrap());
        let models = (
            MaskedLm::<Cpu, BertConfig>::from_params(Cpu, cfg.clone(), params.clone()).unwrap(),
            MaskedLm::<CudaBackend, BertConfig>::from_params(backend(), cfg.clone(), params.clone()).unwrap(),
            MaskedLm::<CudaBackend<bf16>, BertConfig>::from_params(backend_bf16(), cfg, params).unwrap(),
        );
        compare_curves("bert", models, &mlm_batch(&bert_config(), 0, true), 3e-3);
    });
}

#[test]
fn deberta_training_curves_match_cpu() {
    on_device_once("deberta_training_curves_match_cpu", |_| {
        let cfg = deberta_config(true);
        let params = to_bf16(Deberta::new(Cpu, cfg.clone(), 9).unwrap().params_to_host().unwrap());
        let models = (
            Deberta::from_params(Cpu, cfg.clone(), params.clone()).unwrap(),
            Deberta::from_params(backend(), cfg.clone(), params.clone()).unwrap(),
            Deberta::from_params(backend_bf16(), cfg.clone(), params).unwrap(),
        );
        compare_curves("deberta", models, &mlm_batch(&cfg, 0, false), 3e-3);
    });
}

/// Every device test above but the training curves once more in one child whose fake libraries
/// are built with AddressSanitizer.
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
                    "the_training_state_is_one_allocation_and_a_step_copies_only_the_batch_and_the_stats",
                    "bf16_ops_match_cpu",
                    "bf16_gpt2_step_matches_cpu",
                    "deberta_step_matches_cpu",
                    "bf16_deberta_step_matches_cpu",
                    "bf16_bert_step_matches_cpu",
                    "bf16_steps_are_deterministic",
                ],
                &Child { lib_dir: dir, order: "forward", asan_runtime: Some(rt), allow_emulator: true },
            ),
            _ => support::skip("address_sanitizer_pass", "the host compiler has no AddressSanitizer runtime"),
        },
    }
}
