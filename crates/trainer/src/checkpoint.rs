//! Checkpoints: `OUTPUT_DIR/checkpoint-STEP/` with the Hugging Face model files, the tokenizer,
//! the AdamW moments (`optimizer.safetensors`) and the loop position (`trainer_state.json`).
//!
//! A checkpoint is written into a hidden temporary directory and renamed into place, so a
//! crash leaves either the previous set of checkpoints or the new one, never half a directory.
//! Every file is fsynced before the rename, and the directory after it, so a power cut cannot
//! leave a renamed but empty checkpoint either; `checksums.json` (written last) records the size
//! and CRC-32 of every file, and reading a checkpoint names a file that no longer matches.

use std::fs;
use std::path::{Path, PathBuf};

use lmtrain_backend::Backend;
use lmtrain_model::LanguageModel;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::args::TrainingArgs;

/// File name of the loop state inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// File name of the optimizer moments inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the tokenizer inside a checkpoint / output directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Where the training loop stands; everything besides the weights and moments needed to
/// continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub global_step: u64,
    /// Index of the epoch the next step belongs to.
    pub epoch: u64,
    /// Optimizer steps already taken inside that epoch; the next micro-batch starts at block
    /// position `step_in_epoch * batch * accumulation` of the epoch's shuffled order.
    pub step_in_epoch: u64,
    /// Total optimizer steps of the run.
    pub max_steps: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Run seed. The data order of epoch `e` is `EpochOrder::new(n, seed, e)` and the dropout
    /// masks of a micro-batch are a pure function of `(seed, global_step, micro-batch)`, so
    /// `(seed, epoch, step_in_epoch, global_step)` IS the complete random-number state.
    pub seed: u64,
    /// Lowest evaluation loss seen so far.
    pub best_metric: Option<f64>,
    /// Checkpoint directory that holds the best model.
    pub best_model_checkpoint: Option<PathBuf>,
    /// The arguments of the run, for the record.
    pub args: TrainingArgs,
}

/// The files of a checkpoint (besides the manifest), all listed in its `checksums.json`.
pub const FILES: [&str; 5] = [lmtrain_hf::CONFIG_FILE, lmtrain_hf::WEIGHTS_FILE, TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE];

/// Files the trainer replaces in the output directory with [`lmtrain_store::write_atomic`].
const OUTPUT_FILES: [&str; 4] = [lmtrain_hf::CONFIG_FILE, lmtrain_hf::WEIGHTS_FILE, TOKENIZER_FILE, crate::metrics::METRICS_FILE];

/// Removes what an interrupted run left in `output_dir` when its process is gone: half-written
/// checkpoint directories (`.checkpoint-STEP.PID.tmp`) and the temporary files of the final
/// model save or a metrics rewrite (`.NAME.PID.tmp`, see
/// [`lmtrain_store::remove_stale_atomic_temps`]). Returns their paths.
pub fn remove_stale_temps(output_dir: &Path) -> Result<Vec<PathBuf>, TrainerError> {
    let io = |e| TrainerError::io(output_dir, e);
    let mut removed = lmtrain_store::remove_dead_temps(output_dir, true, |name| {
        let (step, pid) = name.strip_prefix(".checkpoint-")?.strip_suffix(".tmp")?.split_once('.')?;
        step.parse::<u64>().ok()?;
        lmtrain_store::parse_pid(pid)
    })
    .map_err(io)?;
    for name in OUTPUT_FILES {
        removed.extend(lmtrain_store::remove_stale_atomic_temps(&output_dir.join(name)).map_err(io)?);
    }
    Ok(removed)
}

