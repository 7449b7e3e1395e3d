//! Incremental writer: blocks are appended as they are produced, so a corpus larger
//! than RAM streams straight to disk.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::{HEADER_LEN, Header, SpecialTokens, TokenDtype, VERSION};
use crate::StoreError;

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
    crc_tokens: crc32fast::Hasher,
    n_blocks: u64,
    scratch: Vec<u8>,
}

impl BlockWriter {
    /// Starts a store that will be renamed to `path` once finished and persisted.
    pub fn create(path: &Path, spec: StoreSpec) -> Result<BlockWriter, StoreError> {
        if spec.block_size == 0 {
            return Err(StoreError::ZeroBlockSize);
        }
        let main_tmp = TempFile::next_to(path, "tokens");
        let bits_tmp = TempFile::next_to(path, "bits");
        let mut main = BufWriter::with_capacity(
            1 << 20,
            File::create(&main_tmp.path).map_err(StoreError::io(&main_tmp.path))?,
        );
        // Placeholder header; the real one is written by `finish` when counts are known.
        main.write_all(&[0u8; HEADER_LEN]).map_err(StoreError::io(&main_tmp.path))?;
        let bits = BufWriter::with_capacity(
            1 << 16,
            // Read back by `finish`, hence read + write.
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&bits_tmp.path)
                .map_err(StoreError::io(&bits_tmp.path))?,
        );
        Ok(BlockWriter {
            target: path.to_path_buf(),
            dtype: TokenDtype::for_vocab(spec.vocab_size),
            spec,
            main_tmp,
            main,
            bits_tmp,
            bits,
            crc_tokens: crc32fast::Hasher::new(),
            n_blocks: 0,
            scratch: Vec::new(),
        })
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
        let BlockWriter { target, spec, dtype, main_tmp, main, bits_tmp, bits, mut crc_tokens, n_blocks, .. } =
            self;
        let main_path = main_tmp.path.clone();
        let io_main = || StoreError::io(&main_path);
        let mut main = main.into_inner().map_err(|e| StoreError::Io { path: main_path.clone(), source: e.into_error() })?;
        let mut bits = bits.into_inner().map_err(|e| StoreError::Io { path: bits_tmp.path.clone(), source: e.into_error() })?;
        // Word-start bits follow the token array; the checksum covers both, in file order.
        bits.seek(SeekFrom::Start(0)).map_err(StoreError::io(&bits_tmp.path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = bits.read(&mut buf).map_err(StoreError::io(&bits_tmp.path))?;
            if n == 0 {
                break;
            }
            crc_tokens.update(&buf[..n]);
            main.write_all(&buf[..n]).map_err(io_main())?;
        }
        drop(bits);
        drop(bits_tmp);
        let header = Header {
            version: VERSION,
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
