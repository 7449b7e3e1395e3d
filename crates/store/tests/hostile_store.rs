//! Hostile store files: header counts that overflow or are absurd, payloads whose ids are
//! outside the vocabulary, padded (version 2) stores, stale temporary files, and error
//! messages that must print each cause once.

use std::path::{Path, PathBuf};

use lmtrain_store::{
    BlockStore, BlockWriter, EpochOrder, HEADER_LEN, Layout, MAX_BLOCK_SIZE, MAX_VOCAB_SIZE, SpecialTokens, StoreError, StoreSpec,
    remove_stale_temp_files,
};

fn spec(block_size: u32, vocab_size: u32) -> StoreSpec {
    StoreSpec {
        block_size,
        vocab_size,
        tokenizer_fingerprint: 7,
        special: SpecialTokens { eos: Some(vocab_size - 1), pad: Some(0), ..Default::default() },
        word_starts: true,
        layout: Default::default(),
    }
}

/// A valid u16 store of 10 blocks of 16 tokens, vocabulary 1000; returns its path and bytes.
fn valid_store(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("s.bin");
    let mut w = BlockWriter::create(&path, spec(16, 1000)).unwrap();
    for b in 0..10u32 {
        let toks: Vec<u32> = (0..16).map(|k| (b * 97 + k * 13) % 1000).collect();
        w.push_block(&toks, Some(&[true; 16])).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the header checksum after a field was patched, so that the field itself is
/// what the reader judges.
fn reseal_header(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..124]);
    put_u32(b, 124, crc);
}

/// Recomputes the payload checksum too (a hand-made file that is consistent but hostile).
fn reseal_payload(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[HEADER_LEN..]);
    put_u32(b, 84, crc);
    reseal_header(b);
}

fn open_err(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    match BlockStore::open(path) {
        Ok(_) => panic!("a hostile store was accepted"),
        Err(e) => chain(&e),
    }
}

/// The message as `{:#}` of anyhow prints it: the error and each of its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn absurd_vocabulary_and_block_size_are_rejected_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());

    let mut b = bytes.clone();
    put_u32(&mut b, 16, 4); // u32 ids, so only the vocabulary bound can object
    put_u32(&mut b, 40, u32::MAX);
    reseal_header(&mut b);
    let msg = open_err(&path, &b);
    assert!(msg.contains("vocabulary of 4294967295 tokens, allowed 1 to 16777216"), "{msg}");

    let mut b = bytes.clone();
    put_u32(&mut b, 40, MAX_VOCAB_SIZE); // a u16 store cannot hold it
    reseal_header(&mut b);
    assert!(open_err(&path, &b).contains("16-bit ids"));

    let mut b = bytes.clone();
    put_u32(&mut b, 40, 0);
    reseal_header(&mut b);
    assert!(open_err(&path, &b).contains("vocabulary of 0 tokens"));

    // Block size 2^31 with counts that agree and a word-start-free layout.
    let mut b = bytes[..HEADER_LEN].to_vec();
    put_u32(&mut b, 20, 1 << 31);
    put_u64(&mut b, 24, 0);
    put_u64(&mut b, 32, 0);
    reseal_header(&mut b);
    let msg = open_err(&path, &b);
    assert!(msg.contains(&format!("block size 2147483648, allowed 1 to {MAX_BLOCK_SIZE}")), "{msg}");
    assert!(msg.contains("re-run `train prepare`"), "{msg}");
}

#[test]
fn header_counts_whose_byte_size_wraps_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());
    // 2^32 blocks of 2^31 tokens = 2^63 tokens of 2 bytes: 2^64 bytes, which wraps to 0,
    // so unchecked arithmetic finds exactly the 128-byte file it is given.
    let mut b = bytes[..HEADER_LEN].to_vec();
    put_u32(&mut b, 20, 1 << 31);
    put_u64(&mut b, 24, 1 << 32);
    put_u64(&mut b, 32, 1 << 63);
    put_u32(&mut b, 44, 0); // no word-start bits
    reseal_header(&mut b);
    let msg = open_err(&path, &b);
    assert!(msg.contains("corrupt block store header"), "{msg}");

    // A token count near 2^56 with a block size inside the limits: too many blocks.
    let mut b = bytes[..HEADER_LEN].to_vec();
    put_u64(&mut b, 24, 1 << 52);
    put_u64(&mut b, 32, 1 << 56);
    reseal_header(&mut b);
    let msg = open_err(&path, &b);
    assert!(msg.contains("4503599627370496 blocks, at most 4294967295"), "{msg}");

    // Counts that disagree.
    let mut b = bytes.clone();
    put_u64(&mut b, 32, 161);
    reseal_header(&mut b);
    assert!(open_err(&path, &b).contains("do not make 161 tokens"));
}