/// Finishes a re-save of `checkpoint-N` that a crash interrupted between its two renames (see
/// `replace_dir`): a `checkpoint-N.old` whose replacement is complete is removed; one whose
/// replacement never arrived is put back as `checkpoint-N`. Returns what it restored and what
/// it removed.
pub fn recover_replaced(output_dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), TrainerError> {
    let (mut restored, mut removed) = (Vec::new(), Vec::new());
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((restored, removed)),
        Err(e) => return Err(TrainerError::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainerError::io(output_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("checkpoint-")?.strip_suffix(".old")?.parse::<u64>().ok()) else {
            continue;
        };
        let (old, current) = (entry.path(), output_dir.join(checkpoint_name(step)));
        if !old.join(STATE_FILE).is_file() {
            continue; // not a checkpoint lmtrain wrote: left alone
        }
        if current.join(STATE_FILE).is_file() {
            fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))?;
            removed.push(old);
        } else if !current.exists() {
            fs::rename(&old, &current).map_err(|e| TrainerError::io(&old, e))?;
            restored.push(current);
        }
    }
    Ok((restored, removed))
}

/// Name of the checkpoint directory for `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Existing `checkpoint-N` directories of `output_dir`, sorted by step.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainerError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainerError::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainerError::io(output_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("checkpoint-")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What a checkpoint holds besides the loop state: the f32 parameters (the master copy, not a
/// bf16 working copy) and the AdamW moments.
pub struct Tensors<'a> {
    /// Parameters, laid out as the model's parameter table.
    pub params: &'a [f32],
    /// AdamW first moments.
    pub exp_avg: &'a [f32],
    /// AdamW second moments.
    pub exp_avg_sq: &'a [f32],
}

/// Writes a complete checkpoint for `state.global_step` atomically and returns its path.
pub fn save<B: Backend, M: LanguageModel<B>>(
    output_dir: &Path,
    model: &M,
    tensors: Tensors<'_>,
    tokenizer_json: &[u8],
    state: &TrainerState,
) -> Result<PathBuf, TrainerError> {
    let name = checkpoint_name(state.global_step);
    let final_dir = output_dir.join(&name);
    // the process id marks it as this run's: a rerun removes it once this process is gone
    let tmp = output_dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::create_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
    // every file durable (fsynced) before the manifest, the manifest before the rename
    lmtrain_hf::save_params::<B, M>(model.config(), model.param_infos(), tensors.params, &tmp)?;
    lmtrain_hf::write_atomic(&tmp.join(TOKENIZER_FILE), tokenizer_json)?;
    write_moments(&tmp.join(OPTIMIZER_FILE), tensors.exp_avg, tensors.exp_avg_sq)?;
    let json = serde_json::to_vec_pretty(state).expect("trainer state serializes");
    lmtrain_hf::write_atomic(&tmp.join(STATE_FILE), &json)?;
    lmtrain_hf::write_checksums(&tmp, &FILES)?;
    sync_dir(&tmp);
    replace_dir(&tmp, &final_dir)?;
    sync_dir(output_dir);
    Ok(final_dir)
}

/// Moves `src` to `dst`, replacing an existing `dst` (a re-save of the same step after a
/// resume) without ever leaving `dst` missing while `src` is incomplete.
fn replace_dir(src: &Path, dst: &Path) -> Result<(), TrainerError> {
    if dst.exists() {
        let old = dst.with_extension("old");
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))?;
        }
        fs::rename(dst, &old).map_err(|e| TrainerError::io(dst, e))?;
        fs::rename(src, dst).map_err(|e| TrainerError::io(dst, e))?;
        fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))?;
    } else {
        fs::rename(src, dst).map_err(|e| TrainerError::io(dst, e))?;
    }
    Ok(())
}

/// Best effort: flush a directory's entries so the renames survive a power loss.
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_moments(path: &Path, exp_avg: &[f32], exp_avg_sq: &[f32]) -> Result<(), TrainerError> {
    let m: &[u8] = bytemuck::cast_slice(exp_avg);
    let v: &[u8] = bytemuck::cast_slice(exp_avg_sq);
    let views = [
        ("exp_avg", TensorView::new(Dtype::F32, vec![exp_avg.len()], m).expect("valid view")),
        ("exp_avg_sq", TensorView::new(Dtype::F32, vec![exp_avg_sq.len()], v).expect("valid view")),
    ];
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| TrainerError::Checkpoint { path: path.to_path_buf(), msg: e.to_string() })?;
    // streamed to the file (no second copy of the moments in memory), then flushed to the disk
    fs::OpenOptions::new().write(true).open(path).and_then(|f| f.sync_all()).map_err(|e| TrainerError::io(path, e))
}

