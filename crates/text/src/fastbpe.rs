//! A faster path through GPT-2-style byte-level BPE tokenizers.
//!
//! Profiling `Tokenizer::encode` on English text shows most of the time in memory
//! allocation (one `String` per token, offsets, an `Encoding` per document) and in the
//! backtracking regex of the pre-tokenizer, not in BPE itself. For the common case — no
//! normalizer, a `ByteLevel` pre-tokenizer with GPT-2's split pattern, a BPE model without
//! dropout — this module produces the same ids with:
//! - a hand-written scanner equivalent to GPT-2's pattern
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!   (character classes taken from `regex-syntax`, the tables the regex engine uses), and
//! - a per-thread cache from a pre-token's bytes to its ids, so that a word seen before
//!   costs one hash lookup; unseen words go through the tokenizer's own BPE model.
//!
//! Documents containing an added token's text (e.g. a literal `<|endoftext|>`) take the
//! regular path. The test `fast_path_equals_tokenizer` checks equality with
//! `Tokenizer::encode` on the whole embedded corpus and on adversarial random text.

use std::collections::HashMap;
use std::sync::Mutex;

use regex_syntax::hir::{Class, HirKind};
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Model, Tokenizer};

/// Entries per thread's cache before it is cleared (bounds memory on huge vocabularies of words).
const CACHE_LIMIT: usize = 1 << 18;

/// Character classes of GPT-2's pattern.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

/// Sorted, disjoint code-point ranges of one class.
struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    fn parse(pattern: &str) -> Ranges {
        let hir = regex_syntax::Parser::new().parse(pattern).expect("valid class");
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => Ranges(c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()),
            _ => unreachable!("a Unicode class pattern"),
        }
    }

    fn contains(&self, c: char) -> bool {
        let c = c as u32;
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

/// Classifies characters exactly like the regex engine's `\p{L}`, `\p{N}` and `\s`.
struct Classifier {
    ascii: [CharClass; 128],
    letter: Ranges,
    number: Ranges,
    space: Ranges,
}

impl Classifier {
    fn new() -> Classifier {
        let mut c = Classifier {
            ascii: [CharClass::Other; 128],
            letter: Ranges::parse(r"\p{L}"),
            number: Ranges::parse(r"\p{N}"),
            space: Ranges::parse(r"\s"),
        };
        for b in 0..128u8 {
            c.ascii[b as usize] = c.slow(b as char);
        }
        c
    }

    fn slow(&self, ch: char) -> CharClass {
        if self.letter.contains(ch) {
            CharClass::Letter
        } else if self.number.contains(ch) {
            CharClass::Number
        } else if self.space.contains(ch) {
            CharClass::Space
        } else {
            CharClass::Other
        }
    }

    #[inline]
    fn class(&self, ch: char) -> CharClass {
        if ch.is_ascii() { self.ascii[ch as usize] } else { self.slow(ch) }
    }

    /// End (byte index) of the pre-token starting at `i` (`i < s.len()`).
    fn next_piece(&self, s: &str, i: usize) -> usize {
        let rest = &s[i..];
        if rest.as_bytes()[0] == b'\'' {
            for c in ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"] {
                if rest.starts_with(c) {
                    return i + c.len();
                }
            }
        }
        let mut chars = rest.chars();
        let c0 = chars.next().expect("non-empty");
        let class0 = self.class(c0);
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional single space, then a
        // run of one class.
        let (run_start, run_class) = if c0 == ' ' {
            match chars.next().map(|c1| self.class(c1)) {
                Some(class1) if class1 != CharClass::Space => (i + 1, class1),
                _ => (i, CharClass::Space),
            }
        } else {
            (i, class0)
        };
        if run_class != CharClass::Space {
            return run_start + self.run_len(&s[run_start..], run_class);
        }
        // `\s+(?!\S)` then `\s+`: a whitespace run, less its last character when a
        // non-space follows and the run is longer than one character (that character
        // then prefixes the next word).
        let run = self.run_len(rest, CharClass::Space);
        let end = i + run;
        if end == s.len() {
            return end;
        }
        let last = rest[..run].chars().next_back().expect("non-empty run").len_utf8();
        if run > last { end - last } else { end }
    }

    /// Byte length of the run of `class` characters at the start of `s`.
    fn run_len(&self, s: &str, class: CharClass) -> usize {
        s.char_indices().find(|&(_, c)| self.class(c) != class).map_or(s.len(), |(k, _)| k)
    }
}

