//! lmtrain-hf: Hugging Face checkpoint directories (`config.json` + `model.safetensors`) in and
//! out, with Hugging Face tensor names, so `transformers` loads what lmtrain saves and lmtrain
//! starts from Hugging Face checkpoints.
//!
//! Generic over the model family: the tensors are the family's parameter declarations
//! ([`LanguageModel::param_table`]) and the per-family differences are the data of its
//! [`HfSpec`] (tied tensors that are not written and are ignored when present, a name prefix
//! old checkpoints lack, non-parameter buffers, renamed keys, the head a base-model checkpoint
//! lacks). Every shape is checked against the file's header before the parameters are
//! allocated.

mod checksums;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lmtrain_backend::Backend;
use lmtrain_model::{Footprint, HfSpec, LanguageModel, ModelConfig, ModelError, ParamInfo};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

pub use checksums::{CHECKSUMS_FILE, read_checked, write_checksums};

/// File name of the weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Errors reading or writing a Hugging Face checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (not a `source`: it is printed here, once).
        error: std::io::Error,
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
    /// A file disagrees with the directory's `checksums.json`.
    #[error("{path}: {msg}")]
    Damaged {
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
    /// The weights hold tensors this configuration does not have (an exact load must not drop
    /// weights silently).
    #[error("{path}: {} tensors are not part of the model config.json describes (does config.json have fewer layers than the weights?): {}", names.len(), names.join(", "))]
    Unused {
        /// The weights file.
        path: PathBuf,
        /// The tensors.
        names: Vec<String>,
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
    move |error| HfError::Io { path: path.to_path_buf(), error }
}

/// `model_type` of `dir/config.json` (which family to load it as).
pub fn read_model_type(dir: &Path) -> Result<String, HfError> {
    let value: serde_json::Value = read_config_json(dir)?;
    Ok(value.get("model_type").and_then(|v| v.as_str()).unwrap_or("").to_string())
}

/// `dir/config.json`, checked against the directory's checksums.
fn read_config_json<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, HfError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(HfError::Missing(path));
    }
    let text = read_checked(dir, CONFIG_FILE)?;
    serde_json::from_slice(&text).map_err(|source| HfError::Json { path, source })
}

/// Read and validate `dir/config.json` as configuration `C`.
pub fn load_config<C: ModelConfig>(dir: &Path) -> Result<C, HfError> {
    let path = dir.join(CONFIG_FILE);
    let cfg: C = read_config_json(dir)?;
    cfg.validate().map_err(|source| HfError::Model { path, source })?;
    Ok(cfg)
}

/// How strictly a checkpoint must match the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Every tensor present, nothing left over (checkpoints lmtrain wrote: resume, eval).
    Exact,
    /// `--init-from`: the family's head tensors may be missing (initialised fresh from `seed`)
    /// and tensors the model does not use are listed, as `transformers` warns.
    Adapt {
        /// Seed of the fresh tensors.
        seed: u64,
    },
}

/// Parameters read from a checkpoint directory.
#[derive(Debug)]
pub struct Loaded<C> {
    /// The validated configuration.
    pub config: C,
    /// The flat parameters, laid out as the family's parameter table.
    pub params: Vec<f32>,
    /// Tensors the checkpoint lacked and that were initialised fresh (`Adapt` only).
    pub initialised: Vec<String>,
    /// Tensors of the file the model does not use (`Adapt` only; an `Exact` load fails).
    pub unused: Vec<String>,
}

/// The name(s) a declared tensor may have in a file, best first.
fn candidate_names(spec: &HfSpec, name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    if let Some(bare) = spec.optional_prefix.and_then(|p| name.strip_prefix(p)) {
        out.push(bare.to_string());
    }
    for (old, new) in spec.renames {
        for n in out.clone() {
            if let Some(stem) = n.strip_suffix(new) {
                out.push(format!("{stem}{old}"));
            }
        }
    }
    out
}

