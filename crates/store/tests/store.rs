//! Write -> mmap read round trips and rejection of damaged files.

use std::path::{Path, PathBuf};

use lmtrain_store::{BlockStore, BlockWriter, EpochOrder, SpecialTokens, StoreError, StoreSpec, TokenDtype};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn spec(block_size: u32, vocab_size: u32) -> StoreSpec {
    StoreSpec {
        block_size,
        vocab_size,
        tokenizer_fingerprint: 0x0123_4567_89ab_cdef,
        special: SpecialTokens { eos: Some(vocab_size - 1), pad: Some(0), ..Default::default() },
        word_starts: true,
        layout: Default::default(),
    }
}

/// Random blocks (ids below `vocab`) and word-start flags.
fn random_blocks(n: usize, bs: usize, vocab: u32, seed: u64) -> Vec<(Vec<u32>, Vec<bool>)> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let toks = (0..bs).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
            let starts = (0..bs).map(|_| rng.next_u64() & 1 == 1).collect();
            (toks, starts)
        })
        .collect()
}

fn write_store(path: &Path, spec: StoreSpec, blocks: &[(Vec<u32>, Vec<bool>)]) {
    let mut w = BlockWriter::create(path, spec).unwrap();
    for (t, s) in blocks {
        w.push_block(t, Some(s)).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
}

fn round_trip(vocab: u32, dtype: TokenDtype) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let bs = 13; // not a multiple of 8: exercises partial word-start bytes
    let blocks = random_blocks(57, bs, vocab, vocab as u64);
    write_store(&path, spec(bs as u32, vocab), &blocks);
    let store = BlockStore::open(&path).unwrap();
    store.verify().unwrap();
    let h = store.header();
    assert_eq!(h.dtype, dtype);
    assert_eq!((h.block_size, h.n_blocks, h.n_tokens, h.vocab_size), (13, 57, 57 * 13, vocab));
    assert_eq!(h.tokenizer_fingerprint, 0x0123_4567_89ab_cdef);
    assert_eq!((h.eos, h.pad, h.cls), (Some(vocab - 1), Some(0), None));
    assert_eq!(store.len(), 57);
    let mut toks = vec![0u32; bs];
    let mut starts = vec![false; bs];
    for (i, (t, s)) in blocks.iter().enumerate() {
        store.read_block(i, &mut toks);
        store.word_starts(i, &mut starts);
        assert_eq!(&toks, t, "block {i}");
        assert_eq!(&starts, s, "block {i}");
        if dtype == TokenDtype::U16 {
            let raw: Vec<u32> = store.block_u16(i).unwrap().iter().map(|&x| x as u32).collect();
            assert_eq!(&raw, t);
        }
    }
}

#[test]
fn round_trip_u16() {
    round_trip(50257, TokenDtype::U16);
}

#[test]
fn round_trip_u16_at_the_boundary() {
    // 65,536 ids still fit in u16 (largest id 65,535).
    round_trip(65536, TokenDtype::U16);
}

#[test]
fn round_trip_u32() {
    round_trip(65537, TokenDtype::U32);
}

#[test]
fn nothing_appears_before_persist_and_temps_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let blocks = random_blocks(3, 8, 100, 1);
    let mut w = BlockWriter::create(&path, spec(8, 100)).unwrap();
    w.push_block(&blocks[0].0, Some(&blocks[0].1)).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "an abandoned writer leaves nothing");
    let mut w = BlockWriter::create(&path, spec(8, 100)).unwrap();
    w.push_block(&blocks[0].0, Some(&blocks[0].1)).unwrap();
    let finished = w.finish().unwrap();
    assert!(!path.exists());
    drop(finished);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "an unpersisted store leaves nothing");
}

#[test]
fn writer_rejects_bad_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    assert!(matches!(BlockWriter::create(&path, spec(0, 100)), Err(StoreError::ZeroBlockSize)));
    let mut w = BlockWriter::create(&path, spec(4, 100)).unwrap();
    let ok = [true; 4];
    assert!(matches!(w.push_block(&[1, 2, 3], Some(&ok[..3])), Err(StoreError::BlockLength { .. })));
    assert!(matches!(w.push_block(&[1, 2, 3, 100], Some(&ok)), Err(StoreError::TokenOutOfRange { id: 100, .. })));
    assert!(matches!(w.push_block(&[1, 2, 3, 4], None), Err(StoreError::WordStartsMismatch)));
}