/// Everything a checkpoint restores besides the weights.
pub struct Restored {
    /// The loop state.
    pub state: TrainerState,
    /// AdamW first moments.
    pub exp_avg: Vec<f32>,
    /// AdamW second moments.
    pub exp_avg_sq: Vec<f32>,
}

/// Reads the trainer state and optimizer moments of a checkpoint directory.
pub fn load_state(dir: &Path) -> Result<Restored, TrainerError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = lmtrain_hf::read_checked(dir, STATE_FILE)?;
    let state: TrainerState =
        serde_json::from_slice(&bytes).map_err(|e| TrainerError::Checkpoint { path: state_path.clone(), msg: e.to_string() })?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = lmtrain_hf::read_checked(dir, OPTIMIZER_FILE)?;
    let bad = |msg: String| TrainerError::Checkpoint { path: opt_path.clone(), msg };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str| -> Result<Vec<f32>, TrainerError> {
        let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is {:?}, expected F32", t.dtype())));
        }
        // The mmap'd bytes need not be 4-aligned: copy element-wise.
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    Ok(Restored { exp_avg: read("exp_avg")?, exp_avg_sq: read("exp_avg_sq")?, state })
}

/// Deletes the oldest checkpoints beyond `limit`, never the newest one and never the one
/// named like `keep` (the best model), as HF does: with a limit of 1 and a best model that is
/// not the latest, two checkpoints remain.
pub fn rotate(output_dir: &Path, limit: usize, keep: Option<&Path>) -> Result<(), TrainerError> {
    let all = list_checkpoints(output_dir)?;
    let mut excess = all.len().saturating_sub(limit);
    let keep_name = keep.and_then(|k| k.file_name());
    for (_, path) in all.iter().take(all.len().saturating_sub(1)) {
        if excess == 0 {
            break;
        }
        if keep_name.is_some() && path.file_name() == keep_name {
            continue;
        }
        fs::remove_dir_all(path).map_err(|e| TrainerError::io(path, e))?;
        excess -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(dir: &Path, step: u64) -> PathBuf {
        let p = dir.join(checkpoint_name(step));
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join(STATE_FILE), "{}").unwrap();
        p
    }

    fn steps(dir: &Path) -> Vec<u64> {
        list_checkpoints(dir).unwrap().into_iter().map(|c| c.0).collect()
    }

    #[test]
    fn listing_sorts_numerically_and_skips_incomplete_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        for s in [100, 20, 3] {
            fake_checkpoint(tmp.path(), s);
        }
        fs::create_dir_all(tmp.path().join("checkpoint-7")).unwrap(); // no state file: not a checkpoint
        fs::create_dir_all(tmp.path().join(".checkpoint-8.12.tmp")).unwrap();
        assert_eq!(steps(tmp.path()), vec![3, 20, 100]);
    }

    #[test]
    fn rotation_keeps_the_newest_and_the_best() {
        let tmp = tempfile::tempdir().unwrap();
        let best = fake_checkpoint(tmp.path(), 1);
        for s in 2..=5 {
            fake_checkpoint(tmp.path(), s);
        }
        rotate(tmp.path(), 2, Some(&best)).unwrap();
        assert_eq!(steps(tmp.path()), vec![1, 5]);
        // limit 1 with the best not the newest: both stay (as HF)
        rotate(tmp.path(), 1, Some(&best)).unwrap();
        assert_eq!(steps(tmp.path()), vec![1, 5]);
        rotate(tmp.path(), 1, None).unwrap();
        assert_eq!(steps(tmp.path()), vec![5]);
    }
}