/// Reads `dir` (`config.json` + `model.safetensors`, tensors in f32, f16 or bf16, converted to
/// f32) as family `M`'s parameters.
pub fn load_params<B: Backend, M: LanguageModel<B>>(dir: &Path, mode: LoadMode) -> Result<Loaded<M::Config>, HfError> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        if dir.join("pytorch_model.bin").is_file() {
            return Err(HfError::PytorchBinOnly(dir.to_path_buf()));
        }
        return Err(HfError::Missing(weights));
    }
    let config: M::Config = load_config(dir)?;
    let cfg_path = dir.join(CONFIG_FILE);
    let table = M::param_table(&config).map_err(|source| HfError::Model { path: cfg_path.clone(), source })?;
    let n_params = table.last().map_or(0, |p: &ParamInfo| p.offset + p.len);
    lmtrain_model::limits::check_params(n_params, Footprint::Inference)
        .map_err(|source| HfError::Model { path: cfg_path.clone(), source })?;
    let bytes = read_checked(dir, WEIGHTS_FILE)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    let spec = &M::HF;
    // 1. match every declared tensor to a file tensor and check its shape (nothing allocated yet)
    let mut used = std::collections::HashSet::new();
    let mut found: Vec<Option<TensorView<'_>>> = Vec::with_capacity(table.len());
    let mut initialised = Vec::new();
    for info in &table {
        let hit = candidate_names(spec, &info.name).into_iter().find_map(|n| st.tensor(&n).ok().map(|t| (n, t)));
        match hit {
            Some((n, t)) => {
                if t.shape() != info.shape.as_slice() {
                    return Err(HfError::Shape {
                        path: weights.clone(),
                        name: info.name.clone(),
                        expected: info.shape.clone(),
                        found: t.shape().to_vec(),
                    });
                }
                used.insert(n);
                found.push(Some(t));
            }
            None if matches!(mode, LoadMode::Adapt { .. }) && spec.head.iter().any(|h| info.name.starts_with(h)) => {
                initialised.push(info.name.clone());
                found.push(None);
            }
            None => return Err(HfError::MissingTensor { path: weights.clone(), name: info.name.clone() }),
        }
    }
    let ignored = |n: &str| spec.tied.contains(&n) || spec.buffers.iter().any(|b| n.ends_with(b));
    let mut unused: Vec<String> = st.names().into_iter().filter(|n| !used.contains(*n) && !ignored(n)).map(str::to_string).collect();
    unused.sort();
    if mode == LoadMode::Exact && !unused.is_empty() {
        return Err(HfError::Unused { path: weights, names: unused });
    }
    // 2. convert
    let mut params = match mode {
        LoadMode::Adapt { seed } if !initialised.is_empty() => lmtrain_model::params::init_params(&table, seed),
        _ => vec![0f32; n_params],
    };
    for (info, t) in table.iter().zip(&found) {
        if let Some(t) = t {
            to_f32(t, &mut params[info.offset..info.offset + info.len])
                .map_err(|msg| HfError::Safetensors { path: weights.clone(), msg: format!("{}: {msg}", info.name) })?;
        }
    }
    Ok(Loaded { config, params, initialised, unused })
}

/// Loads a checkpoint lmtrain (or `transformers`, for the same family) wrote, exactly, onto
/// `backend`.
pub fn load_model<B: Backend, M: LanguageModel<B>>(backend: B, dir: &Path) -> Result<M, HfError> {
    let l = load_params::<B, M>(dir, LoadMode::Exact)?;
    M::from_params(backend, l.config, l.params).map_err(|source| HfError::Model { path: dir.join(CONFIG_FILE), source })
}

/// Convert one tensor's little-endian data to f32.
fn to_f32(t: &TensorView<'_>, out: &mut [f32]) -> Result<(), String> {
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => out.iter_mut().zip(d.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => out.iter_mut().zip(d.chunks_exact(2)).for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => out.iter_mut().zip(d.chunks_exact(2)).for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        other => return Err(format!("dtype {other:?} is not supported (F32, F16, BF16)")),
    }
    Ok(())
}

/// Saves a model as Hugging Face does: `config.json` (with its `model_type` and
/// `architectures`) and `model.safetensors` (f32, HF names, metadata `format: pt`, tied tensors
/// not written). Each file is written under a temporary name, flushed, then renamed, so a crash
/// never leaves a half-written file in place.
pub fn save_model<B: Backend, M: LanguageModel<B>>(model: &M, dir: &Path) -> Result<(), HfError> {
    let params = model.params_to_host().map_err(|source| HfError::Model { path: dir.join(WEIGHTS_FILE), source })?;
    save_params::<B, M>(model.config(), model.param_infos(), &params, dir)
}

/// [`save_model`] from host parameters laid out as `infos` (e.g. the optimizer's f32 master
/// copy).
pub fn save_params<B: Backend, M: LanguageModel<B>>(
    config: &M::Config,
    infos: &[ParamInfo],
    params: &[f32],
    dir: &Path,
) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cfg = config.for_saving(&M::HF);
    let json = serde_json::to_string_pretty(&cfg).map_err(|source| HfError::Json { path: dir.join(CONFIG_FILE), source })?;
    let weights = dir.join(WEIGHTS_FILE);
    let views = infos
        .iter()
        .map(|p| {
            // safetensors data is little-endian, as f32 is in memory on every supported target
            let bytes: &[u8] = bytemuck::cast_slice(&params[p.offset..p.offset + p.len]);
            TensorView::new(Dtype::F32, p.shape.clone(), bytes).map(|v| (p.name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| HfError::Safetensors { path: weights.clone(), msg: e.to_string() })?;
    write_atomic(&weights, &data)?;
    write_atomic(&dir.join(CONFIG_FILE), format!("{json}\n").as_bytes())
}

/// [`lmtrain_store::write_atomic`] (lmtrain's one atomic-write helper) with this crate's error.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HfError> {
    lmtrain_store::write_atomic(path, data).map_err(io_err(path))
}
