//! GPT-2 model behaviour that the Hugging Face parity fixtures (crates/hf/tests/parity.rs) do not
//! cover: initialisation, the parameter table, config round trips, dropout.

use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};

fn tiny(pdrop: f64) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 61,
        n_positions: 12,
        n_embd: 24,
        n_layer: 2,
        n_head: 2,
        resid_pdrop: pdrop,
        embd_pdrop: pdrop,
        attn_pdrop: pdrop,
        ..Gpt2Config::default()
    }
}

fn batch(b: usize, t: usize, vocab: u32) -> (Vec<u32>, Vec<i32>) {
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % vocab).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    labels[3] = -100;
    (ids, labels)
}

#[test]
fn parameter_table_follows_hugging_face_names_shapes_and_decay_groups() {
    let cfg = Gpt2Config { n_layer: 2, n_embd: 48, n_head: 3, vocab_size: 101, n_positions: 20, ..Gpt2Config::default() };
    let m = Gpt2::new(Cpu, cfg, 1).unwrap();
    let infos = m.param_infos();
    assert_eq!(infos.len(), 2 + 12 * 2 + 2);
    assert_eq!(infos[0].name, "transformer.wte.weight");
    assert_eq!(infos[0].shape, vec![101, 48]);
    let attn = infos.iter().find(|p| p.name == "transformer.h.1.attn.c_attn.weight").unwrap();
    assert_eq!(attn.shape, vec![48, 144], "Conv1D weights are [in, out]");
    let mut offset = 0;
    for p in infos {
        assert_eq!(p.offset, offset, "{} is contiguous after its predecessor", p.name);
        assert_eq!(p.len, p.shape.iter().product::<usize>());
        offset += p.len;
        let no_decay = p.name.ends_with("bias") || p.name.contains(".ln_");
        assert_eq!(p.decay, !no_decay, "{}", p.name);
    }
    assert_eq!(offset, m.params().len());
    assert_eq!(m.grads().len(), m.params().len());
    // the 124M configuration has the well-known parameter count (lm_head tied)
    assert_eq!(Gpt2::<Cpu>::param_table(&Gpt2Config::default()).unwrap().iter().map(|p| p.len).sum::<usize>(), 124_439_808);
}

