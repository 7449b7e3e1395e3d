//! Corpus readers: plain text, JSON Lines, CSV (each optionally gzip-compressed) and
//! Parquet, from files or directories, streamed one document at a time so that a corpus
//! larger than memory can be read.
//!
//! Document rules:
//! - `.txt` (and any file of unknown extension named explicitly): by default every
//!   non-blank line is one document ([`TxtDocuments::Lines`], like Hugging Face
//!   `load_dataset("text")`, except that blank lines are skipped rather than kept as
//!   empty examples); with [`TxtDocuments::Paragraphs`] runs of non-blank lines separated
//!   by blank lines form one document (lines joined with `\n`).
//! - `.jsonl`: one JSON object per line; the document is the string in field `text`
//!   (configurable). `null` and blank strings are skipped.
//! - `.csv`: a header row, then one document per record, from column `text` (configurable).
//! - `.parquet`: one document per row, from column `text` (configurable); only that
//!   column is decoded.
//!
//! Bounded memory whatever the corpus's shape:
//! - A document longer than [`MAX_PIECE_BYTES`] (1 MiB) is cut into pieces of at most that
//!   size, at the start of a whitespace run where there is one in the second half of the
//!   window (else at a character boundary). The pieces of a document stay one document:
//!   for causal LM they are tokenized one after the other with a single end-of-text token
//!   after the last (a byte-level BPE pre-tokenizer never joins text across the start of
//!   a whitespace run, so the ids equal those of the whole document); for masked LM each
//!   piece is wrapped in `[CLS] ... [SEP]`. The summary counts such documents. A plain-text
//!   line is never held whole: it is read and cut piece by piece.
//! - A JSON Lines line or a CSV record longer than [`MAX_RECORD_BYTES`] (64 MiB) is an error
//!   (they must be parsed whole).
//! - `null` and blank texts of JSON Lines, CSV and Parquet records are skipped and counted
//!   (Hugging Face `datasets` keeps them as `None`, on which the tokenizer fails; skipping
//!   them is the filter users apply by hand).
//! - Before reading, the first bytes of every file are checked: ZIP archives (`.docx`,
//!   `.xlsx`, `.epub`, ...), PDF, other compressed or binary formats, UTF-16 text and any
//!   data with a NUL byte are refused with one line saying what the file is; gzip data is
//!   decompressed even without a `.gz` name. Devices (such as `/dev/zero`) are refused.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::TextError;

/// Documents longer than this many bytes are cut into pieces of at most this size.
pub const MAX_PIECE_BYTES: usize = 1 << 20;
/// Longest JSON Lines line or CSV record accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Bytes at the start of a file checked for binary content.
const SNIFF_BYTES: usize = 8192;

/// A piece of a document (a whole document unless it was longer than [`MAX_PIECE_BYTES`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// The text.
    pub text: String,
    /// Index of its document in the corpus (counted from 0).
    pub doc: u64,
    /// Whether it is the first piece of its document.
    pub first: bool,
    /// Whether it is the last piece of its document.
    pub last: bool,
}

/// Counts kept while reading.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadCounts {
    /// Documents skipped because of invalid UTF-8.
    pub skipped_invalid: u64,
    /// Records whose text is `null` or blank.
    pub skipped_empty: u64,
    /// Documents cut into pieces.
    pub split_documents: u64,
    /// Pieces those documents were cut into.
    pub split_pieces: u64,
}

/// Where to cut `bytes` (at least `limit` long) so that the head is at most `limit` bytes:
/// the start of the last whitespace run in the second half of the window, else the last
/// UTF-8 character boundary. Always in `1..=limit`.
pub(crate) fn cut_point(bytes: &[u8], limit: usize) -> usize {
    let end = limit.min(bytes.len());
    let ws = |b: u8| b.is_ascii_whitespace();
    if let Some(p) = (end / 2 + 1..end).rev().find(|&p| ws(bytes[p]) && !ws(bytes[p - 1])) {
        return p;
    }
    if end == bytes.len() {
        return end;
    }
    (1..=end).rev().find(|&p| bytes[p] & 0xC0 != 0x80).unwrap_or(end)
}

