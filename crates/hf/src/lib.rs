//! lmtrain-hf: Hugging Face checkpoint directories (`config.json` + `model.safetensors`) in and
//! out, with Hugging Face tensor names, so `transformers` loads what lmtrain saves and lmtrain
//! starts from any Hugging Face GPT-2 checkpoint.
//!
//! GPT-2 specifics handled here: `lm_head.weight` is tied to `transformer.wte.weight`, so it is
//! not written (as `save_pretrained` does) and ignored when present; checkpoints converted from
//! the original OpenAI release name tensors without the `transformer.` prefix and carry
//! attention-mask buffers (`attn.bias`, `attn.masked_bias`), which are accepted and skipped.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lmtrain_model::ModelError;
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// File name of the weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Errors reading or writing a Hugging Face checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory has only PyTorch pickle weights.
    #[error(
        "{0} holds pytorch_model.bin but no model.safetensors: pickle checkpoints are not supported; \
         convert it once in Python with `GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir)` \
         (which writes model.safetensors)"
    )]
    PytorchBinOnly(PathBuf),
    /// The directory lacks a file the format needs.
    #[error("{0} not found (a Hugging Face checkpoint directory has config.json and model.safetensors)")]
    Missing(PathBuf),
    /// config.json is not valid.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// model.safetensors is not valid.
    #[error("{path}: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A parameter the config requires is absent from the weights.
    #[error("{path}: tensor {name} is missing")]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// Hugging Face name.
        name: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("{path}: tensor {name} has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        /// The weights file.
        path: PathBuf,
        /// Hugging Face name.
        name: String,
        /// From the config.
        expected: Vec<usize>,
        /// In the file.
        found: Vec<usize>,
    },
    /// The configuration cannot be built.
    #[error("{path}: {source}")]
    Model {
        /// config.json.
        path: PathBuf,
        /// The cause.
        source: ModelError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io { path: path.to_path_buf(), source }
}

/// Read and validate `dir/config.json` as a GPT-2 configuration.
pub fn load_gpt2_config(dir: &Path) -> Result<Gpt2Config, HfError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(HfError::Missing(path));
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let cfg: Gpt2Config = serde_json::from_str(&text).map_err(|source| HfError::Json { path: path.clone(), source })?;
    cfg.validate().map_err(|source| HfError::Model { path, source })?;
    Ok(cfg)
}

/// Load a GPT-2 model (CPU) from a Hugging Face directory: `config.json` + `model.safetensors`
/// (f32, f16 or bf16 tensors; converted to f32).
pub fn load_gpt2(dir: &Path) -> Result<Gpt2, HfError> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        if dir.join("pytorch_model.bin").is_file() {
            return Err(HfError::PytorchBinOnly(dir.to_path_buf()));
        }
        return Err(HfError::Missing(weights));
    }
    let cfg = load_gpt2_config(dir)?;
    let bytes = std::fs::read(&weights).map_err(io_err(&weights))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    let layout = lmtrain_model::gpt2::param_layout(&cfg);
    let total = layout.last().map_or(0, |p| p.offset + p.len);
    let mut params = vec![0f32; total];
    for info in &layout {
        let bare = info.name.strip_prefix("transformer.").unwrap_or(&info.name);
        let t = st
            .tensor(&info.name)
            .or_else(|_| st.tensor(bare))
            .map_err(|_| HfError::MissingTensor { path: weights.clone(), name: info.name.clone() })?;
        if t.shape() != info.shape.as_slice() {
            return Err(HfError::Shape {
                path: weights.clone(),
                name: info.name.clone(),
                expected: info.shape.clone(),
                found: t.shape().to_vec(),
            });
        }
        to_f32(&t, &mut params[info.offset..info.offset + info.len])
            .map_err(|msg| HfError::Safetensors { path: weights.clone(), msg: format!("{}: {msg}", info.name) })?;
    }
    let cfg_path = dir.join(CONFIG_FILE);
    Gpt2::from_params(cfg, params).map_err(|source| HfError::Model { path: cfg_path, source })
}

/// Convert one tensor's little-endian data to f32.
fn to_f32(t: &TensorView<'_>, out: &mut [f32]) -> Result<(), String> {
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => out.iter_mut().zip(d.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => out
            .iter_mut()
            .zip(d.chunks_exact(2))
            .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => out
            .iter_mut()
            .zip(d.chunks_exact(2))
            .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        other => return Err(format!("dtype {other:?} is not supported (F32, F16, BF16)")),
    }
    Ok(())
}

/// Save a GPT-2 model as Hugging Face does: `config.json` (with `model_type: "gpt2"`,
/// `architectures: ["GPT2LMHeadModel"]`) and `model.safetensors` (f32, HF names, metadata
/// `format: pt`, tied `lm_head.weight` not written). Each file is written under a temporary
/// name, flushed, then renamed, so a crash never leaves a half-written file in place.
pub fn save_gpt2(model: &Gpt2, dir: &Path) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut cfg = model.config().clone();
    cfg.model_type = "gpt2".into();
    cfg.architectures = Some(vec!["GPT2LMHeadModel".into()]);
    let json = serde_json::to_string_pretty(&cfg).map_err(|source| HfError::Json { path: dir.join(CONFIG_FILE), source })?;
    let params = model.params();
    let weights = dir.join(WEIGHTS_FILE);
    let views = model
        .param_infos()
        .iter()
        .map(|p| {
            // safetensors data is little-endian, as f32 is in memory on every supported target
            let bytes: &[u8] = bytemuck::cast_slice(&params[p.offset..p.offset + p.len]);
            TensorView::new(Dtype::F32, p.shape.clone(), bytes).map(|v| (p.name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(meta))
        .map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    write_atomic(&weights, &data)?;
    write_atomic(&dir.join(CONFIG_FILE), format!("{json}\n").as_bytes())
}

/// Write `data` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HfError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))?;
    // make the rename itself durable; best effort (not every platform can open a directory)
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(if d.as_os_str().is_empty() { Path::new(".") } else { d }).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}
