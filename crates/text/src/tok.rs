//! Tokenizers: load a Hugging Face `tokenizer.json`, or train one on the corpus; find
//! the special tokens; fingerprint the tokenizer so a store and a checkpoint can be matched.

use std::path::Path;

use lmtrain_store::SpecialTokens;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::TextError;

/// The kind of model a store is prepared for; decides special-token handling and the
/// kind of tokenizer trained when none is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelType {
    /// GPT-2 style: byte-level BPE, an end-of-text token appended after every document.
    #[default]
    Causal,
    /// BERT style: WordPiece, `[CLS] ... [SEP]` around every document.
    Masked,
}

/// The GPT-2 end-of-text token, used when training a causal tokenizer.
pub const GPT2_EOS: &str = "<|endoftext|>";
/// Special tokens of a trained BERT-style tokenizer, in id order.
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Smallest `--vocab-size` accepted for training: the 256 byte symbols of byte-level BPE
/// plus room for special tokens and some merges.
pub const MIN_TRAIN_VOCAB: usize = 300;

/// Largest `--vocab-size` accepted for training: 1,048,576 entries (four times the largest
/// published vocabularies; the trainer's memory grows with it).
pub const MAX_TRAIN_VOCAB: usize = 1 << 20;

/// For tokenizer training, runs of whitespace or of non-whitespace longer than this many
/// bytes are cut into pieces of this size: BPE training costs grow with the square of a
/// pre-token's length (one 200 KB "word" took 42 s, 640 KB of spaces over 5 minutes), and no
/// useful token is that long.
pub const MAX_TRAIN_WORD_BYTES: usize = 256;

/// Cuts `text` for tokenizer training so that no run of whitespace or of non-whitespace is
/// longer than `max` bytes, pushing the parts (each a separate sequence for the trainer) to
/// `out`. Cuts fall on character boundaries inside over-long runs only; text without such
/// runs is pushed whole.
pub fn split_long_words(text: String, max: usize, out: &mut impl Extend<String>) {
    let bytes = text.as_bytes();
    let mut run = 0usize;
    let mut run_is_space = false;
    let mut cuts = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        // Count a character once, at its first byte.
        if b & 0xC0 == 0x80 {
            continue;
        }
        let space = b.is_ascii_whitespace();
        if space != run_is_space {
            run = 0;
            run_is_space = space;
        }
        let width = match b {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        // Cut before a character that would make the run longer than `max`.
        if run > 0 && run + width > max {
            cuts.push(i);
            run = 0;
        }
        run += width;
    }
    if cuts.is_empty() {
        out.extend(std::iter::once(text));
        return;
    }
    let mut start = 0;
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    for c in cuts {
        parts.push(text[start..c].to_string());
        start = c;
    }
    parts.push(text[start..].to_string());
    out.extend(parts);
}

/// A 64-bit fingerprint of a tokenizer: FNV-1a over a canonical form of the JSON (object
/// keys sorted, no whitespace), so re-saving the same tokenizer with other formatting or
/// key order keeps the fingerprint. Bytes that are not JSON are hashed as they are.
pub fn tokenizer_fingerprint(tokenizer_json_bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::default();
    match serde_json::from_slice::<serde_json::Value>(tokenizer_json_bytes) {
        Ok(value) => canonical(&value, &mut h),
        Err(_) => h.write(tokenizer_json_bytes),
    }
    h.0
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Streams the canonical serialization of `v` into the hasher.
fn canonical(v: &serde_json::Value, h: &mut Fnv1a) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.write(b"{");
            for (k, key) in keys.into_iter().enumerate() {
                if k > 0 {
                    h.write(b",");
                }
                h.write(serde_json::to_string(key).expect("string serializes").as_bytes());
                h.write(b":");
                canonical(&map[key], h);
            }
            h.write(b"}");
        }
        Value::Array(items) => {
            h.write(b"[");
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    h.write(b",");
                }
                canonical(item, h);
            }
            h.write(b"]");
        }
        scalar => h.write(serde_json::to_string(scalar).expect("scalar serializes").as_bytes()),
    }
}

/// Loads a `tokenizer.json`, returning the tokenizer and the file's bytes.
/// Truncation and padding stored in the file are switched off: documents are tokenized
/// whole and then concatenated.
pub fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Vec<u8>), TextError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TextError::MissingPath { path: path.to_path_buf() },
        _ => TextError::Io { path: path.to_path_buf(), error: e },
    })?;
    let bad = |msg: String| TextError::BadTokenizer { path: path.to_path_buf(), msg };
    // Invalid JSON is reported here: the tokenizers crate's own parsing panics on some of
    // it (its decoder deserializer calls `expect`).
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        return Err(bad(e.to_string()));
    }
    let mut tok = tokenizer_from_bytes(&bytes).map_err(bad)?;
    tok.with_truncation(None).map_err(|e| bad(e.to_string()))?;
    tok.with_padding(None);
    let vocab = tok.get_vocab_size(true);
    if vocab == 0 || vocab > lmtrain_store::MAX_VOCAB_SIZE as usize {
        return Err(bad(format!("vocabulary of {vocab} tokens, allowed 1 to {}", lmtrain_store::MAX_VOCAB_SIZE)));
    }
    // The tokenizers crate trusts the post-processor's special tokens and panics on one
    // that its template names but does not define; check them here.
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(pp) = json.get("post_processor")
    {
        check_post_processor(pp, &tok).map_err(bad)?;
    }
    Ok((tok, bytes))
}