/// Cuts `text` into pieces of at most `limit` bytes (see [`cut_point`]).
pub(crate) fn split_text(mut text: String, limit: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    while text.len() > limit {
        let cut = cut_point(text.as_bytes(), limit);
        let rest = text.split_off(cut);
        pieces.push(text);
        text = rest;
    }
    pieces.push(text);
    pieces
}

/// The format of a corpus file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorpusFormat {
    /// Plain text (see [`TxtDocuments`] for what a document is).
    Txt,
    /// JSON Lines.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl CorpusFormat {
    /// The format a file name implies (after removing a `.gz` suffix), if any.
    pub fn from_extension(ext: &str) -> Option<CorpusFormat> {
        match ext.to_ascii_lowercase().as_str() {
            "txt" | "text" => Some(CorpusFormat::Txt),
            "jsonl" | "ndjson" => Some(CorpusFormat::Jsonl),
            "csv" => Some(CorpusFormat::Csv),
            "parquet" => Some(CorpusFormat::Parquet),
            _ => None,
        }
    }
}

/// What a document is in a plain-text file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxtDocuments {
    /// Each non-blank line is a document; blank lines are skipped.
    #[default]
    Lines,
    /// Blank lines separate documents; the lines of a paragraph are joined with `\n`.
    Paragraphs,
}

/// How to read a corpus.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Force a format instead of deciding by extension.
    pub format: Option<CorpusFormat>,
    /// Document rule for plain text.
    pub txt_documents: TxtDocuments,
    /// JSON Lines field holding the text.
    pub text_field: String,
    /// CSV / Parquet column holding the text.
    pub text_column: String,
    /// Skip documents with invalid UTF-8 (counting them) instead of failing.
    pub skip_invalid: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: None,
            txt_documents: TxtDocuments::Lines,
            text_field: "text".into(),
            text_column: "text".into(),
            skip_invalid: false,
        }
    }
}

/// One input file with its format.
#[derive(Clone, Debug)]
pub(crate) struct CorpusFile {
    pub path: PathBuf,
    pub format: CorpusFormat,
    pub gzip: bool,
    pub size: u64,
}

/// Splits `name` into (format by extension, gzip?).
fn classify(path: &Path) -> (Option<CorpusFormat>, bool) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (stem, gzip) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), true),
        None => (name, false),
    };
    let format = Path::new(&stem).extension().and_then(|e| CorpusFormat::from_extension(&e.to_string_lossy()));
    (format, gzip)
}

/// Expands the inputs (files, directories walked recursively in name order) into the
/// list of files to read. Files inside directories must have a known extension; files
/// named explicitly with an unknown extension are read as plain text.
pub(crate) fn resolve_inputs(inputs: &[PathBuf], forced: Option<CorpusFormat>) -> Result<Vec<CorpusFile>, TextError> {
    if inputs.is_empty() {
        return Err(TextError::NoInput);
    }
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TextError::MissingPath { path: input.clone() },
            _ => TextError::Io { path: input.clone(), error: e },
        })?;
        if is_device(&meta) {
            return Err(TextError::NotText {
                path: input.clone(),
                what: "is a device, not a corpus file (give a file, a directory or a named pipe)".into(),
            });
        }
        if meta.is_dir() {
            let before = files.len();
            walk_dir(input, forced, &mut files)?;
            if files.len() == before {
                return Err(TextError::EmptyDirectory { path: input.clone() });
            }
        } else {
            let (format, gzip) = classify(input);
            let format = forced.or(format).unwrap_or(CorpusFormat::Txt);
            files.push(CorpusFile { path: input.clone(), format, gzip, size: meta.len() });
        }
    }
    Ok(files)
}

