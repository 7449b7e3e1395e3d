//! Replays each fixture's `adamw10.json` (10 steps of torch.optim.AdamW with two decay groups,
//! linear warmup/decay, gradient clipping) with the model and the CPU AdamW op, and checks every
//! loss within 1e-4 (absolute) of PyTorch's. (The trainer's own replay through lmtrain-optim lives
//! with the trainer; this one pins the model + op side.)

use std::path::{Path, PathBuf};

use lmtrain_backend::{AdamWHyper, DecaySegment};
use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;
use safetensors::SafeTensors;

fn load_gpt2(dir: &Path) -> Result<Gpt2<Cpu>, lmtrain_hf::HfError> {
    lmtrain_hf::load_model(Cpu, dir)
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Trajectory {
    lr: f32,
    betas: [f32; 2],
    eps: f32,
    weight_decay: f32,
    warmup_steps: usize,
    total_steps: usize,
    max_grad_norm: f32,
    schedule: String,
    losses: Vec<f32>,
    final_loss: f32,
}

#[test]
fn ten_adamw_steps_follow_pytorch() {
    for name in ["gpt2_tiny", "gpt2_odd", "gpt2_wide_vocab_erf"] {
        let dir = fixture_dir(name);
        let tr: Trajectory = serde_json::from_slice(&std::fs::read(dir.join("adamw10.json")).unwrap()).unwrap();
        assert_eq!(tr.schedule, "linear");
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let i64s = |n: &str| -> Vec<i64> {
            st.tensor(n).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
        };
        let ids: Vec<u32> = i64s("input_ids").into_iter().map(|x| x as u32).collect();
        let labels: Vec<i32> = i64s("labels").into_iter().map(|x| x as i32).collect();
        let shape = st.tensor("input_ids").unwrap().shape().to_vec();
        let (b, t) = (shape[0], shape[1]);

        let mut model = load_gpt2(&dir).unwrap();
        let segments: Vec<DecaySegment> = model
            .param_infos()
            .iter()
            .map(|p| DecaySegment { offset: p.offset, len: p.len, weight_decay: if p.decay { tr.weight_decay } else { 0.0 } })
            .collect();
        let n = model.params().len();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (step, want) in tr.losses.iter().enumerate() {
            model.zero_grad().unwrap();
            let loss = model.forward_backward(&ids, &labels, b, t, None).unwrap();
            assert!((loss - want).abs() <= 1e-4, "{name} step {step}: loss {loss} vs PyTorch {want}");
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1
            let norm = lmtrain_cpu::ops::global_norm(model.grads());
            let grad_scale = (tr.max_grad_norm / (norm + 1e-6)).min(1.0);
            // transformers get_linear_schedule_with_warmup, evaluated at the scheduler's count
            let lambda = if step < tr.warmup_steps {
                step as f32 / tr.warmup_steps.max(1) as f32
            } else {
                ((tr.total_steps - step) as f32 / (tr.total_steps - tr.warmup_steps).max(1) as f32).max(0.0)
            };
            let hp =
                AdamWHyper { lr: tr.lr * lambda, beta1: tr.betas[0], beta2: tr.betas[1], eps: tr.eps, step: step as u32 + 1, grad_scale };
            let (params, grads) = model.params_and_grads_mut();
            lmtrain_cpu::ops::adamw_update(params, grads, &mut m, &mut v, &segments, &hp);
        }
        let fin = model.forward_loss(&ids, &labels, b, t).unwrap();
        assert!((fin - tr.final_loss).abs() <= 1e-4, "{name}: final loss {fin} vs PyTorch {}", tr.final_loss);
        println!("{name}: final loss {fin} vs PyTorch {} (|diff| {:.1e})", tr.final_loss, (fin - tr.final_loss).abs());
    }
}