/// GPT-2's reversible byte -> printable character map, as UTF-8 bytes.
fn byte_level_table() -> [([u8; 2], u8); 256] {
    let mut table = [([0u8; 2], 0u8); 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let ch = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        let ch = char::from_u32(ch).expect("valid code point");
        let mut buf = [0u8; 4];
        let len = ch.encode_utf8(&mut buf).len();
        table[b as usize] = ([buf[0], buf[1]], len as u8);
    }
    table
}

/// Ids of the pre-tokens seen so far, keyed by the pre-token's bytes.
type WordCache = HashMap<Box<[u8]>, Box<[u32]>>;

/// The fast path for one tokenizer; build with [`FastByteLevelBpe::new`].
pub(crate) struct FastByteLevelBpe<'t> {
    tokenizer: &'t Tokenizer,
    classifier: Classifier,
    table: [([u8; 2], u8); 256],
    added: Vec<String>,
    /// One cache per rayon worker (plus one for other threads), so lookups never contend.
    caches: Vec<Mutex<WordCache>>,
}

impl<'t> FastByteLevelBpe<'t> {
    /// `Some` when the tokenizer is of the shape this path reproduces exactly.
    pub fn new(tokenizer: &'t Tokenizer) -> Option<FastByteLevelBpe<'t>> {
        let shape_ok = tokenizer.get_normalizer().is_none()
            && matches!(tokenizer.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space)
            && matches!(tokenizer.get_model(), ModelWrapper::BPE(bpe) if bpe.dropout.is_none());
        if !shape_ok {
            return None;
        }
        let added = tokenizer.get_added_tokens_decoder().into_iter().map(|(_, t)| t.content).filter(|c| !c.is_empty()).collect();
        let caches = (0..=rayon::current_num_threads()).map(|_| Mutex::new(HashMap::new())).collect();
        Some(FastByteLevelBpe { tokenizer, classifier: Classifier::new(), table: byte_level_table(), added, caches })
    }

    /// Whether `doc` must take the regular path (it contains an added token's text).
    pub fn needs_regular_path(&self, doc: &str) -> bool {
        self.added.iter().any(|a| doc.contains(a.as_str()))
    }

    /// Appends `doc`'s ids and word-start flags (each pre-token is a word).
    pub fn encode(&self, doc: &str, ids: &mut Vec<u32>, starts: &mut Vec<bool>) -> tokenizers::Result<()> {
        let slot = rayon::current_thread_index().map_or(self.caches.len() - 1, |k| k.min(self.caches.len() - 2));
        let mut cache = self.caches[slot].lock().expect("cache lock");
        let mut mapped = Vec::new();
        let mut i = 0;
        while i < doc.len() {
            let end = self.classifier.next_piece(doc, i);
            let piece = &doc.as_bytes()[i..end];
            i = end;
            let first = ids.len();
            if let Some(hit) = cache.get(piece) {
                ids.extend_from_slice(hit);
            } else {
                mapped.clear();
                for &b in piece {
                    let (bytes, len) = self.table[b as usize];
                    mapped.extend_from_slice(&bytes[..len as usize]);
                }
                let mapped = std::str::from_utf8(&mapped).expect("the table holds UTF-8");
                let tokens = self.tokenizer.get_model().tokenize(mapped)?;
                let piece_ids: Box<[u32]> = tokens.iter().map(|t| t.id).collect();
                ids.extend_from_slice(&piece_ids);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(piece.into(), piece_ids);
            }
            starts.extend((first..ids.len()).map(|k| k == first));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn gpt2() -> Tokenizer {
        Tokenizer::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/tokenizers/gpt2.tokenizer.json")).unwrap()
    }

    fn check(fast: &FastByteLevelBpe, tok: &Tokenizer, doc: &str) {
        let enc = tok.encode(doc, false).unwrap();
        let mut want_starts = Vec::new();
        crate::group::word_starts_from_ids(enc.get_word_ids(), &mut want_starts);
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        fast.encode(doc, &mut ids, &mut starts).unwrap();
        assert_eq!(ids, enc.get_ids(), "ids of {doc:?}: {:?}", enc.get_tokens());
        assert_eq!(starts, want_starts, "word starts of {doc:?}");
    }

    #[test]
    fn fast_path_equals_tokenizer() {
        let tok = gpt2();
        let fast = FastByteLevelBpe::new(&tok).expect("GPT-2 qualifies");
        let gz = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/corpus/kjv.txt.gz")).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
        for line in text.lines() {
            check(&fast, &tok, line);
        }
        // Adversarial pieces: contractions (and near misses), runs of mixed whitespace
        // (NBSP, tabs, newlines, ideographic space), letters of every kind (Lt, Lm, Lo, CJK),
        // numbers that are not digits (Nl, No), combining marks, emoji, control characters.
        let pieces = [
            "'s",
            "'S",
            "'t",
            "'re",
            "'ve",
            "'m",
            "'ll",
            "'d",
            "'x",
            "''",
            "'",
            " ",
            "  ",
            "   ",
            "\t",
            "\n",
            "\r\n",
            " \n ",
            "\u{a0}",
            "\u{3000}",
            "\u{2028}",
            "word",
            "Word",
            " the",
            "don",
            "’s",
            "ǅ",
            "ʰ",
            "中文",
            "ひらがな",
            "é",
            "e\u{301}",
            "\u{301}",
            "123",
            "٣",
            "½",
            "Ⅻ",
            "²",
            "3.14",
            "-",
            "--",
            "...",
            "!?",
            "😀",
            "👩‍👩‍👧",
            "\u{0}",
            "\u{7f}",
            "\u{ad}",
            "x",
            "<|",
            "|>",
            "endoftext",
            "$",
            "€",
            "Ελληνικά",
            "עברית",
            "العربية",
        ];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for _ in 0..20_000 {
            let n = 1 + rng.next_u64() % 12;
            let doc: String = (0..n).map(|_| pieces[(rng.next_u64() % pieces.len() as u64) as usize]).collect();
            check(&fast, &tok, &doc);
        }
    }

    #[test]
    fn fast_path_equals_a_trained_byte_level_tokenizer() {
        let docs: Vec<String> =
            (0..300).map(|i| format!("Verse {i}: and the LORD said unto them,  they'll go\tthither; ünïcödé {}", i * 7)).collect();
        let tok = crate::tok::train_tokenizer(crate::ModelType::Causal, 400, docs.clone().into_iter()).unwrap();
        let fast = FastByteLevelBpe::new(&tok).expect("a trained causal tokenizer qualifies");
        for d in &docs {
            check(&fast, &tok, d);
            check(&fast, &tok, &d.to_uppercase());
        }
    }

    #[test]
    fn only_matching_tokenizers_qualify() {
        let bert =
            Tokenizer::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/tokenizers/bert-base-uncased.tokenizer.json")).unwrap();
        assert!(FastByteLevelBpe::new(&bert).is_none());
        let tok = gpt2();
        let fast = FastByteLevelBpe::new(&tok).unwrap();
        assert!(fast.needs_regular_path("a <|endoftext|> b"));
        assert!(!fast.needs_regular_path("a <|endoftext| b"));
    }
}
