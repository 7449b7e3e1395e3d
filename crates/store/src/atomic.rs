//! lmtrain's one way to replace a file: write a temporary file beside it
//! (`.NAME.PID.tmp`), fsync it, rename it over the target and fsync the directory, so a crash
//! or a power cut leaves the old file or the new one, never a torn or empty one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name [`write_atomic`] writes `path` under in this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Replaces `path` by `data` atomically and durably (see the module docs). On an error the
/// temporary file is removed and the old file, if any, is untouched.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path);
    Ok(())
}

/// Removes the temporary files that a killed [`write_atomic`] of `path` left behind
/// (`.NAME.PID.tmp` whose process is gone) and returns their paths; see [`remove_dead_temps`]
/// for the rule.
pub fn remove_stale_atomic_temps(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Ok(Vec::new()) };
    remove_dead_temps(parent_dir(path), false, |file| {
        let pid = file.strip_prefix('.')?.strip_prefix(name.as_str())?.strip_prefix('.')?.strip_suffix(".tmp")?;
        parse_pid(pid)
    })
}

/// `digits` as a process id (ASCII digits only, no sign or space).
pub fn parse_pid(digits: &str) -> Option<u32> {
    digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
}

/// Removes the entries of `dir` (plain files, or with `dirs` directories and all they
/// hold) for which `pid_of` gives the id of the process that wrote them (the name is one of our
/// temporary names) and no process with that id is running, and returns their paths. Only
/// entries that are provably ours and stale are touched: a live writer's, this process's own
/// included, stay, and where the running processes cannot be listed (no `/proc`) nothing is
/// removed. A missing directory removes nothing.
pub fn remove_dead_temps(dir: &Path, dirs: bool, pid_of: impl Fn(&str) -> Option<u32>) -> std::io::Result<Vec<PathBuf>> {
    if !Path::new("/proc/self").exists() {
        return Ok(Vec::new());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(pid) = pid_of(&entry.file_name().to_string_lossy()) else { continue };
        let kind = entry.file_type()?;
        if Path::new("/proc").join(pid.to_string()).exists() || !(kind.is_file() || dirs && kind.is_dir()) {
            continue; // that writer may still be running, or it is not what we write
        }
        let path = entry.path();
        match if kind.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) } {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The directory `path` is in (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Best effort: flush the directory entry of `path` so a rename survives a power loss (not every
/// platform can open a directory).
pub fn sync_parent(path: &Path) {
    if let Ok(d) = std::fs::File::open(parent_dir(path)) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
        // a target that cannot be written: an error, the temporary removed
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(write_atomic(&sub, b"x").is_err());
        assert!(!temp_path(&sub).exists());
    }

    #[test]
    fn only_stale_temporaries_of_the_target_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.safetensors");
        // 99999999 is above Linux's largest process id; process 1 always runs.
        let stale = [".model.safetensors.99999999.tmp"];
        let keep = [
            ".model.safetensors.1.tmp".to_string(),                   // a live writer
            format!(".model.safetensors.{}.tmp", std::process::id()), // this process
            ".model.safetensors.99999999x.tmp".into(),                // not a pid
            ".model.safetensors.99999999.tmp.keep".into(),            // not our suffix
            ".config.json.99999999.tmp".into(),                       // another target
            ".model.safetensors..tmp".into(),                         // no pid
            "model.safetensors".into(),
        ];
        for n in stale.iter().map(|s| s.to_string()).chain(keep.iter().cloned()) {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join(".model.safetensors.99999998.tmp")).unwrap(); // not a file
        let removed = remove_stale_atomic_temps(&target).unwrap();
        if !Path::new("/proc/self").exists() {
            assert!(removed.is_empty());
            return;
        }
        assert_eq!(removed, vec![dir.path().join(stale[0])]);
        for n in &keep {
            assert!(dir.path().join(n).exists(), "{n} must stay");
        }
        assert!(dir.path().join(".model.safetensors.99999998.tmp").is_dir());
        assert!(remove_stale_atomic_temps(&dir.path().join("missing/x")).unwrap().is_empty());
    }
}