/// One block more than `EpochOrder` can index, in a sparse file of the exact length the
/// header implies: rejected at open instead of panicking in `EpochOrder::new`.
#[test]
fn more_blocks_than_the_epoch_order_holds_is_an_error_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());
    let n_blocks = u32::MAX as u64 + 1;
    let mut b = bytes[..HEADER_LEN].to_vec();
    put_u32(&mut b, 20, 1);
    put_u64(&mut b, 24, n_blocks);
    put_u64(&mut b, 32, n_blocks);
    put_u32(&mut b, 44, 0);
    reseal_header(&mut b);
    std::fs::write(&path, &b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(HEADER_LEN as u64 + 2 * n_blocks).unwrap(); // sparse: no disk space used
    drop(f);
    let err = BlockStore::open(&path).err().expect("rejected");
    assert!(err.to_string().contains("4294967296 blocks, at most 4294967295"), "{err}");
    let err = BlockStore::open_unverified(&path).err().expect("rejected without reading the payload too");
    assert!(matches!(err, StoreError::CorruptHeader { .. }), "{err}");
}

#[test]
fn special_ids_and_unknown_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());
    let mut b = bytes.clone();
    put_u32(&mut b, 56, 1000); // eos = vocabulary size
    reseal_header(&mut b);
    assert!(open_err(&path, &b).contains("eos token id 1000 is outside the vocabulary of 1000"));
    let mut b = bytes.clone();
    put_u32(&mut b, 44, 1 | 2); // lengths flag in a version 1 header
    reseal_header(&mut b);
    assert!(open_err(&path, &b).contains("unknown flags 0x3 for version 1"));
}

#[test]
fn payload_ids_outside_the_vocabulary_are_rejected_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = valid_store(dir.path());
    // Block 3, token 5 becomes 600 with a vocabulary of 512 (as in the issue); checksums
    // recomputed so only the id check can catch it.
    let mut b = bytes.clone();
    put_u32(&mut b, 40, 512);
    put_u32(&mut b, 56, 511);
    for t in 0..160 {
        let at = HEADER_LEN + 2 * t;
        let id = u16::from_le_bytes([b[at], b[at + 1]]) % 512;
        b[at..at + 2].copy_from_slice(&id.to_le_bytes());
    }
    let at = HEADER_LEN + 2 * (3 * 16 + 5);
    b[at..at + 2].copy_from_slice(&600u16.to_le_bytes());
    reseal_payload(&mut b);
    let msg = open_err(&path, &b);
    assert!(msg.contains("token id 600 in block 3 is outside the store's vocabulary of 512 tokens") && msg.contains("s.bin"), "{msg}");
    // The unverified open accepts it; verify() finds it.
    let store = BlockStore::open_unverified(&path).unwrap();
    assert!(matches!(store.verify(), Err(StoreError::PayloadTokenOutOfRange { id: 600, block: 3, .. })));

    // A random bit flip in the payload is caught at open by the checksum.
    let mut b = bytes.clone();
    b[HEADER_LEN + 77] ^= 0x10;
    assert!(open_err(&path, &b).contains("checksum mismatch"));
}

#[test]
fn check_vocab_names_the_file_and_both_vocabularies() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = valid_store(dir.path());
    let store = BlockStore::open(&path).unwrap();
    let max = store.max_token_id().expect("verified");
    let mut want = 0;
    let mut toks = vec![0u32; 16];
    for i in 0..store.len() {
        store.read_block(i, &mut toks);
        want = want.max(*toks.iter().max().unwrap());
    }
    assert_eq!(max, want);
    store.check_vocab(max as usize + 1).unwrap();
    let msg = store.check_vocab(max as usize).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("holds token ids up to {max} (store vocabulary 1000) but the model's vocabulary has {max} tokens"))
            && msg.contains("re-run `train prepare`"),
        "{msg}"
    );
    // Without a scan only the header is known.
    assert!(BlockStore::open_unverified(&path).unwrap().check_vocab(999).is_err());
}

