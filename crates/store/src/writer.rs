//! Incremental writer: blocks are appended as they are produced, so a corpus larger
//! than RAM streams straight to disk.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::StoreError;
use crate::format::{HEADER_LEN, Header, Layout, MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_VOCAB_SIZE, SpecialTokens, TokenDtype};

/// What a new store describes: everything in the header except the counts and checksum.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    /// Tokens per block (at least 1).
    pub block_size: u32,
    /// Vocabulary size (added tokens included); decides the token dtype.
    pub vocab_size: u32,
    /// Fingerprint of the tokenizer (`lmtrain_text::tokenizer_fingerprint`).
    pub tokenizer_fingerprint: u64,
    /// Special-token ids.
    pub special: SpecialTokens,
    /// Whether word-start bits are written (then every `push_block` must give them).
    pub word_starts: bool,
    /// How the documents were joined (recorded in the header).
    pub layout: Layout,
}

/// The kinds of temporary files a writer creates next to its target, as in
/// `.train.bin.tokens.<pid>-<n>.tmp`.
const TEMP_TAGS: [&str; 3] = ["tokens", "bits", "lengths"];

/// Removes the temporary files that a killed writer of `target` left behind, and returns
/// their paths. Only files that are provably ours and stale are touched: the name must be
/// exactly `.<target name>.<tokens|bits|lengths>.<pid>-<n>.tmp` next to `target`, and no
/// process with that id may be running (checked through `/proc`; where `/proc` is not
/// available nothing is removed). A live writer's files, including this process's own,
/// are left alone.
pub fn remove_stale_temp_files(target: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(Vec::new());
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !Path::new("/proc/self").exists() {
        return Ok(Vec::new());
    }
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::Io { path: dir, error: e }),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io(&dir))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_temp_pid(&file_name, &name) else { continue };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue; // that writer may still be running
        }
        let path = entry.path();
        if entry.file_type().map_err(StoreError::io(&path))?.is_file() {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path, error: e }),
            }
        }
    }
    Ok(removed)
}

