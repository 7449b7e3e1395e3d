//! The JSON Lines metrics log (`OUTPUT_DIR/metrics.jsonl`): one object per line, written and
//! flushed as it happens, so a crash or a NaN stop keeps everything logged before it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::TrainerError;

/// File name of the metrics log inside the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appending writer of `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (appends to) the log in `output_dir`, first dropping the records of steps after
    /// `keep_up_to_step`: on a resume those were written by the interrupted run after its
    /// checkpoint, on a fresh run (0) by an earlier run; either way the log then reads like
    /// one uninterrupted run.
    pub fn open(output_dir: &Path, keep_up_to_step: u64) -> Result<Self, TrainerError> {
        let path = output_dir.join(METRICS_FILE);
        let limit = keep_up_to_step;
        if path.exists() {
            // Keep the kept lines' original text: re-serialising a parsed record could change
            // the last digit of a float, and the log must read like one uninterrupted run.
            let kept: Vec<String> = read_lines(&path)?
                .into_iter()
                .filter(|(_, v)| v.get("step").and_then(Value::as_u64).is_some_and(|s| s <= limit))
                .map(|(line, _)| line)
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            lmtrain_store::write_atomic(&path, text.as_bytes()).map_err(|e| TrainerError::io(&path, e))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainerError::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Flushes the log to the disk, so the records up to a checkpoint survive a power cut with it.
    pub fn sync(&self) -> Result<(), TrainerError> {
        self.file.sync_data().map_err(|e| TrainerError::io(&self.path, e))
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Value) -> Result<(), TrainerError> {
        let mut line = record.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| TrainerError::io(&self.path, e))
    }
}

/// Reads every record of a metrics log.
pub fn read_records(path: &Path) -> Result<Vec<Value>, TrainerError> {
    Ok(read_lines(path)?.into_iter().map(|(_, v)| v).collect())
}

/// Every non-blank line of a metrics log with its parsed record. A last line without its line
/// break that does not parse is a record cut short by a crash or a power cut, and is left out.
fn read_lines(path: &Path) -> Result<Vec<(String, Value)>, TrainerError> {
    let f = File::open(path).map_err(|e| TrainerError::io(path, e))?;
    let mut reader = BufReader::new(f);
    let mut out = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| TrainerError::io(path, e))? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(text) {
            Ok(v) => out.push((text.to_string(), v)),
            Err(_) if !line.ends_with('\n') => break, // the torn last record
            Err(e) => return Err(TrainerError::Checkpoint { path: path.to_path_buf(), msg: e.to_string() }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_drops_records_after_the_resume_step() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), 0).unwrap();
        for s in 1..=6 {
            log.write(&serde_json::json!({"step": s, "loss": s as f64})).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(tmp.path(), 4).unwrap();
        log.write(&serde_json::json!({"step": 5, "loss": 0.5})).unwrap();
        let steps: Vec<(u64, f64)> = read_records(&tmp.path().join(METRICS_FILE))
            .unwrap()
            .iter()
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect();
        assert_eq!(steps, vec![(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.5)]);
        // a fresh run (step 0) starts an empty log
        drop(log);
        MetricsLog::open(tmp.path(), 0).unwrap();
        assert!(read_records(&tmp.path().join(METRICS_FILE)).unwrap().is_empty());
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_left_out_and_one_damaged_inside_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"lo").unwrap();
        drop(MetricsLog::open(tmp.path(), 5).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
        // zeros a power cut can leave at the end of an appended file
        std::fs::write(&path, b"{\"step\":1}\n\0\0\0\0").unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 1);
        std::fs::write(&path, "{\"step\":1}\n{\"st\n{\"step\":3}\n").unwrap();
        assert!(MetricsLog::open(tmp.path(), 5).is_err(), "a damaged record before the end is not a torn write");
    }

    #[test]
    fn reopening_keeps_kept_lines_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(METRICS_FILE);
        // 0.1 + 0.2 has a 17-digit shortest form, the kind a parse/print round trip can alter.
        let text = "{\"epoch\":0.30000000000000004,\"step\":1}\n{\"epoch\":0.010638297872340425,\"step\":2}\n{\"step\":3}\n";
        std::fs::write(&path, text).unwrap();
        drop(MetricsLog::open(tmp.path(), 2).unwrap());
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, text.lines().take(2).map(|l| format!("{l}\n")).collect::<String>());
    }
}