/// Character and block devices and sockets: never a corpus (`/dev/zero` never ends).
fn is_device(meta: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        t.is_char_device() || t.is_block_device() || t.is_socket()
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

fn walk_dir(dir: &Path, forced: Option<CorpusFormat>, out: &mut Vec<CorpusFile>) -> Result<(), TextError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(TextError::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(TextError::io(dir))?;
    entries.sort();
    for path in entries {
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(TextError::io(&path))?;
        if meta.is_dir() {
            walk_dir(&path, forced, out)?;
        } else if let (Some(format), gzip) = classify(&path) {
            out.push(CorpusFile { path, format: forced.unwrap_or(format), gzip, size: meta.len() });
        }
    }
    Ok(())
}

/// Counts bytes as they are read from disk (before decompression), for progress.
struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A source of documents from one file.
trait DocSource: Send {
    /// The next document or piece of one, with whether it ends its document; `None` at the
    /// end of the file. Skipped documents are counted in `counts`.
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError>;
}

/// The documents of a whole corpus, file after file, as pieces of at most
/// [`MAX_PIECE_BYTES`].
pub(crate) struct Documents {
    files: Vec<CorpusFile>,
    opts: ReadOptions,
    next_file: usize,
    current: Option<Box<dyn DocSource>>,
    /// Pieces of the current document not handed out yet.
    pending: VecDeque<String>,
    /// Index of the next document.
    next_index: u64,
    /// Whether the last piece handed out ended its document.
    at_doc_start: bool,
    /// Pieces handed out of the current document.
    pieces_of_doc: u64,
    /// Whether the document split into `pending` ends with its last piece.
    source_ended_doc: bool,
    /// Bytes read from disk so far (compressed bytes for .gz files).
    pub bytes_read: Arc<AtomicU64>,
    /// What was skipped or cut.
    pub counts: ReadCounts,
}

impl Documents {
    pub fn new(files: Vec<CorpusFile>, opts: ReadOptions) -> Documents {
        Documents {
            files,
            opts,
            next_file: 0,
            current: None,
            pending: VecDeque::new(),
            next_index: 0,
            at_doc_start: true,
            pieces_of_doc: 0,
            source_ended_doc: true,
            bytes_read: Arc::default(),
            counts: ReadCounts::default(),
        }
    }

    /// Total size on disk of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The next piece of the corpus.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, TextError> {
        loop {
            if let Some(text) = self.pending.pop_front() {
                let last = self.pending.is_empty() && self.source_ended_doc;
                return Ok(Some(self.hand_out(text, last)));
            }
            if let Some(src) = &mut self.current {
                if let Some((text, last)) = src.next_doc(&mut self.counts)? {
                    if text.len() <= MAX_PIECE_BYTES {
                        return Ok(Some(self.hand_out(text, last)));
                    }
                    self.pending.extend(split_text(text, MAX_PIECE_BYTES));
                    self.source_ended_doc = last;
                    continue;
                }
                self.current = None;
                if !self.at_doc_start {
                    // A source never ends inside a document; guard the counts anyway.
                    self.finish_doc();
                }
            }
            let Some(file) = self.files.get(self.next_file) else {
                return Ok(None);
            };
            self.next_file += 1;
            self.current = Some(open_source(file, &self.opts, &self.bytes_read)?);
        }
    }

    fn hand_out(&mut self, text: String, last: bool) -> Piece {
        let piece = Piece { text, doc: self.next_index, first: self.at_doc_start, last };
        self.pieces_of_doc += 1;
        self.at_doc_start = false;
        if last {
            self.finish_doc();
        }
        piece
    }

    fn finish_doc(&mut self) {
        if self.pieces_of_doc > 1 {
            self.counts.split_documents += 1;
            self.counts.split_pieces += self.pieces_of_doc;
        }
        self.pieces_of_doc = 0;
        self.next_index += 1;
        self.at_doc_start = true;
    }
}

