//! Ten AdamW steps replayed against PyTorch: each GPT-2 fixture's `adamw10.json` holds the
//! losses of a `torch.optim.AdamW` loop (two weight-decay groups, HF linear schedule with
//! warmup, `clip_grad_norm_(1.0)`, the fixture's batch every step; made by
//! `scripts/golden/make_gpt2_fixtures.py`). lmtrain-optim + the model must reproduce every
//! loss within 1e-4 (absolute; the losses are ~4-5, so ~2e-5 relative: f32 round-off over
//! ten steps, far below what a wrong bias correction, decay group or clip factor changes).

use std::path::Path;

use lmtrain_backend::Backend;
use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_optim::{AdamW, AdamWConfig, Schedule, SchedulerKind, decay_segments};
use safetensors::SafeTensors;

const TOL: f64 = 1e-4;

fn ints(st: &SafeTensors, name: &str) -> (Vec<i64>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    let v = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    (v, t.shape().to_vec())
}

fn replay(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/model/tests/fixtures").join(name);
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("adamw10.json")).unwrap()).unwrap();
    let golden_bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&golden_bytes).unwrap();
    let (ids, shape) = ints(&golden, "input_ids");
    let (labels, _) = ints(&golden, "labels");
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let labels: Vec<i32> = labels.iter().map(|&x| x as i32).collect();

    let mut model: Gpt2<Cpu> = lmtrain_hf::load_model(Cpu, &dir).unwrap();
    // The fixture's groups: no decay for biases and LayerNorm weights.
    for p in model.param_infos() {
        let no_decay = p.name.ends_with("bias") || p.name.contains(".ln_") || p.name.starts_with("transformer.ln_f");
        assert_eq!(p.decay, !no_decay, "{}", p.name);
    }
    let f = |k: &str| spec[k].as_f64().unwrap();
    assert_eq!(spec["schedule"], "linear");
    let wd = f("weight_decay") as f32;
    let segments = decay_segments(model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), wd);
    let cfg = AdamWConfig {
        beta1: spec["betas"][0].as_f64().unwrap() as f32,
        beta2: spec["betas"][1].as_f64().unwrap() as f32,
        eps: f("eps") as f32,
        weight_decay: wd,
    };
    let mut opt = AdamW::new(model.backend(), cfg, model.params_to_host().unwrap(), segments).unwrap();
    let total = spec["total_steps"].as_u64().unwrap();
    let schedule = Schedule {
        base_lr: f("lr"),
        kind: SchedulerKind::Linear,
        warmup_steps: spec["warmup_steps"].as_u64().unwrap(),
        total_steps: total,
    };
    let want: Vec<f64> = spec["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(want.len() as u64, total);
    let mut worst = 0.0f64;
    for (k, &w) in want.iter().enumerate() {
        model.zero_grad().unwrap();
        let loss = model.forward_backward(&ids, &labels, b, t, Some(k as u64)).unwrap() as f64;
        worst = worst.max((loss - w).abs());
        assert!((loss - w).abs() <= TOL, "{name} step {}: loss {loss} vs torch {w}", k + 1);
        let (backend, store) = model.parts_mut();
        let (params, grads) = store.params_and_grads_mut();
        let mut stats = backend.new_stats().unwrap();
        opt.step(backend, Cpu::view_mut(params), Cpu::view(grads), schedule.lr(k as u64) as f32, f("max_grad_norm") as f32, 1, &mut stats)
            .unwrap();
    }
    let fin = model.forward_loss(&ids, &labels, b, t).unwrap() as f64;
    worst = worst.max((fin - f("final_loss")).abs());
    eprintln!("{name}: largest |loss - torch| over 10 steps + final: {worst:.2e}");
    assert!((fin - f("final_loss")).abs() <= TOL, "{name} after 10 steps: {fin} vs torch {}", f("final_loss"));
    // The run must actually have moved: the final loss is clearly below the first.
    assert!(fin < want[0] - 0.05, "{name}: {fin} vs {}", want[0]);
}

#[test]
fn adamw_ten_steps_match_torch_tiny() {
    replay("gpt2_tiny");
}

#[test]
fn adamw_ten_steps_match_torch_odd_sizes() {
    replay("gpt2_odd");
}
