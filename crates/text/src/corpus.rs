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
            _ => TextError::Io { path: input.clone(), source: e },
        })?;
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
    /// The next document, or `None` at the end of the file. Documents skipped for invalid
    /// UTF-8 are counted in `skipped`.
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError>;
}

/// The documents of a whole corpus, file after file.
pub(crate) struct Documents {
    files: Vec<CorpusFile>,
    opts: ReadOptions,
    next_file: usize,
    current: Option<Box<dyn DocSource>>,
    /// Bytes read from disk so far (compressed bytes for .gz files).
    pub bytes_read: Arc<AtomicU64>,
    /// Documents skipped because of invalid UTF-8.
    pub skipped_invalid: u64,
}

impl Documents {
    pub fn new(files: Vec<CorpusFile>, opts: ReadOptions) -> Documents {
        Documents { files, opts, next_file: 0, current: None, bytes_read: Arc::default(), skipped_invalid: 0 }
    }

    /// Total size on disk of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The next document of the corpus.
    pub fn next_doc(&mut self) -> Result<Option<String>, TextError> {
        loop {
            if let Some(src) = &mut self.current {
                if let Some(doc) = src.next_doc(&mut self.skipped_invalid)? {
                    return Ok(Some(doc));
                }
                self.current = None;
            }
            let Some(file) = self.files.get(self.next_file) else {
                return Ok(None);
            };
            self.next_file += 1;
            self.current = Some(open_source(file, &self.opts, &self.bytes_read)?);
        }
    }
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
    let stream: Box<dyn Read + Send> =
        if file.gzip { Box::new(flate2::read::MultiGzDecoder::new(raw)) } else { Box::new(raw) };
    let reader = BufReader::with_capacity(1 << 18, stream);
    let lines = LineReader { inner: reader, path: path.clone(), gzip: file.gzip, offset: 0, line_no: 0, buf: Vec::new() };
    Ok(match file.format {
        CorpusFormat::Txt => match opts.txt_documents {
            TxtDocuments::Lines => Box::new(TxtLines { lines, skip_invalid: opts.skip_invalid }),
            TxtDocuments::Paragraphs => Box::new(TxtParagraphs { lines, skip_invalid: opts.skip_invalid }),
        },
        CorpusFormat::Jsonl => Box::new(JsonLines { lines, field: opts.text_field.clone(), skip_invalid: opts.skip_invalid }),
        CorpusFormat::Csv => Box::new(CsvSource::open(lines, &opts.text_column, opts.skip_invalid)?),
        CorpusFormat::Parquet => unreachable!("handled above"),
    })
}

/// Lines of a (decompressed) byte stream, with their byte offsets.
struct LineReader {
    inner: BufReader<Box<dyn Read + Send>>,
    path: PathBuf,
    gzip: bool,
    offset: u64,
    line_no: u64,
    buf: Vec<u8>,
}