/// What the first bytes of a file say it is, when that is not text.
fn sniff_binary(head: &[u8], gzip: bool) -> Option<String> {
    let starts = |m: &[u8]| head.starts_with(m);
    let what = if starts(b"PK\x03\x04") || starts(b"PK\x05\x06") || starts(b"PK\x07\x08") {
        "is a ZIP archive (.docx, .xlsx, .odt and .epub files are ZIP archives), not text; export or extract its text first"
    } else if starts(b"%PDF-") {
        "is a PDF document, not text; extract its text first (e.g. pdftotext)"
    } else if starts(b"PAR1") {
        "is a Parquet file; give it a .parquet name or pass --format parquet"
    } else if starts(b"LMTBLOCK") {
        "is an lmtrain block store (the output of `train prepare`), not a corpus"
    } else if starts(b"\xFD7zXZ\x00") || (starts(b"BZh") && head.len() > 3 && head[3].is_ascii_digit()) || starts(b"\x28\xB5\x2F\xFD") {
        "is xz, bzip2 or zstd compressed; decompress it (or recompress it with gzip as .gz) first"
    } else if starts(b"\x1f\x8b") && gzip {
        "holds gzip data inside gzip data; decompress it once first"
    } else if starts(b"\xFF\xFE") || starts(b"\xFE\xFF") {
        "is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
    } else if let Some(at) = head.iter().position(|&b| b == 0) {
        return Some(format!(
            "looks like a binary file, not text (NUL byte at offset {at}{}); give a .txt, .jsonl, .csv or .parquet corpus",
            if gzip { " of the decompressed data" } else { "" }
        ));
    } else {
        return None;
    };
    Some(what.to_string())
}

/// Fills `reader`'s buffer with up to [`SNIFF_BYTES`] (fewer at the end of the stream) and
/// returns a copy of them.
fn peek(reader: &mut BufReader<Box<dyn Read + Send>>, path: &Path) -> Result<Vec<u8>, TextError> {
    // One `fill_buf` may return less than asked (a pipe, a gzip member boundary): what it
    // gives is enough to recognise a format; short reads only make the NUL check shorter.
    let head = reader.fill_buf().map_err(TextError::io(path))?;
    Ok(head[..head.len().min(SNIFF_BYTES)].to_vec())
}

fn open_source(file: &CorpusFile, opts: &ReadOptions, counter: &Arc<AtomicU64>) -> Result<Box<dyn DocSource>, TextError> {
    let path = &file.path;
    if file.format == CorpusFormat::Parquet {
        if file.gzip {
            return Err(TextError::Parquet {
                path: path.clone(),
                msg: "gzip-compressed Parquet is not supported (Parquet compresses internally); decompress it first".into(),
            });
        }
        return Ok(Box::new(ParquetSource::open(file, opts, counter.clone())?));
    }
    let raw = CountingReader { inner: File::open(path).map_err(TextError::io(path))?, counter: counter.clone() };
    let mut reader: BufReader<Box<dyn Read + Send>> = BufReader::with_capacity(1 << 18, Box::new(raw));
    let mut gzip = file.gzip;
    // gzip data without a .gz name is decompressed all the same.
    if !gzip && peek(&mut reader, path)?.starts_with(b"\x1f\x8b") {
        gzip = true;
    }
    if gzip {
        let decoder: Box<dyn Read + Send> = Box::new(flate2::read::MultiGzDecoder::new(reader));
        reader = BufReader::with_capacity(1 << 18, decoder);
    }
    if let Some(what) = sniff_binary(&peek(&mut reader, path)?, gzip) {
        return Err(TextError::NotText { path: path.clone(), what });
    }
    let limit = if file.format == CorpusFormat::Txt { MAX_PIECE_BYTES } else { MAX_RECORD_BYTES };
    let lines = LineReader { inner: reader, path: path.clone(), gzip, offset: 0, line_no: 0, buf: Vec::new(), consumed: 0, limit };
    Ok(match file.format {
        CorpusFormat::Txt => match opts.txt_documents {
            TxtDocuments::Lines => Box::new(TxtLines { lines, skip_invalid: opts.skip_invalid, open: false }),
            TxtDocuments::Paragraphs => Box::new(TxtParagraphs::new(lines, opts.skip_invalid)),
        },
        CorpusFormat::Jsonl => Box::new(JsonLines { lines, field: opts.text_field.clone(), skip_invalid: opts.skip_invalid }),
        CorpusFormat::Csv => Box::new(CsvSource::open(lines, &opts.text_column, opts.skip_invalid)?),
        CorpusFormat::Parquet => unreachable!("handled above"),
    })
}

