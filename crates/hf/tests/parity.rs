//! Parity with Hugging Face `GPT2LMHeadModel` on the committed fixtures
//! (`crates/model/tests/fixtures/*`, made by `scripts/golden/make_gpt2_fixtures.py`).
//!
//! Error norm, per tensor: max |ours - reference| / max |reference| (a relative error that does
//! not blow up on near-zero entries). Tolerances: loss and logits 1e-5, every parameter gradient
//! 1e-4 (float32 end to end; observed errors are ~1e-7 and ~1e-6).

use std::path::{Path, PathBuf};

use lmtrain_cpu::Cpu;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_model::{Input, LanguageModel};
use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 3] = ["gpt2_tiny", "gpt2_odd", "gpt2_wide_vocab_erf"];

fn load_gpt2(dir: &Path) -> Result<Gpt2<Cpu>, lmtrain_hf::HfError> {
    lmtrain_hf::load_model(Cpu, dir)
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name)
}

struct Golden {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    labels: Vec<i32>,
    loss: f32,
    logits: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn golden(name: &str) -> Golden {
    let bytes = std::fs::read(fixture_dir(name).join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids_t = st.tensor("input_ids").unwrap();
    assert_eq!(ids_t.dtype(), Dtype::I64);
    let (b, t) = (ids_t.shape()[0], ids_t.shape()[1]);
    let mut grads: Vec<(String, Vec<f32>)> =
        st.iter().filter_map(|(n, v)| n.strip_prefix("grad.").map(|p| (p.to_string(), f32s(v.data())))).collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    Golden {
        b,
        t,
        ids: i64s(ids_t.data()).into_iter().map(|x| x as u32).collect(),
        labels: i64s(st.tensor("labels").unwrap().data()).into_iter().map(|x| x as i32).collect(),
        loss: f32s(st.tensor("loss").unwrap().data())[0],
        logits: f32s(st.tensor("logits").unwrap().data()),
        grads,
    }
}

/// max |a - b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    let den = b.iter().fold(0f64, |m, y| m.max(y.abs() as f64));
    num / den.max(1e-30)
}

#[test]
fn loss_logits_and_every_gradient_match_transformers() {
    for name in FIXTURES {
        let g = golden(name);
        let mut model = load_gpt2(&fixture_dir(name)).unwrap();
        let cfg = model.config().clone();
        assert!(g.labels.contains(&-100), "{name}: the fixture exercises ignored labels");

        let input = Input { b: g.b, t: g.t, input_ids: &g.ids, labels: None, attention_mask: None, token_type_ids: None };
        let logits = model.logits(&input).unwrap();
        let e_logits = rel_err(&logits, &g.logits);
        let loss = model.forward_loss(&g.ids, &g.labels, g.b, g.t).unwrap();
        let e_loss = ((loss - g.loss) / g.loss).abs() as f64;

        model.zero_grad().unwrap();
        let loss_fb = model.forward_backward(&g.ids, &g.labels, g.b, g.t, None).unwrap();
        assert_eq!(loss_fb, loss, "{name}: forward_backward and forward_loss agree");
        assert_eq!(g.grads.len(), model.param_infos().len(), "{name}: one golden gradient per parameter");
        let mut worst = (0f64, String::new());
        for (pname, want) in &g.grads {
            let info = model.param_infos().iter().find(|p| &p.name == pname).unwrap_or_else(|| panic!("{name}: no parameter {pname}"));
            let got = &model.grads()[info.offset..info.offset + info.len];
            let e = rel_err(got, want);
            assert!(e <= 1e-4, "{name}: gradient {pname} rel err {e:e} > 1e-4");
            if e > worst.0 {
                worst = (e, pname.clone());
            }
        }
        println!(
            "{name} (V={} C={} H={} L={} B={} T={}): loss {loss} vs {} rel err {e_loss:.2e}; logits rel err {e_logits:.2e}; \
             worst gradient rel err {:.2e} ({})",
            cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer, g.b, g.t, g.loss, worst.0, worst.1
        );
        assert!(e_loss <= 1e-5, "{name}: loss {loss} vs {} (rel err {e_loss:e})", g.loss);
        assert!(e_logits <= 1e-5, "{name}: logits rel err {e_logits:e}");
    }
}

#[test]
fn gradients_accumulate_across_calls() {
    let g = golden("gpt2_odd");
    let mut model = load_gpt2(&fixture_dir("gpt2_odd")).unwrap();
    model.zero_grad().unwrap();
    model.forward_backward(&g.ids, &g.labels, g.b, g.t, None).unwrap();
    let once = model.grads().to_vec();
    model.forward_backward(&g.ids, &g.labels, g.b, g.t, None).unwrap();
    for (two, one) in model.grads().iter().zip(&once) {
        assert!((two - 2.0 * one).abs() <= 1e-6 * (1.0 + one.abs()), "{two} vs 2 x {one}");
    }
}

#[test]
fn kv_cache_generation_logits_match_the_full_forward() {
    let g = golden("gpt2_odd");
    let model = load_gpt2(&fixture_dir("gpt2_odd")).unwrap();
    let v = model.config().vocab_size;
    let row = &g.ids[..g.t];
    let mut cache = model.new_kv_cache(g.t).unwrap();
    // a 5-token prompt, then one token at a time
    let mut got = vec![model.forward_incremental(&mut cache, &row[..5]).unwrap()];
    for i in 5..g.t {
        got.push(model.forward_incremental(&mut cache, &row[i..i + 1]).unwrap());
    }
    for (k, logits) in got.iter().enumerate() {
        let pos = 4 + k;
        let want = &g.logits[pos * v..(pos + 1) * v];
        let e = rel_err(logits, want);
        assert!(e <= 1e-5, "position {pos}: rel err {e:e}");
    }
    assert_eq!(cache.len(), g.t);
}