impl LineReader {
    /// The next line without its `\n` / `\r\n`, and the offset where it starts.
    fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, TextError> {
        self.buf.clear();
        let n = self.inner.read_until(b'\n', &mut self.buf).map_err(TextError::io(&self.path))?;
        if n == 0 {
            return Ok(None);
        }
        let start = self.offset;
        self.offset += n as u64;
        self.line_no += 1;
        let mut line = &self.buf[..];
        if let Some(l) = line.strip_suffix(b"\n") {
            line = l;
        }
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        Ok(Some((start, line)))
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
}

impl DocSource for TxtLines {
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError> {
        while let Some((start, line)) = self.lines.next_line()? {
            if is_blank(line) {
                continue;
            }
            match std::str::from_utf8(line) {
                Ok(s) => return Ok(Some(s.to_owned())),
                Err(_) if self.skip_invalid => *skipped += 1,
                Err(e) => return Err(self.lines.invalid(start + e.valid_up_to() as u64)),
            }
        }
        Ok(None)
    }
}

struct TxtParagraphs {
    lines: LineReader,
    skip_invalid: bool,
}

impl DocSource for TxtParagraphs {
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError> {
        let mut doc = String::new();
        // A paragraph with an invalid line is skipped as a whole (with --skip-invalid).
        let mut poisoned = false;
        while let Some((start, line)) = self.lines.next_line()? {
            if is_blank(line) {
                if poisoned {
                    *skipped += 1;
                    poisoned = false;
                    doc.clear();
                    continue;
                }
                if doc.is_empty() {
                    continue;
                }
                return Ok(Some(doc));
            }
            match std::str::from_utf8(line) {
                Ok(s) => {
                    if !doc.is_empty() {
                        doc.push('\n');
                    }
                    doc.push_str(s);
                }
                Err(_) if self.skip_invalid => poisoned = true,
                Err(e) => return Err(self.lines.invalid(start + e.valid_up_to() as u64)),
            }
        }
        if poisoned {
            *skipped += 1;
            return Ok(None);
        }
        Ok((!doc.is_empty()).then_some(doc))
    }
}

struct JsonLines {
    lines: LineReader,
    field: String,
    skip_invalid: bool,
}

impl DocSource for JsonLines {
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError> {
        while let Some((start, line)) = self.lines.next_line()? {
            if is_blank(line) {
                continue;
            }
            let text = match std::str::from_utf8(line) {
                Ok(s) => s,
                Err(_) if self.skip_invalid => {
                    *skipped += 1;
                    continue;
                }
                Err(e) => return Err(self.lines.invalid(start + e.valid_up_to() as u64)),
            };
            let parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text);
            let (path, line_no) = (&self.lines.path, self.lines.line_no);
            let mut obj =
                parsed.map_err(|e| TextError::Json { path: path.clone(), line: line_no, msg: e.to_string() })?;
            let bad = |problem: String| TextError::BadField { path: path.clone(), line: line_no, problem };
            match obj.remove(&self.field) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => return Ok(Some(s)),
                Some(serde_json::Value::String(_) | serde_json::Value::Null) => continue,
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

struct CsvSource {
    reader: csv::Reader<BufReader<Box<dyn Read + Send>>>,
    path: PathBuf,
    gzip: bool,
    column: usize,
    record: csv::ByteRecord,
    skip_invalid: bool,
}

impl CsvSource {
    fn open(lines: LineReader, column: &str, skip_invalid: bool) -> Result<CsvSource, TextError> {
        let LineReader { inner, path, gzip, .. } = lines;
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(inner);
        let headers = reader.byte_headers().map_err(|e| TextError::Csv { path: path.clone(), msg: e.to_string() })?;
        let names: Vec<String> = headers.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect();
        let Some(index) = names.iter().position(|n| n == column) else {
            return Err(TextError::MissingColumn { path, column: column.into(), available: names.join(", ") });
        };
        Ok(CsvSource { reader, path, gzip, column: index, record: csv::ByteRecord::new(), skip_invalid })
    }
}

impl DocSource for CsvSource {
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError> {
        loop {
            let more = self
                .reader
                .read_byte_record(&mut self.record)
                .map_err(|e| TextError::Csv { path: self.path.clone(), msg: e.to_string() })?;
            if !more {
                return Ok(None);
            }
            let field = self.record.get(self.column).unwrap_or_default();
            if is_blank(field) {
                continue;
            }
            match std::str::from_utf8(field) {
                Ok(s) => return Ok(Some(s.to_owned())),
                Err(_) if self.skip_invalid => *skipped += 1,
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
                let (records, _, _) =
                    col.read_records(1024, Some(&mut self.def_levels), None, &mut self.values).map_err(perr)?;
                if records > 0 {
                    // Nulls have no entry in `values`, so they are skipped naturally.
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
    fn next_doc(&mut self, skipped: &mut u64) -> Result<Option<String>, TextError> {
        loop {
            let Some(value) = self.pending.pop_front() else {
                if self.refill()? {
                    continue;
                }
                return Ok(None);
            };
            let bytes = value.data();
            if is_blank(bytes) {
                continue;
            }
            match std::str::from_utf8(bytes) {
                Ok(s) => return Ok(Some(s.to_owned())),
                Err(_) if self.skip_invalid => *skipped += 1,
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