/// The process id in `file_name` when it is one of our temporary names for `target_name`.
fn stale_temp_pid(file_name: &str, target_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?.strip_prefix(target_name)?.strip_prefix('.')?;
    let (tag, rest) = rest.split_once('.')?;
    if !TEMP_TAGS.contains(&tag) {
        return None;
    }
    let (pid, n) = rest.strip_suffix(".tmp")?.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// A temporary file that is deleted when dropped unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn next_to(target: &Path, tag: &str) -> TempFile {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Process id plus a counter: unique even when one process writes several stores.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = target.with_file_name(format!(".{name}.{tag}.{}-{n}.tmp", std::process::id()));
        TempFile { path, keep: false }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes a block store to a temporary file next to its destination.
///
/// Nothing appears under the destination name until [`FinishedStore::persist`]; dropping
/// the writer (for example on an error) removes the temporary files.
pub struct BlockWriter {
    target: PathBuf,
    spec: StoreSpec,
    dtype: TokenDtype,
    main_tmp: TempFile,
    main: BufWriter<File>,
    bits_tmp: TempFile,
    bits: BufWriter<File>,
    /// Per-block lengths (padded stores only).
    lengths: Option<(TempFile, BufWriter<File>)>,
    crc_tokens: crc32fast::Hasher,
    n_blocks: u64,
    scratch: Vec<u8>,
    padded: Vec<u32>,
    padded_starts: Vec<bool>,
}

/// A temporary file opened for writing and reading back.
fn side_file(target: &Path, tag: &str, capacity: usize) -> Result<(TempFile, BufWriter<File>), StoreError> {
    let tmp = TempFile::next_to(target, tag);
    let file = File::options().read(true).write(true).create(true).truncate(true).open(&tmp.path).map_err(StoreError::io(&tmp.path))?;
    Ok((tmp, BufWriter::with_capacity(capacity, file)))
}

/// Checks a spec against the format's limits.
fn check_spec(spec: &StoreSpec) -> Result<(), StoreError> {
    if spec.block_size == 0 {
        return Err(StoreError::ZeroBlockSize);
    }
    if spec.block_size > MAX_BLOCK_SIZE {
        return Err(StoreError::BadSpec(format!("block size {} is above the limit of {MAX_BLOCK_SIZE}", spec.block_size)));
    }
    if spec.vocab_size == 0 || spec.vocab_size > MAX_VOCAB_SIZE {
        return Err(StoreError::BadSpec(format!("vocabulary of {} tokens, allowed 1 to {MAX_VOCAB_SIZE}", spec.vocab_size)));
    }
    let s = &spec.special;
    for (name, id) in [("eos", s.eos), ("bos", s.bos), ("pad", s.pad), ("unk", s.unk), ("cls", s.cls), ("sep", s.sep), ("mask", s.mask)] {
        if let Some(id) = id
            && id >= spec.vocab_size
        {
            return Err(StoreError::BadSpec(format!("{name} token id {id} is outside the vocabulary of {} tokens", spec.vocab_size)));
        }
    }
    Ok(())
}

impl BlockWriter {
    /// Starts a store that will be renamed to `path` once finished and persisted.
    pub fn create(path: &Path, spec: StoreSpec) -> Result<BlockWriter, StoreError> {
        check_spec(&spec)?;
        let main_tmp = TempFile::next_to(path, "tokens");
        let mut main = BufWriter::with_capacity(1 << 20, File::create(&main_tmp.path).map_err(StoreError::io(&main_tmp.path))?);
        // Placeholder header; the real one is written by `finish` when counts are known.
        main.write_all(&[0u8; HEADER_LEN]).map_err(StoreError::io(&main_tmp.path))?;
        // Read back by `finish`, hence read + write.
        let (bits_tmp, bits) = side_file(path, "bits", 1 << 16)?;
        Ok(BlockWriter {
            target: path.to_path_buf(),
            dtype: TokenDtype::for_vocab(spec.vocab_size),
            spec,
            main_tmp,
            main,
            bits_tmp,
            bits,
            lengths: None,
            crc_tokens: crc32fast::Hasher::new(),
            n_blocks: 0,
            scratch: Vec::new(),
            padded: Vec::new(),
            padded_starts: Vec::new(),
        })
    }

    /// Starts a padded store (format version 2): blocks are written with
    /// [`push_padded_block`](BlockWriter::push_padded_block), each with its own length, and
    /// padded with the spec's pad id (which must be set).
    pub fn create_padded(path: &Path, spec: StoreSpec) -> Result<BlockWriter, StoreError> {
        if spec.special.pad.is_none() {
            return Err(StoreError::BadSpec("a padded store needs a pad token id".into()));
        }
        let mut w = BlockWriter::create(path, spec)?;
        w.lengths = Some(side_file(path, "lengths", 1 << 16)?);
        Ok(w)
    }

    /// Blocks written so far.
    pub fn n_blocks(&self) -> u64 {
        self.n_blocks
    }

    /// Appends one block. `tokens.len()` must equal the block size; `word_starts` must be
    /// given (same length) exactly when the spec asks for word-start bits.
    pub fn push_block(&mut self, tokens: &[u32], word_starts: Option<&[bool]>) -> Result<(), StoreError> {
        let bs = self.spec.block_size as usize;
        if tokens.len() != bs {
            return Err(StoreError::BlockLength { expected: bs, got: tokens.len() });
        }
        if self.lengths.is_some() {
            return self.push_padded_block(tokens, word_starts);
        }
        self.push_full(tokens, word_starts)
    }

    /// Appends one block of `tokens.len()` (1 to the block size) real tokens to a padded
    /// store, filling the rest with the pad id (word-start flags of padding are set).
    pub fn push_padded_block(&mut self, tokens: &[u32], word_starts: Option<&[bool]>) -> Result<(), StoreError> {
        let bs = self.spec.block_size as usize;
        if tokens.is_empty() || tokens.len() > bs {
            return Err(StoreError::BlockLength { expected: bs, got: tokens.len() });
        }
        let (pad, Some((tmp, lengths))) = (self.spec.special.pad, &mut self.lengths) else {
            return Err(StoreError::BadSpec("push_padded_block needs a writer from create_padded".into()));
        };
        let pad = pad.expect("checked by create_padded");
        lengths.write_all(&(tokens.len() as u32).to_le_bytes()).map_err(StoreError::io(&tmp.path))?;
        let mut padded = std::mem::take(&mut self.padded);
        padded.clear();
        padded.extend_from_slice(tokens);
        padded.resize(bs, pad);
        let mut starts = std::mem::take(&mut self.padded_starts);
        let result = match word_starts {
            Some(s) if s.len() != tokens.len() => Err(StoreError::BlockLength { expected: tokens.len(), got: s.len() }),
            Some(s) => {
                starts.clear();
                starts.extend_from_slice(s);
                starts.resize(bs, true);
                self.push_full(&padded, Some(&starts))
            }
            None => self.push_full(&padded, None),
        };
        self.padded = padded;
        self.padded_starts = starts;
        result
    }

    fn push_full(&mut self, tokens: &[u32], word_starts: Option<&[bool]>) -> Result<(), StoreError> {
        let bs = self.spec.block_size as usize;
        if self.n_blocks >= MAX_BLOCKS {
            return Err(StoreError::TooManyBlocks { path: self.target.clone(), max: MAX_BLOCKS });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id >= self.spec.vocab_size) {
            return Err(StoreError::TokenOutOfRange { id, vocab_size: self.spec.vocab_size });
        }
        self.scratch.clear();
        match self.dtype {
            TokenDtype::U16 => self.scratch.extend(tokens.iter().flat_map(|&t| (t as u16).to_le_bytes())),
            TokenDtype::U32 => self.scratch.extend(tokens.iter().flat_map(|&t| t.to_le_bytes())),
        }
        self.crc_tokens.update(&self.scratch);
        self.main.write_all(&self.scratch).map_err(StoreError::io(&self.main_tmp.path))?;
        match (self.spec.word_starts, word_starts) {
            (true, Some(starts)) => {
                if starts.len() != bs {
                    return Err(StoreError::BlockLength { expected: bs, got: starts.len() });
                }
                self.scratch.clear();
                self.scratch.resize(bs.div_ceil(8), 0);
                for (k, _) in starts.iter().enumerate().filter(|(_, s)| **s) {
                    self.scratch[k / 8] |= 1 << (k % 8);
                }
                self.bits.write_all(&self.scratch).map_err(StoreError::io(&self.bits_tmp.path))?;
            }
            (false, None) => {}
            (true, None) | (false, Some(_)) => return Err(StoreError::WordStartsMismatch),
        }
        self.n_blocks += 1;
        Ok(())
    }

    /// Completes the file under its temporary name: appends the word-start bits, writes
    /// the header with the final counts and checksum, and syncs. Call
    /// [`FinishedStore::persist`] to move it into place.
    pub fn finish(self) -> Result<FinishedStore, StoreError> {
        let BlockWriter { target, spec, dtype, main_tmp, main, bits_tmp, bits, lengths, mut crc_tokens, n_blocks, .. } = self;
        let main_path = main_tmp.path.clone();
        let io_main = || StoreError::io(&main_path);
        let mut main = main.into_inner().map_err(|e| StoreError::Io { path: main_path.clone(), error: e.into_error() })?;
        // Word-start bits, then lengths, follow the token array; the checksum covers them
        // all, in file order.
        let mut buf = vec![0u8; 1 << 20];
        let has_lengths = lengths.is_some();
        for (tmp, side) in std::iter::once((bits_tmp, bits)).chain(lengths) {
            let mut side = side.into_inner().map_err(|e| StoreError::Io { path: tmp.path.clone(), error: e.into_error() })?;
            side.seek(SeekFrom::Start(0)).map_err(StoreError::io(&tmp.path))?;
            loop {
                let n = side.read(&mut buf).map_err(StoreError::io(&tmp.path))?;
                if n == 0 {
                    break;
                }
                crc_tokens.update(&buf[..n]);
                main.write_all(&buf[..n]).map_err(io_main())?;
            }
        }
        let header = Header {
            // Version 1 unless the store needs version 2's lengths: older builds read it.
            version: if has_lengths { 2 } else { 1 },
            has_block_lengths: has_lengths,
            dtype,
            block_size: spec.block_size,
            n_blocks,
            n_tokens: n_blocks * spec.block_size as u64,
            vocab_size: spec.vocab_size,
            has_word_starts: spec.word_starts,
            tokenizer_fingerprint: spec.tokenizer_fingerprint,
            payload_crc32: crc_tokens.finalize(),
            eos: spec.special.eos,
            bos: spec.special.bos,
            pad: spec.special.pad,
            unk: spec.special.unk,
            cls: spec.special.cls,
            sep: spec.special.sep,
            mask: spec.special.mask,
            layout: spec.layout,
        };
        main.seek(SeekFrom::Start(0)).map_err(io_main())?;
        main.write_all(&header.encode()).map_err(io_main())?;
        main.sync_all().map_err(io_main())?;
        Ok(FinishedStore { tmp: main_tmp, target, header })
    }
}

/// A complete store under a temporary name, waiting to be renamed into place.
/// Dropping it without [`persist`](FinishedStore::persist) deletes it.
pub struct FinishedStore {
    tmp: TempFile,
    target: PathBuf,
    header: Header,
}

impl FinishedStore {
    /// The header that was written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Renames the file to its destination (atomic on one file system) and returns the header.
    pub fn persist(mut self) -> Result<Header, StoreError> {
        std::fs::rename(&self.tmp.path, &self.target).map_err(StoreError::io(&self.target))?;
        self.tmp.keep = true;
        Ok(self.header.clone())
    }
}