#[test]
fn padded_store_round_trips_as_version_2_and_plain_stores_stay_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.bin");
    let mut w = BlockWriter::create_padded(&path, spec(8, 300)).unwrap();
    let docs: [&[u32]; 4] = [&[5, 6, 7], &[1, 2, 3, 4, 5, 6, 7, 8], &[9], &[10, 11, 12, 13, 14]];
    for d in docs {
        let starts: Vec<bool> = d.iter().map(|&t| t % 2 == 1).collect();
        w.push_padded_block(d, Some(&starts)).unwrap();
    }
    assert!(matches!(w.push_padded_block(&[], Some(&[])), Err(StoreError::BlockLength { .. })));
    assert!(matches!(w.push_padded_block(&[1; 9], Some(&[true; 9])), Err(StoreError::BlockLength { .. })));
    w.finish().unwrap().persist().unwrap();
    let store = BlockStore::open(&path).unwrap();
    assert_eq!(store.header().version, 2);
    assert!(store.is_padded());
    let mut toks = vec![0u32; 8];
    let mut starts = vec![false; 8];
    let mut mask = vec![9u8; 8];
    for (i, d) in docs.iter().enumerate() {
        assert_eq!(store.block_len(i), d.len());
        store.read_block(i, &mut toks);
        assert_eq!(&toks[..d.len()], *d);
        assert!(toks[d.len()..].iter().all(|&t| t == 0), "padded with the pad id");
        store.word_starts(i, &mut starts);
        assert!(d.iter().zip(&starts).all(|(t, s)| (t % 2 == 1) == *s));
        store.attention_mask(i, &mut mask);
        assert_eq!(mask.iter().map(|&m| m as usize).sum::<usize>(), d.len());
        assert!(mask[..d.len()].iter().all(|&m| m == 1));
    }

    // A length of 0 or above the block size is a damaged file.
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len();
    put_u32(&mut b, n - 4, 9);
    reseal_payload(&mut b);
    assert!(open_err(&path, &b).contains("block 3 has length 9, allowed 1 to 8"));
    put_u32(&mut b, n - 4, 0);
    reseal_payload(&mut b);
    assert!(open_err(&path, &b).contains("block 3 has length 0"));

    // Without a pad id there is no padded store.
    let mut no_pad = spec(8, 300);
    no_pad.special.pad = None;
    assert!(matches!(BlockWriter::create_padded(&dir.path().join("q.bin"), no_pad), Err(StoreError::BadSpec(_))));

    let (plain, _) = valid_store(dir.path());
    let store = BlockStore::open(&plain).unwrap();
    assert_eq!(store.header().version, 1, "older builds must still read unpadded stores");
    assert!(!store.is_padded());
    assert_eq!(store.block_len(0), 16);
}

