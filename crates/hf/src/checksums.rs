//! `checksums.json`: the size and CRC-32 of every file of a checkpoint directory, written last,
//! so a damaged file (a flipped bit, a truncation, a copy cut short) is found and named when
//! the directory is read. A directory without it (as Hugging Face writes them) is read
//! unchecked.
//!
//! CRC-32 finds every burst of up to 32 flipped bits and misses random damage with probability
//! 2^-32; it guards against accidents, not against someone who rewrites the manifest too.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::HfError;

/// File name of the manifest inside a checkpoint directory.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// What the manifest records of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    bytes: u64,
    /// CRC-32 (IEEE), 8 lower-case hex digits.
    #[serde(with = "hex32")]
    crc32: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    algorithm: String,
    files: BTreeMap<String, Entry>,
}

mod hex32 {
    pub fn serialize<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:08x}"))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        u32::from_str_radix(&text, 16).map_err(|_| serde::de::Error::custom(format!("crc32 {text:?} is not 8 hex digits")))
    }
}

fn entry_of(data: &[u8]) -> Entry {
    Entry { bytes: data.len() as u64, crc32: crc32fast::hash(data) }
}

/// Writes `dir/checksums.json` for `files` (names inside `dir`), read back from the disk, durably
/// ([`lmtrain_store::write_atomic`]). Call it after every listed file is complete.
pub fn write_checksums(dir: &Path, files: &[&str]) -> Result<(), HfError> {
    let mut entries = BTreeMap::new();
    for name in files {
        let path = dir.join(name);
        let io = |error| HfError::Io { path: path.clone(), error };
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let (mut hasher, mut bytes, mut buf) = (crc32fast::Hasher::new(), 0u64, vec![0u8; 1 << 20]);
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        entries.insert(name.to_string(), Entry { bytes, crc32: hasher.finalize() });
    }
    let manifest = Manifest { algorithm: "crc32".into(), files: entries };
    let path = dir.join(CHECKSUMS_FILE);
    let json = serde_json::to_string_pretty(&manifest).map_err(|source| HfError::Json { path: path.clone(), source })?;
    crate::write_atomic(&path, format!("{json}\n").as_bytes())
}

/// The manifest's entry for `name`, when `dir` has a manifest that lists it.
fn recorded(dir: &Path, name: &str) -> Result<Option<Entry>, HfError> {
    let path = dir.join(CHECKSUMS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(HfError::Io { path, error }),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| HfError::Damaged { path: path.clone(), msg: format!("not a valid checksum manifest ({e})") })?;
    if manifest.algorithm != "crc32" {
        return Err(HfError::Damaged { path, msg: format!("unknown checksum algorithm {:?} (expected crc32)", manifest.algorithm) });
    }
    Ok(manifest.files.get(name).copied())
}

/// Reads `dir/name`, checking it against `dir/checksums.json` when the directory has one that
/// lists the file; a mismatch is an error naming the file.
pub fn read_checked(dir: &Path, name: &str) -> Result<Vec<u8>, HfError> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(|error| HfError::Io { path: path.clone(), error })?;
    verify(dir, name, &data)?;
    Ok(data)
}

/// Checks bytes read from `dir/name` against the manifest (see [`read_checked`]).
fn verify(dir: &Path, name: &str, data: &[u8]) -> Result<(), HfError> {
    let Some(want) = recorded(dir, name)? else { return Ok(()) };
    let got = entry_of(data);
    if got != want {
        let what = if got.bytes != want.bytes {
            format!("{} bytes where {CHECKSUMS_FILE} records {}", got.bytes, want.bytes)
        } else {
            format!("CRC-32 {:08x} where {CHECKSUMS_FILE} records {:08x}", got.crc32, want.crc32)
        };
        return Err(HfError::Damaged { path: dir.join(name), msg: format!("the file is damaged ({what}); use another checkpoint") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_or_a_cut_is_named_and_an_intact_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.bin"), vec![7u8; 3000]).unwrap();
        std::fs::write(d.join("b.json"), b"{}").unwrap();
        // unlisted files and directories without a manifest read unchecked
        assert_eq!(read_checked(d, "a.bin").unwrap().len(), 3000);
        write_checksums(d, &["a.bin", "b.json"]).unwrap();
        assert_eq!(read_checked(d, "a.bin").unwrap(), vec![7u8; 3000]);
        let mut bytes = std::fs::read(d.join("a.bin")).unwrap();
        bytes[1234] ^= 0x10;
        std::fs::write(d.join("a.bin"), &bytes).unwrap();
        let e = read_checked(d, "a.bin").unwrap_err().to_string();
        assert!(e.contains("a.bin: the file is damaged (CRC-32 ") && e.ends_with("; use another checkpoint"), "{e}");
        std::fs::write(d.join("b.json"), b"{").unwrap();
        let e = read_checked(d, "b.json").unwrap_err().to_string();
        assert!(e.contains("b.json: the file is damaged (1 bytes where checksums.json records 2)"), "{e}");
        std::fs::write(d.join(CHECKSUMS_FILE), b"{\"algorithm\": \"crc32\", \"files\": {\"a.bin\": 5}}").unwrap();
        let e = read_checked(d, "a.bin").unwrap_err().to_string();
        assert!(e.contains("checksums.json: not a valid checksum manifest"), "{e}");
    }
}