#[test]
fn initialisation_matches_hugging_face_statistics_and_is_seeded() {
    let cfg = Gpt2Config { n_layer: 4, n_embd: 64, n_head: 4, vocab_size: 1000, n_positions: 64, ..Gpt2Config::default() };
    let a = Gpt2::new(Cpu, cfg.clone(), 7).unwrap();
    let b = Gpt2::new(Cpu, cfg.clone(), 7).unwrap();
    let c = Gpt2::new(Cpu, cfg, 8).unwrap();
    assert_eq!(a.params(), b.params());
    assert_ne!(a.params(), c.params());
    let std = |x: &[f32]| {
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        (x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    };
    let wte = a.param("transformer.wte.weight").unwrap();
    assert!((std(wte) - 0.02).abs() < 0.001, "wte std {}", std(wte));
    let proj = a.param("transformer.h.2.mlp.c_proj.weight").unwrap();
    let want = 0.02 / (2.0f64 * 4.0).sqrt();
    assert!((std(proj) - want).abs() < 0.0005, "c_proj std {} vs {want}", std(proj));
    assert!(a.param("transformer.h.0.attn.c_attn.bias").unwrap().iter().all(|&v| v == 0.0));
    assert!(a.param("transformer.h.3.ln_2.weight").unwrap().iter().all(|&v| v == 1.0));
    assert!(a.param("transformer.ln_f.bias").unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn config_json_round_trips_and_keeps_unknown_fields() {
    let text = r#"{"model_type":"gpt2","vocab_size":101,"n_embd":48,"n_head":3,"n_layer":2,"n_positions":20,
                  "n_ctx":20,"layer_norm_epsilon":1e-05,"task_specific_params":{"x":{"y":1}},"activation_function":"gelu_new"}"#;
    let cfg: Gpt2Config = serde_json::from_str(text).unwrap();
    assert_eq!((cfg.vocab_size, cfg.n_embd, cfg.n_inner(), cfg.head_size()), (101, 48, 192, 16));
    assert_eq!(cfg.resid_pdrop, 0.1, "HF default for absent fields");
    let back: serde_json::Value = serde_json::to_value(&cfg).unwrap();
    assert_eq!(back["n_ctx"], 20);
    assert_eq!(back["task_specific_params"]["x"]["y"], 1);
    assert_eq!(back["layer_norm_epsilon"], 1e-5);
    let again: Gpt2Config = serde_json::from_value(back).unwrap();
    assert_eq!(again, cfg);
    cfg.validate().unwrap();
    for bad in [
        Gpt2Config { n_head: 5, ..cfg.clone() },
        Gpt2Config { activation_function: "relu".into(), ..cfg.clone() },
        Gpt2Config { tie_word_embeddings: false, ..cfg.clone() },
        Gpt2Config { resid_pdrop: 1.0, ..cfg.clone() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn dropout_is_seeded_and_off_in_eval_mode() {
    let (b, t) = (2, 9);
    let (ids, labels) = batch(b, t, 61);
    let mut m = Gpt2::new(Cpu, tiny(0.2), 3).unwrap();
    let eval = m.forward_loss(&ids, &labels, b, t).unwrap();
    let none = m.forward_backward(&ids, &labels, b, t, None).unwrap();
    assert_eq!(eval, none, "no seed = eval mode");
    m.zero_grad().unwrap();
    let l1 = m.forward_backward(&ids, &labels, b, t, Some(42)).unwrap();
    let g1 = m.grads().to_vec();
    m.zero_grad().unwrap();
    let l2 = m.forward_backward(&ids, &labels, b, t, Some(42)).unwrap();
    assert_eq!(l1, l2);
    assert_eq!(m.grads(), &g1[..], "same seed, same masks, bit-identical gradients");
    let l3 = m.forward_backward(&ids, &labels, b, t, Some(43)).unwrap();
    assert_ne!(l1, l3);
    assert_ne!(l1, eval);
}

#[test]
fn gradients_with_dropout_match_finite_differences() {
    // with a fixed seed the masks are fixed, so the loss is a smooth function of the parameters
    let (b, t) = (2, 7);
    let (ids, labels) = batch(b, t, 61);
    let mut m = Gpt2::new(Cpu, tiny(0.3), 5).unwrap();
    // make biases and LayerNorm non-trivial so their gradients are generic
    for (i, p) in m.params_mut().iter_mut().enumerate() {
        *p += ((i * 7919 % 101) as f32 - 50.0) * 2e-4;
    }
    m.zero_grad().unwrap();
    m.forward_backward(&ids, &labels, b, t, Some(9)).unwrap();
    let grads = m.grads().to_vec();
    let infos = m.param_infos().to_vec();
    let mut checked = 0;
    for info in &infos {
        // the largest gradient entry of each tensor
        let (i, &g) = grads[info.offset..info.offset + info.len].iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let idx = info.offset + i;
        let h = 1e-2f32;
        let orig = m.params()[idx];
        m.params_mut()[idx] = orig + h;
        let lp = m.forward_backward(&ids, &labels, b, t, Some(9)).unwrap() as f64;
        m.params_mut()[idx] = orig - h;
        let lm = m.forward_backward(&ids, &labels, b, t, Some(9)).unwrap() as f64;
        m.params_mut()[idx] = orig;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!((fd - g as f64).abs() <= 0.03 * (g.abs() as f64) + 1e-3, "{}[{i}]: analytic {g} vs numeric {fd}", info.name);
        checked += 1;
    }
    assert_eq!(checked, infos.len());
}

#[test]
fn repeated_steps_are_bit_identical_on_the_threaded_paths() {
    // large enough that products, the fused output head and the reductions run multi-threaded
    let cfg = Gpt2Config { vocab_size: 2500, n_positions: 64, n_embd: 64, n_layer: 2, n_head: 4, ..Gpt2Config::default() };
    let (b, t) = (4, 64);
    let (ids, labels) = batch(b, t, 2500);
    let mut m = Gpt2::new(Cpu, cfg, 11).unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        m.zero_grad().unwrap();
        let loss = m.forward_backward(&ids, &labels, b, t, Some(5)).unwrap();
        runs.push((loss.to_bits(), m.grads().to_vec()));
    }
    for r in &runs[1..] {
        assert_eq!(r.0, runs[0].0, "loss bits");
        assert!(r.1 == runs[0].1, "gradients differ between identical steps");
    }
}

#[test]
fn distilgpt2_shape_builds_and_runs_a_step() {
    // distilgpt2: 6 layers of gpt2 small; 81,912,576 parameters (lm_head tied)
    let cfg = Gpt2Config { n_layer: 6, ..Gpt2Config::default() };
    let mut m = Gpt2::new(Cpu, cfg, 0).unwrap();
    assert_eq!(m.num_params(), 81_912_576);
    let (b, t) = (1, 8);
    let ids: Vec<u32> = vec![464, 3290, 286, 262, 1578, 2066, 13, 50256];
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let loss = m.forward_backward(&ids, &labels, b, t, Some(1)).unwrap();
    // a fresh model predicts nearly uniformly: loss close to ln(vocab) = 10.825
    assert!((loss - (50257f32).ln()).abs() < 0.1, "loss {loss}");
    assert!(m.grads().iter().all(|g| g.is_finite()));
    assert!(m.grads().iter().any(|&g| g != 0.0));
    let mut cache = m.new_kv_cache(t).unwrap();
    let logits = m.forward_incremental(&mut cache, &ids[..3]).unwrap();
    assert_eq!(logits.len(), 50257);
}
