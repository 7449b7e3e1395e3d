//! Zero-copy reader over a memory-mapped store.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::StoreError;
use crate::format::{HEADER_LEN, Header, TokenDtype};

/// Buffer size of the payload scan (a multiple of both token widths).
const SCAN_BUF: usize = 1 << 20;

/// After about this many bytes of pages have been touched through the map, the reader tells the kernel it
/// no longer needs the pages it touched. Pages of a file mapping stay counted in the
/// process's resident set until they are unmapped or released, so without this a full
/// epoch over a 1 GB store would show ~1 GB resident even though the data only ever sits
/// in the (shared, reclaimable) page cache.
const RELEASE_EVERY_BYTES: usize = 32 << 20;
const PAGE: usize = 4096;

/// A block store opened for reading. Blocks are read by index straight from the mapped
/// file; the file is never loaded into memory as a whole. `BlockStore` is `Sync`: several
/// threads may read blocks at once.
pub struct BlockStore {
    path: PathBuf,
    header: Header,
    map: Mmap,
    since_release: AtomicUsize,
    /// Largest token id in the payload, when it was scanned (`None` before, or when empty).
    max_token_id: Option<u32>,
}

impl BlockStore {
    /// Opens a store and checks all of it: the magic, version, header checksum and limits
    /// (see [`format`](mod@crate::format)), that the file length matches the header, and then
    /// the payload in one streaming pass: its CRC-32 against the header and every token id
    /// against the header's vocabulary (and, for padded stores, every block length). After
    /// `open` succeeds every id read from the store is below `header().vocab_size`, so a
    /// caller only has to compare that with its model's vocabulary.
    ///
    /// The pass reads the file with ordinary buffered reads (the resident set does not grow)
    /// at memory speed when the file is in the page cache: about 0.03 s per 100 MB measured
    /// on this project's 2-core CI machine (disk speed otherwise, and then the pages are
    /// cached for the training that follows). [`open_unverified`](BlockStore::open_unverified)
    /// skips it.
    pub fn open(path: &Path) -> Result<BlockStore, StoreError> {
        let mut store = BlockStore::open_unverified(path)?;
        store.max_token_id = store.scan_payload()?;
        Ok(store)
    }

