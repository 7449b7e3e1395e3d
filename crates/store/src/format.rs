//! The on-disk layout of a block store.
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"LMTBLOCK"
//!      8     4  version (u32): 1, or 2 when per-block lengths are stored
//!     12     4  header length in bytes (u32, 128)
//!     16     4  token width in bytes: 2 (u16) or 4 (u32)
//!     20     4  block size (tokens per block)
//!     24     8  number of blocks
//!     32     8  number of tokens (= blocks * block size)
//!     40     4  vocabulary size
//!     44     4  flags (bit 0: word-start bits present; bit 1: per-block lengths, version 2)
//!     48     8  tokenizer fingerprint
//!     56    28  special-token ids: eos, bos, pad, unk, cls, sep, mask (u32, 0xFFFF_FFFF = none)
//!     84     4  CRC-32 of the payload
//!     88     1  document layout: 0 unknown (older stores), 1 causal, 2 masked (see [`Layout`])
//!     89    35  reserved, zero
//!    124     4  CRC-32 of bytes 0..124
//!    128        payload: tokens (n_tokens * width bytes, little-endian), then the
//!               word-start bits, ceil(block_size / 8) bytes per block, LSB first,
//!               then (version 2, flag bit 1) one u32 length per block
//! ```
//! All integers are little-endian. The token array is contiguous so that other
//! tools (numpy.memmap with offset 128) can read it directly.
//!
//! # Padded blocks (version 2)
//!
//! `train prepare --line-by-line` (Hugging Face `run_mlm.py --line_by_line`) stores one
//! document per block, truncated to the block size and padded. Such a store sets flag bit 1
//! and is written as version 2: after the word-start bits comes one little-endian `u32` per
//! block, the number of real tokens at the start of the block (1 to the block size).
//! Positions from that length on hold the header's `pad` id (which must then be set) and are
//! masked out: the attention mask of block `i` is 1 for positions below
//! [`BlockStore::block_len`](crate::BlockStore::block_len)`(i)` and 0 after, and their
//! labels are -100. Stores without padding are written as version 1, byte for byte as
//! before, so older lmtrain builds still read them; this build reads both versions (an
//! older build given a version 2 store says so and asks for `train prepare` to be re-run).
//!
//! # Limits
//!
//! A header is rejected with one line, before anything is allocated, unless: the
//! vocabulary has 1 to [`MAX_VOCAB_SIZE`] entries (16-bit ids only for at most 65,536), the
//! block size is 1 to [`MAX_BLOCK_SIZE`] tokens, there are at most [`MAX_BLOCKS`] blocks (the
//! shuffled epoch order holds `u32` indices), every special-token id is below the
//! vocabulary, and the byte size of every section, computed with checked arithmetic, fits
//! in 64 bits (the reader then compares it with the file length). The payload itself (the
//! checksum and every token id below the vocabulary) is checked by
//! [`BlockStore::open`](crate::BlockStore::open).

use std::path::Path;

use crate::StoreError;

/// First eight bytes of every store file.
pub const MAGIC: [u8; 8] = *b"LMTBLOCK";
/// The newest format version this crate reads and writes (stores without per-block
/// lengths are still written as version 1).
pub const VERSION: u32 = 2;
/// The oldest format version this crate reads.
pub const MIN_VERSION: u32 = 1;
/// Largest vocabulary a store may declare: 16,777,216 entries, 64 times the largest
/// published tokenizer vocabularies (~262k); anything above is a damaged header.
pub const MAX_VOCAB_SIZE: u32 = 1 << 24;
/// Largest block size a store may declare: 1,048,576 tokens per block.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Most blocks one store may hold (the epoch order indexes blocks with `u32`).
pub const MAX_BLOCKS: u64 = u32::MAX as u64;
/// Size of the fixed header in bytes; the payload starts here.
pub const HEADER_LEN: usize = 128;
const FLAG_WORD_STARTS: u32 = 1;
const FLAG_BLOCK_LENGTHS: u32 = 2;
const NONE_ID: u32 = u32::MAX;

/// Width of one stored token id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDtype {
    /// Two bytes per token, for vocabularies of at most 65,536 entries.
    U16,
    /// Four bytes per token.
    U32,
}