/// A valid store's bytes, for the damage tests.
fn valid_store(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("s.bin");
    write_store(&path, spec(16, 1000), &random_blocks(10, 16, 1000, 9));
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn corrupt_header_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = valid_store(dir.path());
    bytes[30] ^= 0x40; // inside n_blocks
    std::fs::write(&path, &bytes).unwrap();
    let err = BlockStore::open(&path).err().expect("corrupt header must be rejected");
    assert!(matches!(err, StoreError::CorruptHeader { .. }), "{err}");
    assert!(err.to_string().contains("re-run `train prepare`"));
}

#[test]
fn bad_magic_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = valid_store(dir.path());
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(BlockStore::open(&path), Err(StoreError::NotAStore { .. })));
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(BlockStore::open(&path), Err(StoreError::NotAStore { .. })));
}

#[test]
fn truncated_payload_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let err = BlockStore::open(&path).err().expect("truncated store must be rejected");
    assert!(
        matches!(err, StoreError::SizeMismatch { expected, actual, .. } if expected == bytes.len() as u64 && actual + 1 == expected),
        "{err}"
    );
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert!(matches!(BlockStore::open(&path), Err(StoreError::SizeMismatch { .. })));
}

#[test]
fn wrong_version_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = valid_store(dir.path());
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = BlockStore::open(&path).err().expect("wrong version must be rejected");
    assert!(matches!(err, StoreError::UnsupportedVersion { found: 3, supported: 2, .. }), "{err}");
}

#[test]
fn flipped_payload_bit_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = valid_store(dir.path());
    let last = bytes.len() - 1; // in the word-start bits: the checksum covers them too
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let store = BlockStore::open_unverified(&path).unwrap();
    assert!(matches!(store.verify(), Err(StoreError::ChecksumMismatch { .. })));
    // `open` checks the payload itself.
    assert!(matches!(BlockStore::open(&path), Err(StoreError::ChecksumMismatch { .. })));
    bytes[last] ^= 1;
    bytes[200] ^= 1; // in the tokens
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(BlockStore::open_unverified(&path).unwrap().verify(), Err(StoreError::ChecksumMismatch { .. })));
    assert!(matches!(BlockStore::open(&path), Err(StoreError::ChecksumMismatch { .. })));
}

#[test]
fn empty_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    write_store(&path, spec(8, 100), &[]);
    let store = BlockStore::open(&path).unwrap();
    store.verify().unwrap();
    assert!(store.is_empty());
    assert!(EpochOrder::new(store.len(), 0, 0).is_empty());
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resident memory while reading a ~1 GB store once in shuffled order.
/// Run: `cargo test --release -p lmtrain-store --test store -- --ignored --nocapture rss`
/// (writes ~1 GB under the system temp directory, then deletes it).
#[test]
#[ignore = "writes a 1 GB file; run by hand to measure resident memory"]
fn rss_stays_flat_reading_1gb_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let bs = 1024usize;
    let n_blocks = (1usize << 30) / (bs * 2); // u16 tokens: 1 GiB of tokens
    let mut w = BlockWriter::create(&path, spec(bs as u32, 50257)).unwrap();
    let mut toks = vec![0u32; bs];
    let starts = vec![true; bs];
    for b in 0..n_blocks {
        for (k, t) in toks.iter_mut().enumerate() {
            *t = ((b * 31 + k) % 50257) as u32;
        }
        w.push_block(&toks, Some(&starts)).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
    let file_mib = std::fs::metadata(&path).unwrap().len() >> 20;

    let rss_before = vm_rss_kib();
    let store = BlockStore::open(&path).unwrap();
    let rss_open = vm_rss_kib();
    let order = EpochOrder::new(store.len(), 42, 0);
    let rss_order = vm_rss_kib();
    let mut max_rss = 0;
    let mut checksum = 0u64;
    let mut ws = vec![false; bs];
    for pos in 0..order.len() {
        let b = order.get(pos);
        store.read_block(b, &mut toks);
        store.word_starts(b, &mut ws);
        assert_eq!(toks[0], ((b * 31) % 50257) as u32);
        checksum = checksum.wrapping_add(toks[bs - 1] as u64);
        if pos % 4096 == 0 {
            max_rss = max_rss.max(vm_rss_kib());
        }
    }
    let rss_after = vm_rss_kib();
    println!(
        "store {file_mib} MiB, {} blocks of {bs}: VmRSS before open {rss_before} KiB, after open {rss_open} KiB, \
         after EpochOrder {rss_order} KiB, max during full shuffled epoch {max_rss} KiB, after {rss_after} KiB (checksum {checksum})",
        store.len()
    );
    // The reader releases mapped pages every 32 MiB read; allow that window plus slack.
    assert!(max_rss < rss_order + 64 * 1024, "resident memory grew with the store: {max_rss} KiB");
}