/// `Tokenizer::from_bytes`, with a panic inside the tokenizers crate turned into an error.
///
/// A last resort, used because that crate's `Deserialize` implementations call `expect` on
/// sections they cannot read (decoders, normalizers) instead of returning an error, so a
/// damaged but valid-JSON tokenizer.json can panic. The default panic hook is silenced for
/// the duration so that the user sees one error line; loading happens before any worker
/// thread of `prepare` starts, so no other panic message can be lost.
fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes));
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(tok)) => Ok(tok),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!("the tokenizers library cannot read it ({why})"))
        }
    }
}

/// Checks that every special token a post-processor adds exists and has ids inside the
/// vocabulary (TemplateProcessing, BertProcessing, RobertaProcessing, and Sequence of them).
fn check_post_processor(pp: &serde_json::Value, tok: &Tokenizer) -> Result<(), String> {
    use serde_json::Value;
    let vocab = tok.get_vocab_size(true);
    let check_id = |what: &str, name: &str, id: &Value| -> Result<(), String> {
        match id.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(()),
            _ => Err(format!("post_processor: {what} {name:?} has id {id}, outside the vocabulary of {vocab} tokens")),
        }
    };
    match pp.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for p in pp.get("processors").and_then(Value::as_array).into_iter().flatten() {
                check_post_processor(p, tok)?;
            }
        }
        Some("BertProcessing" | "RobertaProcessing") => {
            for key in ["cls", "sep"] {
                if let Some([name, id]) = pp.get(key).and_then(Value::as_array).map(Vec::as_slice) {
                    check_id(key, name.as_str().unwrap_or_default(), id)?;
                }
            }
        }
        Some("TemplateProcessing") => {
            let defined = pp.get("special_tokens").and_then(Value::as_object);
            for template in ["single", "pair"] {
                for piece in pp.get(template).and_then(Value::as_array).into_iter().flatten() {
                    let Some(name) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(Value::as_str) else {
                        continue;
                    };
                    let Some(special) = defined.and_then(|d| d.get(name)) else {
                        return Err(format!(
                            "post_processor: the {template} template uses the special token {name:?}, which its special_tokens do not define"
                        ));
                    };
                    let ids = special.get("ids").and_then(Value::as_array).cloned().unwrap_or_default();
                    let tokens = special.get("tokens").and_then(Value::as_array).map_or(0, Vec::len);
                    if ids.is_empty() || ids.len() != tokens {
                        return Err(format!(
                            "post_processor: special token {name:?} has {} ids and {tokens} tokens (needs the same number, at least 1)",
                            ids.len()
                        ));
                    }
                    for id in &ids {
                        check_id("special token", name, id)?;
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Trains a tokenizer of `vocab_size` entries on `docs`: byte-level BPE with
/// `<|endoftext|>` (GPT-2 style) for causal models, lower-casing WordPiece with
/// `[PAD] [UNK] [CLS] [SEP] [MASK]` and a `[CLS] … [SEP]` post-processor (BERT style) for
/// masked models.
pub fn train_tokenizer<I>(model_type: ModelType, vocab_size: usize, docs: I) -> Result<Tokenizer, TextError>
where
    I: Iterator<Item = String> + Send,
{
    if vocab_size < MIN_TRAIN_VOCAB {
        return Err(TextError::VocabTooSmall { got: vocab_size, min: MIN_TRAIN_VOCAB });
    }
    if vocab_size > MAX_TRAIN_VOCAB {
        return Err(TextError::BadFlag(format!(
            "--vocab-size {vocab_size} is too large to train: allowed {MIN_TRAIN_VOCAB} to {MAX_TRAIN_VOCAB}"
        )));
    }
    let err = |e: tokenizers::Error| TextError::TokenizerTraining(e.to_string());
    match model_type {
        ModelType::Causal => {
            let mut tok = Tokenizer::new(BPE::default());
            // GPT-2's settings: no prefix space, offsets trimmed, GPT-2's split regex.
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
            let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(GPT2_EOS, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build()
                .into();
            tok.train(&mut trainer, docs).map_err(err)?;
            Ok(tok)
        }
        ModelType::Masked => {
            let mut tok = Tokenizer::new(WordPiece::default());
            tok.with_normalizer(Some(BertNormalizer::default())).map_err(err)?;
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            let mut trainer: TrainerWrapper = WordPieceTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(BERT_SPECIALS.iter().map(|t| AddedToken::from(*t, true)).collect())
                .build()
                .into();
            tok.train(&mut trainer, docs).map_err(err)?;
            let id = |t: &str| tok.token_to_id(t).ok_or_else(|| TextError::UnknownToken(t.into()));
            let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
            tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
            Ok(tok)
        }
    }
}

/// The special tokens of a tokenizer, found by their usual spellings (GPT-2, BERT,
/// RoBERTa/T5 conventions).
pub fn find_special_tokens(tok: &Tokenizer) -> SpecialTokens {
    let first = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
    SpecialTokens {
        eos: first(&[GPT2_EOS, "</s>", "<eos>", "[EOS]"]),
        bos: first(&["<s>", "<bos>", "[BOS]", GPT2_EOS]),
        pad: first(&["[PAD]", "<pad>", "<|pad|>"]),
        unk: first(&["[UNK]", "<unk>", "<|unk|>"]),
        cls: first(&["[CLS]", "<s>", "<cls>"]),
        sep: first(&["[SEP]", "</s>", "<sep>"]),
        mask: first(&["[MASK]", "<mask>"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_formatting_but_not_content() {
        let a = br#"{"model": {"vocab": {"a": 0, "b": 1}}, "version": "1.0"}"#;
        let b = b"{\"version\":\"1.0\",\n \"model\":{\"vocab\":{\"b\":1,\"a\":0}}}";
        let c = br#"{"model": {"vocab": {"a": 0, "b": 2}}, "version": "1.0"}"#;
        assert_eq!(tokenizer_fingerprint(a), tokenizer_fingerprint(b));
        assert_ne!(tokenizer_fingerprint(a), tokenizer_fingerprint(c));
        assert_ne!(tokenizer_fingerprint(b"not json"), tokenizer_fingerprint(b"not json!"));
    }

    #[test]
    fn trains_byte_level_bpe_and_wordpiece() {
        let docs: Vec<String> = (0..200).map(|i| format!("the quick brown fox {i} jumps over the lazy dog")).collect();
        let bpe = train_tokenizer(ModelType::Causal, 400, docs.clone().into_iter()).unwrap();
        assert_eq!(bpe.token_to_id(GPT2_EOS), Some(0));
        let enc = bpe.encode("the quick brown fox", false).unwrap();
        assert_eq!(bpe.decode(enc.get_ids(), false).unwrap(), "the quick brown fox");
        assert!(enc.get_ids().len() < 19, "merges were learned: {:?}", enc.get_tokens());

        let wp = train_tokenizer(ModelType::Masked, 400, docs.into_iter()).unwrap();
        let enc = wp.encode("The quick fox", true).unwrap();
        assert_eq!(enc.get_tokens().first().map(String::as_str), Some("[CLS]"));
        assert_eq!(enc.get_tokens().last().map(String::as_str), Some("[SEP]"));
        let specials = find_special_tokens(&wp);
        assert_eq!((specials.pad, specials.unk, specials.cls, specials.sep, specials.mask), (Some(0), Some(1), Some(2), Some(3), Some(4)));
    }

    #[test]
    fn long_words_are_cut_for_training_only_where_too_long() {
        let mut out: Vec<String> = Vec::new();
        split_long_words("short words stay whole".into(), 8, &mut out);
        assert_eq!(out, ["short words stay whole"]);
        out.clear();
        let text = format!("a {} b", "x".repeat(20));
        split_long_words(text.clone(), 8, &mut out);
        assert_eq!(out.concat(), text, "nothing lost");
        assert!(out.len() == 3 && out.iter().all(|p| p.split_whitespace().all(|w| w.len() <= 8)), "{out:?}");
        out.clear();
        // Multi-byte characters are never split.
        let text = "é".repeat(10); // 20 bytes
        split_long_words(text.clone(), 5, &mut out);
        assert_eq!(out.concat(), text);
        assert!(out.iter().all(|p| p.len() <= 5), "{out:?}");
        out.clear();
        // Whitespace runs are pre-tokens too.
        let text = format!("a{}b", " ".repeat(30));
        split_long_words(text.clone(), 8, &mut out);
        assert_eq!(out.concat(), text);
        assert!(out.len() >= 4 && out.iter().all(|p| p.len() <= 9), "{out:?}");
    }

    #[test]
    fn too_small_vocab_is_refused() {
        assert!(matches!(train_tokenizer(ModelType::Causal, 10, std::iter::empty()), Err(TextError::VocabTooSmall { got: 10, .. })));
    }
}