impl TokenDtype {
    /// The narrowest dtype that holds every id of a vocabulary of `vocab_size` entries.
    pub fn for_vocab(vocab_size: u32) -> TokenDtype {
        if vocab_size <= 1 << 16 { TokenDtype::U16 } else { TokenDtype::U32 }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// Ids of the special tokens a trainer needs; `None` when the tokenizer has no such token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// End of text (GPT-2 `<|endoftext|>`), inserted between documents for causal LM.
    pub eos: Option<u32>,
    /// Beginning of text.
    pub bos: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// BERT `[CLS]`.
    pub cls: Option<u32>,
    /// BERT `[SEP]`.
    pub sep: Option<u32>,
    /// BERT `[MASK]`.
    pub mask: Option<u32>,
}

/// How `train prepare` joined the documents, which decides the objective a store suits. Older
/// stores say [`Layout::Unknown`] (byte 88 was reserved, zero; older builds ignore it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Written before the layout was recorded.
    #[default]
    Unknown,
    /// Causal LM: documents joined by the end-of-text token (`--model-type causal`).
    Causal,
    /// Masked LM: every document wrapped in the tokenizer's `[CLS] ... [SEP]`
    /// (`--model-type masked`).
    Masked,
}

impl Layout {
    fn code(self) -> u8 {
        match self {
            Layout::Unknown => 0,
            Layout::Causal => 1,
            Layout::Masked => 2,
        }
    }
}

/// The header of a block store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version of the file.
    pub version: u32,
    /// Width of the stored token ids.
    pub dtype: TokenDtype,
    /// Tokens per block.
    pub block_size: u32,
    /// Number of blocks.
    pub n_blocks: u64,
    /// Number of tokens (`n_blocks * block_size`).
    pub n_tokens: u64,
    /// Size of the tokenizer's vocabulary (added tokens included); every id is below it.
    pub vocab_size: u32,
    /// Whether per-token word-start bits are stored.
    pub has_word_starts: bool,
    /// Whether one length per block is stored (padded, line-by-line stores; version 2).
    pub has_block_lengths: bool,
    /// `lmtrain_text::tokenizer_fingerprint` of the tokenizer the store was made with.
    pub tokenizer_fingerprint: u64,
    /// CRC-32 of the payload (tokens and word-start bits).
    pub payload_crc32: u32,
    /// End of text token id.
    pub eos: Option<u32>,
    /// Beginning of text token id.
    pub bos: Option<u32>,
    /// Padding token id.
    pub pad: Option<u32>,
    /// Unknown token id.
    pub unk: Option<u32>,
    /// `[CLS]` token id.
    pub cls: Option<u32>,
    /// `[SEP]` token id.
    pub sep: Option<u32>,
    /// `[MASK]` token id.
    pub mask: Option<u32>,
    /// How the documents were joined.
    pub layout: Layout,
}

