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
