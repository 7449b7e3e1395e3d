//! The meter's count against what the CPU backend really allocates: a counting global allocator
//! watches a real CPU training step of the same tiny models [`measure`] measures. (One test in
//! this binary, so no other test's allocations land in the count.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use lmtrain_backend::Backend;
use lmtrain_backend::meter::Meter;
use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, BertConfig};
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel};
use lmtrain_optim::{AdamW, AdamWConfig, decay_segments};
use lmtrain_trainer::memory::{Needs, StepShape, measure};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let live = LIVE.fetch_add(new_size as u64, Ordering::Relaxed) + new_size as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

/// Host bytes of a real CPU run, split as the meter splits them: `fixed` = what the model and
/// AdamW hold before the step (parameters, gradients, moments and the model's small host
/// tables), `activations` = the step's peak above that.
fn on_cpu<M: LanguageModel<Cpu>>(config: &M::Config, s: StepShape) -> (u64, u64) {
    let n = s.b * s.t;
    let input_ids = vec![0u32; n];
    let mut labels = vec![IGNORE_INDEX; n];
    labels[..s.labelled(M::OBJECTIVE)].fill(0);
    let input = Input { b: s.b, t: s.t, input_ids: &input_ids, labels: Some(&labels), attention_mask: None, token_type_ids: None };
    let n_params = M::param_table(config).unwrap().last().map_or(0, |p| p.offset + p.len);
    let start = live();
    let mut model = M::from_params(Cpu, config.clone(), vec![0.0; n_params]).unwrap();
    let segments = decay_segments(model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.0);
    let mut opt = AdamW::new(model.backend(), AdamWConfig::default(), model.params_to_host().unwrap(), segments).unwrap();
    let before_step = live();
    PEAK.store(before_step, Ordering::Relaxed);
    let mut stats = Cpu.new_stats().unwrap();
    model.zero_grad().unwrap();
    model.accumulate_gradients(&input, Some(0), &mut stats).unwrap();
    let (be, store) = model.parts_mut();
    let (p, g) = store.params_and_grads_mut();
    opt.step(be, p, g, 1e-3, 1.0, 1, &mut stats).unwrap();
    let peak = PEAK.load(Ordering::Relaxed);
    (before_step - start, peak - before_step)
}

/// `real` is at least `metered` and at most `slack` above it.
fn close(what: &str, metered: u64, real: u64, slack: u64) {
    assert!(real >= metered && real - metered <= slack, "{what}: the meter counts {metered} bytes, the CPU allocated {real}");
}

/// Measures family `M` (on the CPU) and `N` (the same family on the meter) at batches 2 and 6.
///
/// The CPU allocates what the meter counts and, besides, the model's host tables (tensor names
/// and shapes: at most 512 bytes a tensor here) and per-op temporaries (matrix-product packing,
/// the head's partial sums) that grow slower than the activations: within 15% of them at these
/// tiny widths, and within 5% of the activations' growth with the batch. Leaving out the
/// attention probabilities (a third of the growth here) or a saved activation fails.
fn compare<M: LanguageModel<Cpu>, N: LanguageModel<Meter<true>, Config = M::Config>>(name: &str, config: &M::Config) {
    let tensors = M::param_table(config).unwrap().len() as u64;
    let mut act = Vec::new();
    for b in [2, 6] {
        let s = StepShape { b, t: 64, mlm_probability: 0.15, recompute: false };
        let Needs { params, grads, optimizer, activations } = measure::<N, true>(config, lmtrain_cpu::meter_profile(), s).unwrap();
        let (real_fixed, real_act) = on_cpu::<M>(config, s);
        close(&format!("{name}: parameters, gradients and moments"), params + grads + optimizer, real_fixed, 512 * tensors);
        close(&format!("{name}: activations at batch {b}"), activations, real_act, activations * 15 / 100);
        act.push((activations, real_act));
    }
    let (metered, real) = (act[1].0 - act[0].0, act[1].1 - act[0].1);
    assert!(metered.abs_diff(real) * 20 <= metered, "{name}: activations grow by {metered} bytes on the meter, {real} on the CPU");
}

#[test]
fn the_meter_counts_what_a_cpu_training_step_allocates() {
    // one thread: per-thread temporaries are then allocated once, by the warm-up
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(compare_families);
}

fn compare_families() {
    let gpt2 = Gpt2Config { vocab_size: 96, n_positions: 64, n_embd: 16, n_layer: 2, n_head: 4, ..Gpt2Config::default() };
    // once before measuring: the thread pool and other lazy statics allocate on first use
    on_cpu::<Gpt2<Cpu>>(&gpt2, StepShape { b: 1, t: 8, mlm_probability: 0.15, recompute: false });
    compare::<Gpt2<Cpu>, Gpt2<Meter<true>>>("gpt2", &gpt2);
    // a vocabulary of three head chunks: the head's per-row statistics and dx partial sums
    let wide = Gpt2Config { vocab_size: 1100, ..gpt2 };
    on_cpu::<Gpt2<Cpu>>(&wide, StepShape { b: 1, t: 8, mlm_probability: 0.15, recompute: false });
    compare::<Gpt2<Cpu>, Gpt2<Meter<true>>>("gpt2, vocab 1100", &wide);
    let bert = BertConfig {
        vocab_size: 96,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 64,
        ..BertConfig::default()
    };
    compare::<Bert<Cpu>, Bert<Meter<true>>>("bert", &bert);
}