impl Header {
    /// The special-token ids as one value.
    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens { eos: self.eos, bos: self.bos, pad: self.pad, unk: self.unk, cls: self.cls, sep: self.sep, mask: self.mask }
    }

    /// Bytes of word-start bits per block.
    pub fn word_start_bytes_per_block(&self) -> usize {
        if self.has_word_starts { (self.block_size as usize).div_ceil(8) } else { 0 }
    }

    /// Bytes of the token array (saturating; a decoded header never gets near the limit).
    pub fn token_bytes(&self) -> u64 {
        self.n_tokens.saturating_mul(self.dtype.width() as u64)
    }

    /// Bytes of the word-start bits (saturating).
    pub fn word_start_bytes(&self) -> u64 {
        self.n_blocks.saturating_mul(self.word_start_bytes_per_block() as u64)
    }

    /// Total file length implied by the header, or `None` if it does not fit in 64 bits.
    pub fn checked_file_len(&self) -> Option<u64> {
        let tokens = self.n_tokens.checked_mul(self.dtype.width() as u64)?;
        let bits = self.n_blocks.checked_mul(self.word_start_bytes_per_block() as u64)?;
        let lengths = if self.has_block_lengths { self.n_blocks.checked_mul(4)? } else { 0 };
        (HEADER_LEN as u64).checked_add(tokens)?.checked_add(bits)?.checked_add(lengths)
    }

    /// Total file length implied by the header (saturating; see [`checked_file_len`](Header::checked_file_len)).
    pub fn file_len(&self) -> u64 {
        self.checked_file_len().unwrap_or(u64::MAX)
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(self.dtype.width() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.n_blocks.to_le_bytes());
        b[32..40].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[40..44].copy_from_slice(&self.vocab_size.to_le_bytes());
        let flags = if self.has_word_starts { FLAG_WORD_STARTS } else { 0 } | if self.has_block_lengths { FLAG_BLOCK_LENGTHS } else { 0 };
        b[44..48].copy_from_slice(&flags.to_le_bytes());
        b[48..56].copy_from_slice(&self.tokenizer_fingerprint.to_le_bytes());
        let specials = [self.eos, self.bos, self.pad, self.unk, self.cls, self.sep, self.mask];
        for (k, id) in specials.iter().enumerate() {
            let at = 56 + 4 * k;
            b[at..at + 4].copy_from_slice(&id.unwrap_or(NONE_ID).to_le_bytes());
        }
        b[84..88].copy_from_slice(&self.payload_crc32.to_le_bytes());
        b[88] = self.layout.code();
        let crc = crc32fast::hash(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(path: &Path, b: &[u8]) -> Result<Header, StoreError> {
        let path = path.to_path_buf();
        if b.len() < 8 || b[0..8] != MAGIC {
            return Err(StoreError::NotAStore { path });
        }
        if b.len() < HEADER_LEN {
            return Err(StoreError::SizeMismatch { path, expected: HEADER_LEN as u64, actual: b.len() as u64 });
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        // The version is checked before the CRC so that a file from a newer lmtrain says
        // "version" rather than "corrupt".
        let version = u32_at(8);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(StoreError::UnsupportedVersion { path, found: version, supported: VERSION });
        }
        if crc32fast::hash(&b[..124]) != u32_at(124) {
            return Err(StoreError::CorruptHeader { path, detail: "header checksum mismatch".into() });
        }
        let corrupt = |detail: String| Err(StoreError::CorruptHeader { path: path.clone(), detail });
        if u32_at(12) as usize != HEADER_LEN {
            return corrupt(format!("header length {}", u32_at(12)));
        }
        let dtype = match u32_at(16) {
            2 => TokenDtype::U16,
            4 => TokenDtype::U32,
            w => return corrupt(format!("token width {w}")),
        };
        let block_size = u32_at(20);
        let n_blocks = u64_at(24);
        let n_tokens = u64_at(32);
        let vocab_size = u32_at(40);
        let flags = u32_at(44);
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return corrupt(format!("block size {block_size}, allowed 1 to {MAX_BLOCK_SIZE}"));
        }
        if vocab_size == 0 || vocab_size > MAX_VOCAB_SIZE {
            return corrupt(format!("vocabulary of {vocab_size} tokens, allowed 1 to {MAX_VOCAB_SIZE}"));
        }
        if dtype == TokenDtype::U16 && vocab_size > 1 << 16 {
            return corrupt(format!("vocabulary of {vocab_size} tokens stored as 16-bit ids"));
        }
        if n_blocks > MAX_BLOCKS {
            return corrupt(format!("{n_blocks} blocks, at most {MAX_BLOCKS} are allowed"));
        }
        if n_blocks.checked_mul(block_size as u64) != Some(n_tokens) {
            return corrupt(format!("{n_blocks} blocks of {block_size} tokens do not make {n_tokens} tokens"));
        }
        let known = FLAG_WORD_STARTS | if version >= 2 { FLAG_BLOCK_LENGTHS } else { 0 };
        if flags & !known != 0 {
            return corrupt(format!("unknown flags {flags:#x} for version {version}"));
        }
        let layout = match b[88] {
            0 => Layout::Unknown,
            1 => Layout::Causal,
            2 => Layout::Masked,
            other => return corrupt(format!("unknown document layout {other}")),
        };
        let special = |k: usize| Some(u32_at(56 + 4 * k)).filter(|&id| id != NONE_ID);
        for (k, name) in ["eos", "bos", "pad", "unk", "cls", "sep", "mask"].iter().enumerate() {
            if let Some(id) = special(k)
                && id >= vocab_size
            {
                return corrupt(format!("{name} token id {id} is outside the vocabulary of {vocab_size}"));
            }
        }
        let header = Header {
            version,
            dtype,
            block_size,
            n_blocks,
            n_tokens,
            vocab_size,
            has_word_starts: flags & FLAG_WORD_STARTS != 0,
            has_block_lengths: flags & FLAG_BLOCK_LENGTHS != 0,
            tokenizer_fingerprint: u64_at(48),
            eos: special(0),
            bos: special(1),
            pad: special(2),
            unk: special(3),
            cls: special(4),
            sep: special(5),
            mask: special(6),
            payload_crc32: u32_at(84),
            layout,
        };
        if header.has_block_lengths && header.pad.is_none() {
            return corrupt("padded blocks but no pad token id".into());
        }
        if header.checked_file_len().is_none() {
            return corrupt(format!("{n_tokens} tokens of {} bytes overflow a 64-bit file size", dtype.width()));
        }
        Ok(header)
    }
}
