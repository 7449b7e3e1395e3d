//! Zero-copy reader over a memory-mapped store.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::StoreError;
use crate::format::{HEADER_LEN, Header, TokenDtype};

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
}

impl BlockStore {
    /// Opens a store: checks the magic, version, header checksum and that the file length
    /// matches the header (a truncated file is rejected here). The payload checksum is
    /// checked separately by [`verify`](BlockStore::verify), because it reads the whole file.
    pub fn open(path: &Path) -> Result<BlockStore, StoreError> {
        let mut file = File::open(path).map_err(StoreError::io(path))?;
        let actual = file.metadata().map_err(StoreError::io(path))?.len();
        let mut head = Vec::with_capacity(HEADER_LEN);
        (&mut file).take(HEADER_LEN as u64).read_to_end(&mut head).map_err(StoreError::io(path))?;
        let header = Header::decode(path, &head)?;
        let expected = header.file_len();
        if actual != expected {
            return Err(StoreError::SizeMismatch { path: path.to_path_buf(), expected, actual });
        }
        // SAFETY: the map is read-only. As with every memory map, another process truncating
        // the file while it is mapped would fault; stores are written under a temporary name
        // and renamed into place, so a store in use is never rewritten in place.
        let map = unsafe { Mmap::map(&file) }.map_err(StoreError::io(path))?;
        // Training reads blocks in shuffled order. MADV_RANDOM turns off read-ahead and the
        // kernel's "fault-around", which would otherwise map up to 16 neighbouring cached
        // pages into the process on every fault and inflate the resident set 16-fold.
        map.advise(Advice::Random).map_err(StoreError::io(path))?;
        Ok(BlockStore { path: path.to_path_buf(), header, map, since_release: AtomicUsize::new(0) })
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
        (self.header.dtype == TokenDtype::U16 && cfg!(target_endian = "little"))
            .then(|| bytemuck::cast_slice(self.block_bytes(i)))
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

    /// Recomputes the payload checksum and compares it with the header. Reads the file with
    /// ordinary buffered reads (not through the map), so it does not grow the resident set.
    pub fn verify(&self) -> Result<(), StoreError> {
        let mut file = File::open(&self.path).map_err(StoreError::io(&self.path))?;
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head).map_err(StoreError::io(&self.path))?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(StoreError::io(&self.path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let computed = hasher.finalize();
        if computed != self.header.payload_crc32 {
            return Err(StoreError::ChecksumMismatch {
                path: self.path.clone(),
                stored: self.header.payload_crc32,
                computed,
            });
        }
        Ok(())
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