#[test]
fn writer_refuses_specs_outside_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.bin");
    let e = BlockWriter::create(&p, spec(MAX_BLOCK_SIZE + 1, 100)).err().unwrap();
    assert!(e.to_string().contains("block size 1048577 is above the limit of 1048576"), "{e}");
    let mut big = spec(16, 100);
    big.vocab_size = MAX_VOCAB_SIZE + 1;
    big.special = SpecialTokens::default();
    assert!(BlockWriter::create(&p, big).err().unwrap().to_string().contains("allowed 1 to 16777216"));
    let mut bad_eos = spec(16, 100);
    bad_eos.special.eos = Some(100);
    assert!(BlockWriter::create(&p, bad_eos).err().unwrap().to_string().contains("eos token id 100"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
}

#[test]
fn only_stale_temp_files_of_our_own_naming_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("train.bin");
    // pid_max is at most 2^22 on Linux: this process id cannot be running.
    let dead = 99_999_999u32;
    let me = std::process::id();
    let stale =
        [format!(".train.bin.tokens.{dead}-0.tmp"), format!(".train.bin.bits.{dead}-1.tmp"), format!(".train.bin.lengths.{dead}-7.tmp")];
    let keep = [
        format!(".train.bin.tokens.{me}-0.tmp"),        // a live writer (this process)
        format!(".train.bin.model.{dead}-0.tmp"),       // not one of our tags
        format!(".train.bin.tokens.{dead}x-0.tmp"),     // not a pid
        format!(".train.bin.tokens.{dead}-0.tmp.keep"), // not our suffix
        format!(".validation.bin.tokens.{dead}-0.tmp"), // another target
        format!("train.bin.tokens.{dead}-0.tmp"),       // not hidden
        "train.bin".to_string(),
    ];
    for name in stale.iter().chain(&keep) {
        std::fs::write(dir.path().join(name), b"x").unwrap();
    }
    // A directory with a matching name is not a file of ours.
    std::fs::create_dir(dir.path().join(format!(".train.bin.bits.{dead}-9.tmp"))).unwrap();
    let mut removed: Vec<String> =
        remove_stale_temp_files(&target).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    removed.sort();
    let mut want = stale.to_vec();
    want.sort();
    assert_eq!(removed, want);
    for name in &keep {
        assert!(dir.path().join(name).exists(), "{name} must be kept");
    }
    assert!(remove_stale_temp_files(&dir.path().join("missing-dir/train.bin")).unwrap().is_empty());
}

#[test]
fn io_errors_print_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = BlockStore::open(&dir.path().join("missing.bin")).err().unwrap();
    let msg = chain(&e);
    assert_eq!(msg.matches("os error 2").count(), 1, "{msg}");
    let e = BlockStore::open(dir.path()).err().unwrap();
    let msg = chain(&e);
    assert!(msg.contains("not a block store file (it is a directory or a device)"), "{msg}");
}

#[test]
fn epoch_order_covers_a_verified_store() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = valid_store(dir.path());
    let store = BlockStore::open(&path).unwrap();
    assert_eq!(EpochOrder::new(store.len(), 1, 0).len(), 10);
}

/// The cost of `open`'s payload check on a ~100 MB store (prints; asserts nothing about time).
/// Run: `cargo test --release -p lmtrain-store --test hostile_store -- --ignored --nocapture open_cost`
#[test]
#[ignore = "writes 100 MB; run by hand to measure"]
fn open_cost_on_100mb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let bs = 1024usize;
    let mut w = BlockWriter::create(&path, spec(bs as u32, 50257)).unwrap();
    let toks: Vec<u32> = (0..bs as u32).map(|k| k * 37 % 50257).collect();
    for _ in 0..(100 << 20) / (2 * bs) {
        w.push_block(&toks, Some(&vec![true; bs])).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
    let mb = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let s = BlockStore::open_unverified(&path).unwrap();
        let header_only = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        s.verify().unwrap();
        let scan = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        BlockStore::open(&path).unwrap();
        let full = t.elapsed().as_secs_f64();
        println!(
            "{mb:.0} MB: open_unverified {:.2} ms, verify {:.1} ms, open {:.1} ms ({:.1} GB/s)",
            header_only * 1e3,
            scan * 1e3,
            full * 1e3,
            mb / 1e3 / full
        );
    }
}

#[test]
fn document_layout_round_trips_and_an_unknown_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for layout in [Layout::Unknown, Layout::Causal, Layout::Masked] {
        let path = dir.path().join(format!("{layout:?}.bin"));
        let mut w = BlockWriter::create(&path, StoreSpec { layout, ..spec(4, 100) }).unwrap();
        w.push_block(&[1, 2, 3, 4], Some(&[true; 4])).unwrap();
        w.finish().unwrap().persist().unwrap();
        assert_eq!(BlockStore::open(&path).unwrap().header().layout, layout);
    }
    // byte 88 was reserved (zero) before: older stores read as Unknown, a value from nowhere is refused
    let (path, mut bytes) = valid_store(dir.path());
    bytes[88] = 3;
    reseal_header(&mut bytes);
    let err = open_err(&path, &bytes);
    assert!(err.contains("unknown document layout 3"), "{err}");
}