    /// Opens a store checking only the header and the file length, not the payload (for
    /// tools that only look at the header). Token ids read from such a store may be out of
    /// range if the file is damaged: call [`verify`](BlockStore::verify) before trusting them.
    pub fn open_unverified(path: &Path) -> Result<BlockStore, StoreError> {
        let mut file = File::open(path).map_err(StoreError::io(path))?;
        let meta = file.metadata().map_err(StoreError::io(path))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile { path: path.to_path_buf() });
        }
        let actual = meta.len();
        let mut head = Vec::with_capacity(HEADER_LEN);
        (&mut file).take(HEADER_LEN as u64).read_to_end(&mut head).map_err(StoreError::io(path))?;
        let header = Header::decode(path, &head)?;
        // `decode` has checked that this does not overflow.
        let expected = header.file_len();
        if actual != expected {
            return Err(StoreError::SizeMismatch { path: path.to_path_buf(), expected, actual });
        }
        if usize::try_from(expected).is_err() {
            return Err(StoreError::CorruptHeader {
                path: path.to_path_buf(),
                detail: format!("{expected} bytes do not fit this machine's address space"),
            });
        }
        // SAFETY: the map is read-only. As with every memory map, another process truncating
        // the file while it is mapped would fault; stores are written under a temporary name
        // and renamed into place, so a store in use is never rewritten in place.
        let map = unsafe { Mmap::map(&file) }.map_err(StoreError::io(path))?;
        // Training reads blocks in shuffled order. MADV_RANDOM turns off read-ahead and the
        // kernel's "fault-around", which would otherwise map up to 16 neighbouring cached
        // pages into the process on every fault and inflate the resident set 16-fold.
        if !map.is_empty() {
            map.advise(Advice::Random).map_err(StoreError::io(path))?;
        }
        Ok(BlockStore { path: path.to_path_buf(), header, map, since_release: AtomicUsize::new(0), max_token_id: None })
    }

    /// The store's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file the store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.header.n_blocks as usize
    }

    /// Whether the store holds no block.
    pub fn is_empty(&self) -> bool {
        self.header.n_blocks == 0
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.header.block_size as usize
    }

    /// Largest token id in the store, known once the payload was checked by
    /// [`open`](BlockStore::open) or [`verify`](BlockStore::verify); `None` for an empty
    /// store or one opened with [`open_unverified`](BlockStore::open_unverified).
    pub fn max_token_id(&self) -> Option<u32> {
        self.max_token_id
    }

    /// Checks that every token id of the (verified) store is below `vocab_size`, the
    /// vocabulary of the model that will read it: the call a trainer or evaluator makes once
    /// after [`open`](BlockStore::open). Fails with one line naming the file, the largest id
    /// and both vocabularies.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), StoreError> {
        let too_big = |id: u32| (id as usize) >= vocab_size;
        let id = match self.max_token_id {
            Some(id) => id,
            // Unverified: the header's bound is all that is known.
            None if !self.is_empty() => self.header.vocab_size - 1,
            None => return Ok(()),
        };
        if too_big(id) {
            return Err(StoreError::VocabMismatch { path: self.path.clone(), max_id: id, store_vocab: self.header.vocab_size, vocab_size });
        }
        Ok(())
    }

    /// Real (unpadded) tokens at the start of block `i`: the block size, except in padded
    /// (line-by-line) stores, where positions from this length on hold the pad id and are
    /// masked out.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn block_len(&self, i: usize) -> usize {
        assert!(i < self.len(), "block {i} out of range: the store has {} blocks", self.len());
        if !self.header.has_block_lengths {
            return self.block_size();
        }
        let at = self.lengths_offset() + 4 * i;
        self.note_read(4);
        u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    /// Whether the store holds padded blocks with per-block lengths (`train prepare --line-by-line`).
    pub fn is_padded(&self) -> bool {
        self.header.has_block_lengths
    }

    /// Writes block `i`'s attention mask into `out`: 1 for real tokens, 0 for padding.
    ///
    /// # Panics
    /// If `i >= self.len()` or `out.len() != block_size`.
    pub fn attention_mask(&self, i: usize, out: &mut [u8]) {
        assert_eq!(out.len(), self.block_size(), "attention_mask: output length must equal the block size");
        let len = self.block_len(i);
        out[..len].fill(1);
        out[len..].fill(0);
    }

    fn lengths_offset(&self) -> usize {
        HEADER_LEN + self.header.token_bytes() as usize + self.header.word_start_bytes() as usize
    }

    /// The raw little-endian bytes of block `i`'s tokens (zero-copy).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn block_bytes(&self, i: usize) -> &[u8] {
        assert!(i < self.len(), "block {i} out of range: the store has {} blocks", self.len());
        let width = self.header.dtype.width();
        let len = self.block_size() * width;
        let start = HEADER_LEN + i * len;
        self.note_read(len);
        &self.map[start..start + len]
    }

    /// Block `i`'s tokens as `u16` without copying, when the store holds u16 tokens.
    /// (The payload starts 128 bytes into a page-aligned map, so it is aligned.)
    pub fn block_u16(&self, i: usize) -> Option<&[u16]> {
        (self.header.dtype == TokenDtype::U16 && cfg!(target_endian = "little")).then(|| bytemuck::cast_slice(self.block_bytes(i)))
    }

    /// Copies block `i` into `out`, widening u16 ids to u32.
    ///
    /// # Panics
    /// If `i >= self.len()` or `out.len() != block_size`.
    pub fn read_block(&self, i: usize, out: &mut [u32]) {
        assert_eq!(out.len(), self.block_size(), "read_block: output length must equal the block size");
        let bytes = self.block_bytes(i);
        match self.header.dtype {
            TokenDtype::U16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]) as u32;
                }
            }
            TokenDtype::U32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }

    /// Writes into `out` whether each token of block `i` starts a word (as the tokenizer's
    /// word ids say; special tokens count as word starts). A store without word-start bits
    /// reports every token as a word start.
    ///
    /// # Panics
    /// If `i >= self.len()` or `out.len() != block_size`.
    pub fn word_starts(&self, i: usize, out: &mut [bool]) {
        assert!(i < self.len(), "block {i} out of range: the store has {} blocks", self.len());
        assert_eq!(out.len(), self.block_size(), "word_starts: output length must equal the block size");
        if !self.header.has_word_starts {
            out.fill(true);
            return;
        }
        let per_block = self.header.word_start_bytes_per_block();
        let start = HEADER_LEN + self.header.token_bytes() as usize + i * per_block;
        let bits = &self.map[start..start + per_block];
        self.note_read(per_block);
        for (k, o) in out.iter_mut().enumerate() {
            *o = bits[k / 8] >> (k % 8) & 1 == 1;
        }
    }

    /// Checks the payload again (what [`open`](BlockStore::open) does): its checksum, every
    /// token id below the header's vocabulary and every block length. Reads the file with
    /// ordinary buffered reads (not through the map), so it does not grow the resident set.
    pub fn verify(&self) -> Result<(), StoreError> {
        self.scan_payload().map(|_| ())
    }

    /// One pass over the payload: CRC-32, largest token id (and where the first id outside
    /// the vocabulary is), block lengths. Returns the largest id.
    fn scan_payload(&self) -> Result<Option<u32>, StoreError> {
        let h = &self.header;
        let io = |e| StoreError::Io { path: self.path.clone(), error: e };
        let mut file = File::open(&self.path).map_err(io)?;
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head).map_err(io)?;
        let token_bytes = h.token_bytes();
        let width = h.dtype.width() as u64;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; SCAN_BUF];
        let mut at = 0u64; // payload offset of buf[0]
        let mut max: Option<u32> = None;
        let mut first_bad: Option<(u64, u32)> = None;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            if at < token_bytes {
                // Token bytes of this chunk; `at` and SCAN_BUF are multiples of the width.
                let end = (token_bytes - at).min(n as u64) as usize;
                let toks = &chunk[..end - end % width as usize];
                // Two loops the compiler vectorises (one generic closure would not be).
                let m = match h.dtype {
                    TokenDtype::U16 => toks.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).max(),
                    TokenDtype::U32 => toks.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).max(),
                };
                if let Some(m) = m {
                    max = Some(max.map_or(m, |x| x.max(m)));
                    if m >= h.vocab_size && first_bad.is_none() {
                        let (k, id) = toks
                            .chunks_exact(width as usize)
                            .map(decode_id)
                            .enumerate()
                            .find(|&(_, id)| id >= h.vocab_size)
                            .expect("the maximum is in the chunk");
                        first_bad = Some((at / width + k as u64, id));
                    }
                }
            }
            at += n as u64;
        }
        let computed = hasher.finalize();
        if computed != h.payload_crc32 {
            return Err(StoreError::ChecksumMismatch { path: self.path.clone(), stored: h.payload_crc32, computed });
        }
        if let Some((token, id)) = first_bad {
            return Err(StoreError::PayloadTokenOutOfRange {
                path: self.path.clone(),
                id,
                block: token / h.block_size as u64,
                vocab_size: h.vocab_size,
            });
        }
        if h.has_block_lengths {
            let start = self.lengths_offset();
            for (i, b) in self.map[start..].chunks_exact(4).enumerate() {
                let len = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                if len == 0 || len > h.block_size {
                    return Err(StoreError::CorruptHeader {
                        path: self.path.clone(),
                        detail: format!("block {i} has length {len}, allowed 1 to {}", h.block_size),
                    });
                }
            }
            // Those pages were only needed for the check.
            // SAFETY: as in `note_read`: read-only shared file mapping, contents unchanged.
            let _ = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) };
        }
        Ok(max)
    }

    /// Counts the pages a read of `bytes` may touch and, every `RELEASE_EVERY_BYTES`, drops
    /// the process's references to the mapped pages (they stay in the page cache).
    fn note_read(&self, bytes: usize) {
        // A read may straddle a page boundary: charge one page more than its length.
        let bytes = bytes.next_multiple_of(PAGE) + PAGE;
        let before = self.since_release.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes >= RELEASE_EVERY_BYTES {
            self.since_release.store(0, Ordering::Relaxed);
            // SAFETY: the map is a read-only shared file mapping. MADV_DONTNEED on such a
            // mapping only unmaps the pages from this process; the next access faults them
            // back in from the page cache or the file with identical contents, so slices
            // handed out earlier stay valid and unchanged.
            let _ = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) };
        }
    }
}

/// Reads until `buf` is full or the file ends (so chunks stay aligned to the token width).
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A little-endian token id of 2 or 4 bytes.
fn decode_id(b: &[u8]) -> u32 {
    match *b {
        [x, y] => u16::from_le_bytes([x, y]) as u32,
        [x, y, z, w] => u32::from_le_bytes([x, y, z, w]),
        _ => unreachable!("token ids are 2 or 4 bytes"),
    }
}