/// Lines of a (decompressed) byte stream, with their byte offsets, read in segments of at
/// most `limit` bytes so that one line never has to fit in memory whole.
struct LineReader {
    inner: BufReader<Box<dyn Read + Send>>,
    path: PathBuf,
    gzip: bool,
    /// Stream offset of `buf[0]`.
    offset: u64,
    /// Lines completed so far.
    line_no: u64,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` handed out by the last call.
    consumed: usize,
    limit: usize,
}

/// A segment of a line.
struct Segment<'a> {
    /// Stream offset of its first byte.
    start: u64,
    /// Its bytes, without the line's `\n` / `\r\n`.
    bytes: &'a [u8],
    /// Whether the line ends here (else the next segment continues it).
    complete: bool,
}

impl LineReader {
    /// The next segment: the rest of the current line, or its next `limit` bytes or fewer
    /// when it is longer (cut by [`cut_point`]).
    fn next_segment(&mut self) -> Result<Option<Segment<'_>>, TextError> {
        self.buf.drain(..self.consumed);
        self.offset += self.consumed as u64;
        self.consumed = 0;
        loop {
            if self.buf.last() == Some(&b'\n') {
                break;
            }
            if self.buf.len() >= self.limit {
                let cut = cut_point(&self.buf, self.limit);
                self.consumed = cut;
                return Ok(Some(Segment { start: self.offset, bytes: &self.buf[..cut], complete: false }));
            }
            let avail = self.inner.fill_buf().map_err(TextError::io(&self.path))?;
            if avail.is_empty() {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                break; // the last line has no newline
            }
            let room = self.limit - self.buf.len();
            let window = &avail[..avail.len().min(room)];
            let take = window.iter().position(|&b| b == b'\n').map_or(window.len(), |i| i + 1);
            self.buf.extend_from_slice(&window[..take]);
            self.inner.consume(take);
        }
        self.consumed = self.buf.len();
        self.line_no += 1;
        let mut line = &self.buf[..];
        if let Some(l) = line.strip_suffix(b"\n") {
            line = l;
        }
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        Ok(Some(Segment { start: self.offset, bytes: line, complete: true }))
    }

    fn invalid(&self, offset: u64) -> TextError {
        TextError::InvalidUtf8 { path: self.path.clone(), offset, decompressed: self.gzip }
    }
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

struct TxtLines {
    lines: LineReader,
    skip_invalid: bool,
    /// A long line is being handed out in pieces.
    open: bool,
}

impl DocSource for TxtLines {
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError> {
        loop {
            let open = self.open;
            let Some(seg) = self.lines.next_segment()? else { return Ok(None) };
            let (start, complete) = (seg.start, seg.complete);
            if !open && is_blank(seg.bytes) {
                continue;
            }
            match std::str::from_utf8(seg.bytes) {
                Ok(s) => {
                    let text = s.to_owned();
                    self.open = !complete;
                    return Ok(Some((text, complete)));
                }
                Err(_) if self.skip_invalid => {
                    counts.skipped_invalid += 1;
                    // Skip the rest of the line too; a piece already handed out ends the document.
                    let mut complete = complete;
                    while !complete {
                        match self.lines.next_segment()? {
                            Some(seg) => complete = seg.complete,
                            None => break,
                        }
                    }
                    self.open = false;
                    if open {
                        return Ok(Some((String::new(), true)));
                    }
                }
                Err(e) => {
                    let at = start + e.valid_up_to() as u64;
                    return Err(self.lines.invalid(at));
                }
            }
        }
    }
}

struct TxtParagraphs {
    lines: LineReader,
    skip_invalid: bool,
    /// The part of the paragraph not handed out yet.
    doc: String,
    /// Pieces ready to hand out, with whether each ends its paragraph.
    ready: VecDeque<(String, bool)>,
    /// A paragraph with an invalid line is skipped as a whole (with --skip-invalid).
    poisoned: bool,
    /// The paragraph has text (in `doc` or already handed out).
    has_text: bool,
    /// Pieces of the paragraph were queued already.
    started: bool,
    /// The next segment starts a new line (else it continues a long one).
    line_start: bool,
}

impl TxtParagraphs {
    fn new(lines: LineReader, skip_invalid: bool) -> TxtParagraphs {
        TxtParagraphs {
            lines,
            skip_invalid,
            doc: String::new(),
            ready: VecDeque::new(),
            poisoned: false,
            has_text: false,
            started: false,
            line_start: true,
        }
    }

    /// Moves full pieces of an over-long paragraph to `ready`.
    fn cut_long(&mut self) {
        while self.doc.len() > MAX_PIECE_BYTES {
            let cut = cut_point(self.doc.as_bytes(), MAX_PIECE_BYTES);
            let rest = self.doc.split_off(cut);
            self.ready.push_back((std::mem::replace(&mut self.doc, rest), false));
            self.started = true;
        }
    }

    /// Ends the paragraph being built.
    fn end_paragraph(&mut self, counts: &mut ReadCounts) {
        if self.poisoned {
            counts.skipped_invalid += 1;
            self.doc.clear();
            if self.started {
                // Pieces were queued already: close their document.
                self.ready.push_back((String::new(), true));
            }
        } else if self.has_text {
            self.ready.push_back((std::mem::take(&mut self.doc), true));
        }
        self.poisoned = false;
        self.has_text = false;
        self.started = false;
        self.line_start = true;
    }
}

impl DocSource for TxtParagraphs {
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Ok(Some(piece));
            }
            let line_start = self.line_start;
            let Some(seg) = self.lines.next_segment()? else {
                self.end_paragraph(counts);
                return Ok(self.ready.pop_front());
            };
            let (start, complete) = (seg.start, seg.complete);
            if complete && line_start && is_blank(seg.bytes) {
                self.end_paragraph(counts);
                continue;
            }
            match std::str::from_utf8(seg.bytes) {
                Ok(s) => {
                    if !self.poisoned {
                        if self.has_text && line_start {
                            self.doc.push('\n');
                        }
                        self.doc.push_str(s);
                        self.has_text = true;
                    }
                    self.line_start = complete;
                    self.cut_long();
                }
                Err(_) if self.skip_invalid => {
                    self.poisoned = true;
                    self.line_start = complete;
                }
                Err(e) => return Err(self.lines.invalid(start + e.valid_up_to() as u64)),
            }
        }
    }
}

struct JsonLines {
    lines: LineReader,
    field: String,
    skip_invalid: bool,
}

impl DocSource for JsonLines {
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError> {
        while let Some(seg) = self.lines.next_segment()? {
            let (start, line) = (seg.start, seg.bytes);
            if !seg.complete {
                return Err(TextError::TooLong {
                    path: self.lines.path.clone(),
                    line: self.lines.line_no + 1,
                    kind: "line",
                    limit: MAX_RECORD_BYTES,
                });
            }
            if is_blank(line) {
                continue;
            }
            let text = match std::str::from_utf8(line) {
                Ok(s) => s,
                Err(_) if self.skip_invalid => {
                    counts.skipped_invalid += 1;
                    continue;
                }
                Err(e) => return Err(self.lines.invalid(start + e.valid_up_to() as u64)),
            };
            let parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text);
            let (path, line_no) = (&self.lines.path, self.lines.line_no);
            let mut obj = parsed.map_err(|e| TextError::Json { path: path.clone(), line: line_no, msg: e.to_string() })?;
            let bad = |problem: String| TextError::BadField { path: path.clone(), line: line_no, problem };
            match obj.remove(&self.field) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => return Ok(Some((s, true))),
                Some(serde_json::Value::String(_) | serde_json::Value::Null) => counts.skipped_empty += 1,
                Some(other) => {
                    let kind = match other {
                        serde_json::Value::Bool(_) => "a boolean",
                        serde_json::Value::Number(_) => "a number",
                        serde_json::Value::Array(_) => "an array",
                        _ => "an object",
                    };
                    return Err(bad(format!("field {:?} is {kind}, not a string", self.field)));
                }
                None => {
                    let fields: Vec<&str> = obj.keys().map(String::as_str).collect();
                    return Err(bad(format!("no field {:?} (fields: {})", self.field, fields.join(", "))));
                }
            }
        }
        Ok(None)
    }
}

/// Marks the I/O error [`Limited`] raises when a CSV record is too long.
#[derive(Debug)]
struct RecordTooLong;

impl std::fmt::Display for RecordTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record longer than {MAX_RECORD_BYTES} bytes")
    }
}

impl std::error::Error for RecordTooLong {}

/// Fails reads once more than [`MAX_RECORD_BYTES`] were read since the last `reset`: bounds
/// what the CSV parser buffers for one record.
struct Limited {
    inner: BufReader<Box<dyn Read + Send>>,
    since_reset: usize,
}

impl Read for Limited {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.since_reset > MAX_RECORD_BYTES {
            return Err(std::io::Error::other(RecordTooLong));
        }
        let n = self.inner.read(buf)?;
        self.since_reset += n;
        Ok(n)
    }
}

struct CsvSource {
    reader: csv::Reader<Limited>,
    path: PathBuf,
    gzip: bool,
    column: usize,
    record: csv::ByteRecord,
    skip_invalid: bool,
    records: u64,
}

impl CsvSource {
    fn open(lines: LineReader, column: &str, skip_invalid: bool) -> Result<CsvSource, TextError> {
        let LineReader { inner, path, gzip, .. } = lines;
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(Limited { inner, since_reset: 0 });
        let headers = reader.byte_headers().map_err(|e| csv_error(&path, &e, 1))?;
        let names: Vec<String> = headers.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect();
        let Some(index) = names.iter().position(|n| n == column) else {
            return Err(TextError::MissingColumn { path, column: column.into(), available: names.join(", ") });
        };
        Ok(CsvSource { reader, path, gzip, column: index, record: csv::ByteRecord::new(), skip_invalid, records: 1 })
    }
}

/// A CSV error, or [`TextError::TooLong`] when the record was cut off by [`Limited`].
fn csv_error(path: &Path, e: &csv::Error, record: u64) -> TextError {
    if let csv::ErrorKind::Io(io) = e.kind()
        && io.get_ref().is_some_and(|inner| inner.is::<RecordTooLong>())
    {
        return TextError::TooLong { path: path.to_path_buf(), line: record, kind: "record", limit: MAX_RECORD_BYTES };
    }
    TextError::csv(path, e)
}

impl DocSource for CsvSource {
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError> {
        loop {
            self.reader.get_mut().since_reset = 0;
            self.records += 1;
            let more = self.reader.read_byte_record(&mut self.record).map_err(|e| csv_error(&self.path, &e, self.records))?;
            if !more {
                return Ok(None);
            }
            let field = self.record.get(self.column).unwrap_or_default();
            if is_blank(field) {
                counts.skipped_empty += 1;
                continue;
            }
            match std::str::from_utf8(field) {
                Ok(s) => return Ok(Some((s.to_owned(), true))),
                Err(_) if self.skip_invalid => counts.skipped_invalid += 1,
                Err(e) => {
                    // The record's start offset plus the field's position in the parsed
                    // record: exact for unquoted fields, close for quoted ones.
                    let record_start = self.record.position().map_or(0, |p| p.byte());
                    let before: usize = (0..self.column).map(|k| self.record[k].len() + 1).sum();
                    let offset = record_start + before as u64 + e.valid_up_to() as u64;
                    return Err(TextError::InvalidUtf8 { path: self.path.clone(), offset, decompressed: self.gzip });
                }
            }
        }
    }
}

/// Reads one string column of a Parquet file, row group by row group.
struct ParquetSource {
    reader: SerializedFileReader<File>,
    path: PathBuf,
    column: usize,
    next_row_group: usize,
    current: Option<ColumnReaderImpl<ByteArrayType>>,
    pending: VecDeque<ByteArray>,
    /// Null values met since the last `next_doc`.
    nulls: u64,
    values: Vec<ByteArray>,
    def_levels: Vec<i16>,
    size: u64,
    counter: Arc<AtomicU64>,
    skip_invalid: bool,
}

impl ParquetSource {
    fn open(file: &CorpusFile, opts: &ReadOptions, counter: Arc<AtomicU64>) -> Result<ParquetSource, TextError> {
        let column = opts.text_column.as_str();
        let path = file.path.clone();
        let perr = |e: parquet::errors::ParquetError| TextError::Parquet { path: path.clone(), msg: e.to_string() };
        let reader = SerializedFileReader::new(File::open(&path).map_err(TextError::io(&path))?).map_err(perr)?;
        let schema = reader.metadata().file_metadata().schema_descr();
        let names: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
        let Some(index) = names.iter().position(|n| n == column) else {
            return Err(TextError::MissingColumn { path, column: column.into(), available: names.join(", ") });
        };
        if schema.column(index).physical_type() != parquet::basic::Type::BYTE_ARRAY {
            return Err(TextError::Parquet {
                path,
                msg: format!("column {column:?} is {}, not a string column", schema.column(index).physical_type()),
            });
        }
        Ok(ParquetSource {
            reader,
            path: path.clone(),
            column: index,
            next_row_group: 0,
            current: None,
            pending: VecDeque::new(),
            nulls: 0,
            values: Vec::new(),
            def_levels: Vec::new(),
            size: file.size,
            counter,
            skip_invalid: opts.skip_invalid,
        })
    }

    /// Refills `pending`; false at the end of the file.
    fn refill(&mut self) -> Result<bool, TextError> {
        let perr = |e: parquet::errors::ParquetError| TextError::Parquet { path: self.path.clone(), msg: e.to_string() };
        loop {
            if let Some(col) = &mut self.current {
                self.values.clear();
                self.def_levels.clear();
                let (records, values, _) = col.read_records(1024, Some(&mut self.def_levels), None, &mut self.values).map_err(perr)?;
                if records > 0 {
                    // Nulls have no entry in `values`: they are skipped, and counted.
                    self.nulls += records.saturating_sub(values) as u64;
                    self.pending.extend(self.values.drain(..));
                    return Ok(true);
                }
                self.current = None;
            }
            if self.next_row_group >= self.reader.num_row_groups() {
                self.counter.fetch_add(self.size, Ordering::Relaxed);
                return Ok(false);
            }
            let rg = self.reader.get_row_group(self.next_row_group).map_err(perr)?;
            self.next_row_group += 1;
            match rg.get_column_reader(self.column).map_err(perr)? {
                ColumnReader::ByteArrayColumnReader(r) => self.current = Some(r),
                _ => unreachable!("physical type checked in open"),
            }
        }
    }
}

impl DocSource for ParquetSource {
    fn next_doc(&mut self, counts: &mut ReadCounts) -> Result<Option<(String, bool)>, TextError> {
        loop {
            counts.skipped_empty += std::mem::take(&mut self.nulls);
            let Some(value) = self.pending.pop_front() else {
                if self.refill()? {
                    continue;
                }
                counts.skipped_empty += std::mem::take(&mut self.nulls);
                return Ok(None);
            };
            let bytes = value.data();
            if is_blank(bytes) {
                counts.skipped_empty += 1;
                continue;
            }
            match std::str::from_utf8(bytes) {
                Ok(s) => return Ok(Some((s.to_owned(), true))),
                Err(_) if self.skip_invalid => counts.skipped_invalid += 1,
                Err(e) => {
                    return Err(TextError::Parquet {
                        path: self.path.clone(),
                        msg: format!(
                            "invalid UTF-8 at byte {} of a value of the text column; pass --skip-invalid to skip such documents",
                            e.valid_up_to()
                        ),
                    });
                }
            }
        }
    }
}
