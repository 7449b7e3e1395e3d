//! save -> load round trips through lmtrain-hf, checked against the files Hugging Face wrote.

use std::path::{Path, PathBuf};

use lmtrain_cpu::Cpu;
use lmtrain_hf::HfError;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;
use safetensors::SafeTensors;

fn load_gpt2(dir: &Path) -> Result<Gpt2<Cpu>, lmtrain_hf::HfError> {
    lmtrain_hf::load_model(Cpu, dir)
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name)
}

#[test]
fn saved_files_hold_exactly_what_transformers_wrote() {
    for name in ["gpt2_tiny", "gpt2_odd", "gpt2_wide_vocab_erf"] {
        let src = fixture_dir(name);
        let model = load_gpt2(&src).unwrap();
        let out = tempfile::tempdir().unwrap();
        lmtrain_hf::save_model(&model, out.path()).unwrap();

        let hf_bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let our_bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let (hf, ours) = (SafeTensors::deserialize(&hf_bytes).unwrap(), SafeTensors::deserialize(&our_bytes).unwrap());
        let mut hf_names = hf.names();
        let mut our_names = ours.names();
        hf_names.sort();
        our_names.sort();
        assert_eq!(our_names, hf_names, "{name}: same tensor names (no lm_head.weight)");
        assert!(!our_names.contains(&"lm_head.weight"));
        for n in hf_names {
            let (a, b) = (hf.tensor(n).unwrap(), ours.tensor(n).unwrap());
            assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}: {n}");
            assert_eq!(a.data(), b.data(), "{name}: {n} bytes");
        }
        let (_, meta) = SafeTensors::read_metadata(&our_bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));

        // config.json: every field transformers wrote comes back with the same value
        let read = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
        let (hf_cfg, our_cfg) = (read(&src.join("config.json")), read(&out.path().join("config.json")));
        for (k, v) in hf_cfg.as_object().unwrap() {
            assert_eq!(our_cfg.get(k), Some(v), "{name}: config field {k}");
        }

        // and the saved directory loads back to the same parameters
        let again = load_gpt2(out.path()).unwrap();
        assert_eq!(again.params(), model.params());
        assert_eq!(again.config(), model.config());
        // no temporary files left behind
        let names: Vec<String> =
            std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }
}

#[test]
fn bare_names_and_extra_buffers_of_original_checkpoints_load() {
    // checkpoints converted from OpenAI's release drop the `transformer.` prefix and carry
    // attention-mask buffers and an explicit lm_head.weight
    let src = fixture_dir("gpt2_odd");
    let model = load_gpt2(&src).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mask = vec![0u8; 4 * 20 * 20];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.iter().map(|(n, v)| (n.strip_prefix("transformer.").unwrap_or(n).to_string(), v)).collect();
    tensors
        .push(("h.0.attn.bias".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 1, 20, 20], &mask).unwrap()));
    let wte = st.tensor("transformer.wte.weight").unwrap();
    tensors.push(("lm_head.weight".into(), wte));
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    std::fs::copy(src.join("config.json"), out.path().join("config.json")).unwrap();
    assert_eq!(load_gpt2(out.path()).unwrap().params(), model.params());
}

#[test]
fn clear_errors_for_unsupported_or_broken_directories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_dir("gpt2_tiny").join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let err = load_gpt2(dir.path()).err().expect("pytorch_model.bin only must fail");
    assert!(matches!(err, HfError::PytorchBinOnly(_)));
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = load_gpt2(empty.path()).err().unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // weights that do not match config.json
    let mismatch = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_dir("gpt2_tiny").join("model.safetensors"), mismatch.path().join("model.safetensors")).unwrap();
    std::fs::copy(fixture_dir("gpt2_odd").join("config.json"), mismatch.path().join("config.json")).unwrap();
    let err = load_gpt2(mismatch.path()).err().unwrap();
    assert!(matches!(err, HfError::Shape { .. }), "{err}");

    // a config that is not GPT-2
    let bert = tempfile::tempdir().unwrap();
    std::fs::write(bert.path().join("config.json"), br#"{"model_type": "bert"}"#).unwrap();
    assert!(lmtrain_hf::load_config::<lmtrain_model::gpt2::Gpt2Config>(bert.path()).unwrap_err().to_string().contains("bert"));
}

/// A DeBERTa fixture's tensors, edited: `keep` decides which stay, `extra` are added
/// (`[rows, cols]` zeros).
fn edited_deberta_dir(name: &str, keep: impl Fn(&str) -> bool, extra: &[(&str, usize, usize)]) -> tempfile::TempDir {
    let src = fixture_dir(name);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<Vec<u8>> = extra.iter().map(|&(_, r, c)| vec![0u8; 4 * r * c]).collect();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.iter().filter(|(n, _)| keep(n)).map(|(n, v)| (n.to_string(), v)).collect();
    for (&(n, r, c), z) in extra.iter().zip(&zeros) {
        tensors.push((n.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![r, c], z).unwrap()));
    }
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    std::fs::copy(src.join("config.json"), out.path().join("config.json")).unwrap();
    out
}

#[test]
fn deberta_saves_loads_back_and_adapts_a_discriminator_checkpoint() {
    use lmtrain_hf::{LoadMode, load_params};
    use lmtrain_model::deberta::Deberta;
    for name in ["deberta_v2_odd", "deberta_v2_c2p_new_head", "deberta_v2_p2c_conv", "deberta_v2_tanh_conv", "deberta_v2_absolute"] {
        let src = fixture_dir(name);
        let model: Deberta<Cpu> = lmtrain_hf::load_model(Cpu, &src).unwrap();
        let out = tempfile::tempdir().unwrap();
        lmtrain_hf::save_model(&model, out.path()).unwrap();
        let again: Deberta<Cpu> = lmtrain_hf::load_model(Cpu, out.path()).unwrap();
        assert_eq!(again.params(), model.params(), "{name}");
        assert_eq!(again.config(), model.config(), "{name}");

        // an RTD discriminator (`mask_predictions.*`) without the MLM head: --init-from lists the
        // discriminator's tensors as unused and initialises the head
        let head = if model.config().legacy { "cls." } else { "lm_predictions." };
        let h = model.config().hidden_size;
        let disc = edited_deberta_dir(
            name,
            |n| !n.starts_with(head),
            &[("mask_predictions.dense.weight", h, h), ("mask_predictions.classifier.weight", 1, h)],
        );
        let err = lmtrain_hf::load_model::<Cpu, Deberta<Cpu>>(Cpu, disc.path()).err().expect("an exact load needs the head");
        assert!(err.to_string().contains(head), "{name}: {err}");
        let l = load_params::<Cpu, Deberta<Cpu>>(disc.path(), LoadMode::Adapt { seed: 3 }).unwrap();
        assert_eq!(l.unused, ["mask_predictions.classifier.weight", "mask_predictions.dense.weight"], "{name}");
        let mut want: Vec<&str> = model.param_infos().iter().map(|p| p.name.as_str()).filter(|n| n.starts_with(head)).collect();
        want.sort();
        let mut got: Vec<&str> = l.initialised.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, want, "{name}: the head is initialised fresh");
        // everything else is the checkpoint's
        for p in model.param_infos().iter().filter(|p| !p.name.starts_with(head)) {
            assert_eq!(&l.params[p.offset..p.offset + p.len], &model.params()[p.offset..p.offset + p.len], "{name}: {}", p.name);
        }
        // the head is Hugging Face's init: LayerNorm 1, biases 0
        let ln = model.param_infos().iter().find(|p| p.name.starts_with(head) && p.name.ends_with("LayerNorm.weight")).unwrap();
        assert!(l.params[ln.offset..ln.offset + ln.len].iter().all(|&x| x == 1.0), "{name}");
        Deberta::<Cpu>::from_params(Cpu, l.config, l.params).unwrap();
    }
}

#[test]
fn deberta_config_errors_name_the_key_and_value() {
    use lmtrain_model::ModelConfig;
    use lmtrain_model::deberta::DebertaV2Config;
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir("deberta_v2_odd").join("config.json")).unwrap()).unwrap();
    for (key, value, says) in [
        ("pos_att_type", serde_json::json!(["c2p", "p2p"]), "pos_att_type \"p2p\""),
        ("pos_att_type", serde_json::json!("c2p|x2y"), "pos_att_type \"x2y\""),
        ("norm_rel_ebd", serde_json::json!("batch_norm"), "norm_rel_ebd \"batch_norm\""),
        ("conv_kernel_size", serde_json::json!(4), "conv_kernel_size 4"),
        ("conv_groups", serde_json::json!(2), "conv_groups 2"),
        ("attention_head_size", serde_json::json!(7), "attention_head_size 7"),
        ("position_buckets", serde_json::json!(1), "position_buckets 1"),
        ("position_buckets", serde_json::json!(64), "position_buckets 64"),
        ("hidden_act", serde_json::json!("relu"), "hidden_act \"relu\""),
        ("z_steps", serde_json::json!(2), "z_steps 2"),
        ("conv_act", serde_json::json!("relu"), "conv_act \"relu\""),
    ] {
        let mut v = base.clone();
        v[key] = value;
        if key.starts_with("conv_") {
            v["conv_kernel_size"] =
                v.get("conv_kernel_size").cloned().filter(|_| key == "conv_kernel_size").unwrap_or(serde_json::json!(3));
            if key != "conv_act" {
                v["conv_act"] = serde_json::json!("tanh");
            }
        }
        let cfg: DebertaV2Config = serde_json::from_value(v).unwrap();
        let err = cfg.validate().expect_err(key).to_string();
        assert!(err.contains(says) && !err.contains('\n'), "{key}: {err}");
    }
    // the lm_predictions head ties to embeddings of the hidden width
    let mut v = base.clone();
    v["legacy"] = serde_json::json!(false);
    v["embedding_size"] = serde_json::json!(12);
    let err = serde_json::from_value::<DebertaV2Config>(v).unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("embedding_size 12"), "{err}");
}

#[test]
fn deberta_base_model_checkpoint_with_bare_names_gets_a_fresh_head() {
    // `DebertaV2Model.save_pretrained` writes the encoder without the `deberta.` prefix and no head
    use lmtrain_hf::{LoadMode, load_params};
    use lmtrain_model::deberta::Deberta;
    let src = fixture_dir("deberta_v2_odd");
    let model: Deberta<Cpu> = lmtrain_hf::load_model(Cpu, &src).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.iter().filter_map(|(n, v)| n.strip_prefix("deberta.").map(|bare| (bare.to_string(), v))).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let l = load_params::<Cpu, Deberta<Cpu>>(dir.path(), LoadMode::Adapt { seed: 1 }).unwrap();
    assert!(l.unused.is_empty(), "{:?}", l.unused);
    assert!(!l.initialised.is_empty() && l.initialised.iter().all(|n| n.starts_with("cls.")), "{:?}", l.initialised);
    for p in model.param_infos().iter().filter(|p| p.name.starts_with("deberta.")) {
        assert_eq!(&l.params[p.offset..p.offset + p.len], &model.params()[p.offset..p.offset + p.len], "{}", p.name);
    }
}
