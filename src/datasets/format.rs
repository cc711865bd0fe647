//! Dataset containers and formats: detection and validation, streamed from disk.
//!
//! A dataset is one file in one of three **containers**:
//!
//! * [`Container::Json`]: a JSON array of records (first non-whitespace byte `[`);
//! * [`Container::Jsonl`]: JSON Lines, one record object per line, blank lines skipped (first
//!   non-whitespace byte `{`);
//! * [`Container::Csv`]: CSV with a header row, chosen when the content does not start with `[`
//!   or `{` and either the client's file name ends in `.csv` or the first line is a header with
//!   `instruction` and `output` columns. Blank lines are skipped.
//!
//! The content decides between JSON and JSON Lines; a `.json`/`.jsonl` name is only a hint. A
//! UTF-8 byte order mark is skipped; UTF-16 text is refused.
//!
//! The records of a JSON file are in one of three **formats** (LlamaFactory's names), decided by
//! the first record; every later record must have the same shape:
//!
//! * [`DatasetFormat::Alpaca`] (`instruction`/`output` keys): `instruction` and `output` strings,
//!   optional `input` and `system` strings (or null), optional `history` of `[prompt, response]`
//!   string pairs. `output` must not be blank, nor may the prompt (`instruction` + `input`).
//! * [`DatasetFormat::Sharegpt`] (`conversations` key): turns `{"from", "value"}` with `from` one of
//!   `human`, `gpt`, `system`, `function_call`, `observation`. One `system` turn may come first;
//!   then turns alternate human/observation and gpt/function_call, starting with the former and
//!   ending with the latter (LlamaFactory drops any other record silently). Optional top-level
//!   `system` and `tools` strings (or null).
//! * [`DatasetFormat::Openai`] (`messages` key): the same rules with `{"role", "content"}` turns:
//!   `system` first if present, then `user`/`tool` alternating with `assistant`/`function`,
//!   ending with `assistant`/`function`. `function` is the assistant calling a function (it takes
//!   the place of ShareGPT's `function_call`) and `tool` is the result (ShareGPT's `observation`),
//!   so the LlamaFactory tags are `user_tag=user`, `assistant_tag=assistant`,
//!   `observation_tag=tool`, `function_tag=function`, `system_tag=system`. `content` must be a
//!   string for every role: assistant turns with `"content": null` and `tool_calls` are refused.
//!
//! In both conversation formats the text of human/user, gpt/assistant and
//! function_call/function turns must not be blank; system and observation/tool turns may be.
//! Fields other than those named here are ignored. A record with the keys of two formats
//! (say `instruction` and `messages`) is refused as ambiguous.
//!
//! A CSV file is always alpaca: `instruction` and `output` columns are required, `input` and
//! `system` are optional, other columns are ignored (and left out of previews). Header names are
//! compared after trimming whitespace, case-sensitively. Empty `input`/`system` cells count as
//! absent.
//!
//! # Locations
//!
//! A [`FormatError`] names where the problem is:
//!
//! * JSON array: `record N (line L)`: N is the 1-based position of the record in the array, L
//!   the 1-based line on which it starts;
//! * JSON Lines: `line N`: the 1-based physical line (blank lines count);
//! * CSV: `row N`: the 1-based data row (the header is not counted, so row 1 is the record after
//!   the header; a quoted cell may span several lines), or `header`;
//! * JSON syntax and UTF-8 errors: `line L, column C`, both 1-based, the column counted in
//!   bytes (as serde_json counts); just `line L` when the array or a JSON Lines record ends
//!   early;
//! * problems with the whole file (empty, no records, unknown content): no location.
//!
//! Within a record, nested places are JSON paths with 0-based indexes, as in
//! ``record 3 (line 9): conversations[1]: expected a gpt or function_call turn, found `human` ``.
//!
//! Everything is streamed: one record (one JSON value, JSON Lines line or CSV row) is in memory
//! at a time, however long.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserializer as _;
use serde::de::{self, SeqAccess, Visitor};
use serde_json::{Map, Value};

const UTF8_BOM: &[u8; 3] = b"\xEF\xBB\xBF";
const READ_BUFFER: usize = 256 * 1024;
/// How much of a file without a `.csv` name is read to look for a CSV header.
const CSV_SNIFF_BYTES: u64 = 64 * 1024;

const UNKNOWN_CONTENT: &str = "expected a JSON array, JSON Lines, or CSV with alpaca columns";
const UNKNOWN_SHAPE: &str = "unknown shape: expected alpaca (`instruction`/`output`), sharegpt \
                             (`conversations`) or OpenAI (`messages`) fields";
const JSONL_INCOMPLETE: &str = "the JSON record is incomplete; JSON Lines needs one complete \
                                record per line (a JSON array of records is also accepted)";

/// The shape of the records (LlamaFactory's `formatting`, plus OpenAI-style `messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Alpaca,
    Sharegpt,
    Openai,
}

impl DatasetFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Sharegpt => "sharegpt",
            DatasetFormat::Openai => "openai",
        }
    }

    /// The key(s) that identify the format, for messages.
    fn marker(&self) -> &'static str {
        match self {
            DatasetFormat::Alpaca => "`instruction`/`output`",
            DatasetFormat::Sharegpt => "`conversations`",
            DatasetFormat::Openai => "`messages`",
        }
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the records are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// A JSON array of records.
    Json,
    /// JSON Lines: one record per line.
    Jsonl,
    /// CSV with a header row (alpaca columns).
    Csv,
}

impl Container {
    /// The file name extension for this container, without the dot.
    pub fn extension(&self) -> &'static str {
        match self {
            Container::Json => "json",
            Container::Jsonl => "jsonl",
            Container::Csv => "csv",
        }
    }
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// What [`inspect`] found in a valid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub format: DatasetFormat,
    pub container: Container,
    /// The number of records (data rows for CSV).
    pub num_rows: u64,
    /// Top-level fields present in at least one record (CSV: those of `instruction`, `input`,
    /// `output` and `system` in the header), sorted.
    /// LlamaFactory needs to be told only about optional columns that exist.
    pub columns: Vec<String>,
}

/// What is wrong with a dataset, and where (see the module documentation for the location
/// convention). Displays as `location: message`, or just the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub location: Option<String>,
    pub message: String,
}

impl FormatError {
    /// A problem with the whole file.
    pub fn new(message: impl Into<String>) -> Self {
        FormatError {
            location: None,
            message: message.into(),
        }
    }

    /// A problem at `location`.
    pub fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        FormatError {
            location: Some(location.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{location}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FormatError {}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The content is not a valid dataset; the message is meant for the user.
    #[error("{0}")]
    Invalid(FormatError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<FormatError> for InspectError {
    fn from(e: FormatError) -> Self {
        InspectError::Invalid(e)
    }
}

/// Detects the container and format of the file at `path` and validates every record.
///
/// `name_hint` is the client's file name; only its extension is used: `.csv` (any case)
/// selects CSV unless the content is JSON; `.json`/`.jsonl` are hints only.
pub fn inspect(path: &Path, name_hint: Option<&str>) -> Result<Summary, InspectError> {
    let first = {
        let mut reader = open_content(path)?;
        first_content_byte(&mut reader)?
    };
    let Some(first) = first else {
        return Err(FormatError::new("the file is empty").into());
    };
    let csv_hint = name_hint.is_some_and(|name| {
        Path::new(name)
            .extension()
            .and_then(OsStr::to_str)
            .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"))
    });

    let mut columns = std::collections::BTreeSet::new();
    let mut note_keys = |value: &Value| {
        if let Some(obj) = value.as_object() {
            for k in obj.keys() {
                if !columns.contains(k) {
                    columns.insert(k.clone());
                }
            }
        }
    };
    let (container, format, num_rows) = match first {
        b'[' => {
            let mut checker = Checker::default();
            let rows = stream_json_array(path, |value| {
                checker.check(&value)?;
                note_keys(&value);
                Ok(true)
            })?;
            (Container::Json, checker.format, rows)
        }
        b'{' => {
            let mut checker = Checker::default();
            let rows = stream_jsonl(path, |value| {
                checker.check(&value)?;
                note_keys(&value);
                Ok(true)
            })?;
            (Container::Jsonl, checker.format, rows)
        }
        _ if csv_hint || looks_like_alpaca_csv(path)? => {
            let rows = stream_csv(path, |row| row.check().map(|()| true))?;
            let mut reader = csv::Reader::from_reader(open_content(path)?);
            if let Ok(headers) = reader.headers() {
                for h in headers {
                    let h = h.trim();
                    if ["instruction", "input", "output", "system"].contains(&h) {
                        columns.insert(h.to_string());
                    }
                }
            }
            (Container::Csv, Some(DatasetFormat::Alpaca), rows)
        }
        _ => return Err(FormatError::new(UNKNOWN_CONTENT).into()),
    };
    match format {
        Some(format) if num_rows > 0 => Ok(Summary {
            format,
            container,
            num_rows,
            columns: columns.into_iter().collect(),
        }),
        _ => Err(FormatError::new("no records").into()),
    }
}

/// The first `limit` records as JSON objects, in file order. CSV rows become alpaca objects
/// with `instruction` and `output` and, when their cells are not empty, `input` and `system`
/// (other columns are left out). Assumes the file passed [`inspect`]; only the records
/// returned are read.
pub fn preview(
    path: &Path,
    container: Container,
    limit: usize,
) -> Result<Vec<Value>, InspectError> {
    let mut records = Vec::with_capacity(limit.min(1024));
    if limit == 0 {
        return Ok(records);
    }
    let mut take = |value: Value| {
        records.push(value);
        Ok(records.len() < limit)
    };
    match container {
        Container::Json => stream_json_array(path, &mut take)?,
        Container::Jsonl => stream_jsonl(path, &mut take)?,
        Container::Csv => stream_csv(path, |row| take(row.to_value()))?,
    };
    Ok(records)
}

// ---------------------------------------------------------------------------------------------
// Reading

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Opens the file positioned after a UTF-8 byte order mark, if any. UTF-16 text is refused.
fn open_content(path: &Path) -> Result<BufReader<File>, InspectError> {
    let mut file = File::open(path)?;
    let mut head = [0u8; 3];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let head = &head[..filled];
    if head.starts_with(b"\xFF\xFE") || head.starts_with(b"\xFE\xFF") {
        return Err(FormatError::new("the file is UTF-16 text; save it as UTF-8").into());
    }
    let offset = if head == UTF8_BOM { 3 } else { 0 };
    file.seek(SeekFrom::Start(offset))?;
    Ok(BufReader::with_capacity(READ_BUFFER, file))
}

/// The first byte that is not JSON whitespace (nothing is consumed from it on).
fn first_content_byte(reader: &mut impl BufRead) -> io::Result<Option<u8>> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(&b) = buf.iter().find(|b| !is_json_whitespace(**b)) {
            return Ok(Some(b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// The 1-based line on which the `index`th (1-based) element of the JSON array starts, found
/// by scanning the file again. Used only to report an invalid record: tracking lines while
/// parsing would make serde_json read through a wrapper byte by byte, several times slower.
/// The elements before `index` parsed, so a scan that only follows strings and brackets is
/// exact.
fn array_element_line(path: &Path, index: u64) -> Result<Option<u64>, InspectError> {
    let mut reader = open_content(path)?;
    let mut line = 1u64;
    let mut depth = 0u64;
    let mut in_string = false;
    let mut escaped = false;
    // Whether the next significant byte at depth 1 starts an element.
    let mut expecting = false;
    let mut seen = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        for &b in buf {
            if b == b'\n' {
                line += 1;
            }
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            if depth == 1 && expecting && !is_json_whitespace(b) && b != b',' && b != b']' {
                seen += 1;
                if seen == index {
                    return Ok(Some(line));
                }
                expecting = false;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth == 1 {
                        expecting = true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' if depth == 1 => expecting = true,
                _ => {}
            }
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// Why the array visitor stopped early.
enum Halt {
    /// The record at this 1-based index is invalid.
    Invalid(u64, String),
    Enough(u64),
}

/// Pulls the elements of a JSON array one at a time and hands them to `on_record`, which
/// returns whether to go on, or what is wrong with the record.
struct ArrayVisitor<'a, F> {
    halt: &'a mut Option<Halt>,
    on_record: F,
}

impl<'de, F> Visitor<'de> for ArrayVisitor<'_, F>
where
    F: FnMut(Value) -> Result<bool, String>,
{
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<u64, A::Error> {
        let mut count = 0u64;
        loop {
            let Some(value) = seq.next_element::<Value>()? else {
                return Ok(count);
            };
            count += 1;
            match (self.on_record)(value) {
                Ok(true) => {}
                Ok(false) => {
                    *self.halt = Some(Halt::Enough(count));
                    return Err(de::Error::custom("enough records"));
                }
                Err(message) => {
                    *self.halt = Some(Halt::Invalid(count, message));
                    return Err(de::Error::custom("invalid record"));
                }
            }
        }
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text);
    match message {
        "invalid unicode code point" => "not valid UTF-8 text".to_string(),
        _ => format!("invalid JSON: {message}"),
    }
}

/// Streams the records of a JSON array file; returns how many were read.
fn stream_json_array<F>(path: &Path, on_record: F) -> Result<u64, InspectError>
where
    F: FnMut(Value) -> Result<bool, String>,
{
    let reader = open_content(path)?;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut halt = None;
    let result = (&mut de).deserialize_seq(ArrayVisitor {
        halt: &mut halt,
        on_record,
    });
    match (halt, result) {
        (Some(Halt::Invalid(index, message)), _) => {
            let location = match array_element_line(path, index)? {
                Some(line) => format!("record {index} (line {line})"),
                None => format!("record {index}"),
            };
            Err(FormatError::at(location, message).into())
        }
        (Some(Halt::Enough(count)), _) => Ok(count),
        (None, Ok(count)) => match de.end() {
            Ok(()) => Ok(count),
            Err(e) if e.is_io() => Err(InspectError::Io(e.into())),
            Err(e) => Err(FormatError::at(
                format!("line {}, column {}", e.line(), e.column()),
                "unexpected content after the end of the JSON array",
            )
            .into()),
        },
        (None, Err(e)) if e.is_io() => Err(InspectError::Io(e.into())),
        (None, Err(e)) if e.is_eof() => Err(FormatError::at(
            format!("line {}", e.line()),
            "the file ends before the JSON array does",
        )
        .into()),
        (None, Err(e)) => Err(FormatError::at(
            format!("line {}, column {}", e.line(), e.column()),
            json_message(&e),
        )
        .into()),
    }
}

/// Streams the records of a JSON Lines file; returns how many were read.
fn stream_jsonl<F>(path: &Path, mut on_record: F) -> Result<u64, InspectError>
where
    F: FnMut(Value) -> Result<bool, String>,
{
    let mut reader = open_content(path)?;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut count = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(count);
        }
        line_no += 1;
        if line.iter().all(|b| is_json_whitespace(*b)) {
            continue;
        }
        let text = std::str::from_utf8(&line).map_err(|e| {
            FormatError::at(
                format!("line {line_no}, column {}", e.valid_up_to() + 1),
                "not valid UTF-8 text",
            )
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            if e.is_io() {
                InspectError::Io(e.into())
            } else if e.is_eof() {
                FormatError::at(format!("line {line_no}"), JSONL_INCOMPLETE).into()
            } else {
                let message = match json_message(&e).as_str() {
                    "invalid JSON: trailing characters" => {
                        "invalid JSON: unexpected content after the end of the record".to_string()
                    }
                    other => other.to_string(),
                };
                FormatError::at(format!("line {line_no}, column {}", e.column()), message).into()
            }
        })?;
        count += 1;
        match on_record(value) {
            Ok(true) => {}
            Ok(false) => return Ok(count),
            Err(message) => return Err(FormatError::at(format!("line {line_no}"), message).into()),
        }
    }
}

/// The alpaca columns of a CSV header.
struct CsvColumns {
    instruction: usize,
    output: usize,
    input: Option<usize>,
    system: Option<usize>,
}

fn header_name(name: &str) -> &str {
    name.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}')
}

impl CsvColumns {
    fn find(header: &csv::StringRecord) -> Result<CsvColumns, String> {
        let position = |wanted: &str| -> Result<Option<usize>, String> {
            let mut found = None;
            for (i, name) in header.iter().enumerate() {
                if header_name(name) == wanted {
                    if found.is_some() {
                        return Err(format!("column `{wanted}` appears more than once"));
                    }
                    found = Some(i);
                }
            }
            Ok(found)
        };
        let instruction = position("instruction")?;
        let output = position("output")?;
        let input = position("input")?;
        let system = position("system")?;
        match (instruction, output) {
            (Some(instruction), Some(output)) => Ok(CsvColumns {
                instruction,
                output,
                input,
                system,
            }),
            (None, None) => Err("missing columns `instruction` and `output`; an alpaca CSV \
                                 needs both"
                .to_string()),
            (None, Some(_)) => Err("missing column `instruction`; an alpaca CSV needs \
                                    `instruction` and `output` columns"
                .to_string()),
            (Some(_), None) => Err("missing column `output`; an alpaca CSV needs \
                                    `instruction` and `output` columns"
                .to_string()),
        }
    }
}

/// One CSV data row with the header's alpaca columns.
struct CsvRow<'a> {
    record: &'a csv::StringRecord,
    columns: &'a CsvColumns,
}

impl CsvRow<'_> {
    fn cell(&self, index: usize) -> &str {
        self.record.get(index).unwrap_or("")
    }

    /// An optional cell; empty counts as absent.
    fn optional(&self, index: Option<usize>) -> Option<&str> {
        index.map(|i| self.cell(i)).filter(|s| !s.is_empty())
    }

    fn check(&self) -> Result<(), String> {
        check_alpaca_text(
            self.cell(self.columns.instruction),
            self.columns.input.map(|i| self.cell(i)),
            self.cell(self.columns.output),
        )
    }

    fn to_value(&self) -> Value {
        let mut object = Map::new();
        object.insert(
            "instruction".into(),
            self.cell(self.columns.instruction).into(),
        );
        if let Some(input) = self.optional(self.columns.input) {
            object.insert("input".into(), input.into());
        }
        object.insert("output".into(), self.cell(self.columns.output).into());
        if let Some(system) = self.optional(self.columns.system) {
            object.insert("system".into(), system.into());
        }
        Value::Object(object)
    }
}

fn csv_error(e: csv::Error, header: Option<&csv::StringRecord>) -> InspectError {
    let row = |pos: Option<&csv::Position>| match pos.map(csv::Position::record) {
        Some(0) | None => "header".to_string(),
        Some(n) => format!("row {n}"),
    };
    match e.into_kind() {
        csv::ErrorKind::Io(e) => InspectError::Io(e),
        csv::ErrorKind::Utf8 { pos, err } => {
            let column = header
                .filter(|_| pos.as_ref().is_some_and(|p| p.record() > 0))
                .and_then(|h| h.get(err.field()))
                .map(|name| format!(" in column `{}`", header_name(name)))
                .unwrap_or_default();
            FormatError::at(row(pos.as_ref()), format!("not valid UTF-8 text{column}")).into()
        }
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => FormatError::at(
            row(pos.as_ref()),
            format!("has {len} fields but the header has {expected_len}"),
        )
        .into(),
        other => FormatError::new(format!("invalid CSV: {other:?}")).into(),
    }
}

/// Whether a file that is not JSON, and not named `.csv`, starts with an alpaca CSV header.
fn looks_like_alpaca_csv(path: &Path) -> Result<bool, InspectError> {
    let reader = open_content(path)?.take(CSV_SNIFF_BYTES);
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(reader);
    let mut header = csv::StringRecord::new();
    match csv.read_record(&mut header) {
        Ok(true) => Ok(CsvColumns::find(&header).is_ok()),
        Ok(false) => Ok(false),
        Err(e) => match e.into_kind() {
            csv::ErrorKind::Io(e) => Err(e.into()),
            _ => Ok(false),
        },
    }
}

/// Streams the data rows of a CSV file; returns how many were read.
fn stream_csv<F>(path: &Path, mut on_row: F) -> Result<u64, InspectError>
where
    F: FnMut(CsvRow<'_>) -> Result<bool, String>,
{
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(false)
        .from_reader(open_content(path)?);
    let mut header = csv::StringRecord::new();
    if !csv
        .read_record(&mut header)
        .map_err(|e| csv_error(e, None))?
    {
        return Ok(0);
    }
    let columns = CsvColumns::find(&header).map_err(|m| FormatError::at("header", m))?;
    let mut record = csv::StringRecord::new();
    let mut count = 0u64;
    while csv
        .read_record(&mut record)
        .map_err(|e| csv_error(e, Some(&header)))?
    {
        count += 1;
        let row = CsvRow {
            record: &record,
            columns: &columns,
        };
        match on_row(row) {
            Ok(true) => {}
            Ok(false) => break,
            Err(message) => return Err(FormatError::at(format!("row {count}"), message).into()),
        }
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------------
// Validation

/// "a string", "an array"... for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decides the format from the first record and holds every later record to it.
#[derive(Default)]
struct Checker {
    format: Option<DatasetFormat>,
}

impl Checker {
    fn check(&mut self, value: &Value) -> Result<(), String> {
        let Value::Object(record) = value else {
            return Err(format!("expected a JSON object, found {}", kind(value)));
        };
        let shape = shape_of(record)?;
        let format = match (self.format, shape) {
            (None, None) => return Err(UNKNOWN_SHAPE.to_string()),
            (None, Some(shape)) => {
                self.format = Some(shape);
                shape
            }
            (Some(first), Some(shape)) if shape != first => {
                return Err(format!(
                    "looks like {shape} ({}) but the file's first record is {first}",
                    shape.marker()
                ));
            }
            (Some(first), _) => first,
        };
        match format {
            DatasetFormat::Alpaca => check_alpaca(record),
            DatasetFormat::Sharegpt => check_dialogue(record, &SHAREGPT),
            DatasetFormat::Openai => check_dialogue(record, &OPENAI),
        }
    }
}

/// The format a record's keys point to; `None` when they point to none.
fn shape_of(record: &Map<String, Value>) -> Result<Option<DatasetFormat>, String> {
    let mut shapes = Vec::new();
    if record.contains_key("instruction") || record.contains_key("output") {
        shapes.push(DatasetFormat::Alpaca);
    }
    if record.contains_key("conversations") {
        shapes.push(DatasetFormat::Sharegpt);
    }
    if record.contains_key("messages") {
        shapes.push(DatasetFormat::Openai);
    }
    match shapes.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        [a, b, ..] => Err(format!(
            "ambiguous record: has both {a} ({}) and {b} ({}) fields",
            a.marker(),
            b.marker()
        )),
    }
}

fn required_str<'a>(record: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match record.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

/// A string field that may be missing or null.
fn optional_str<'a>(record: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match record.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn check_alpaca_text(instruction: &str, input: Option<&str>, output: &str) -> Result<(), String> {
    if is_blank(instruction) && input.is_none_or(is_blank) {
        return Err(match input {
            Some(_) => "`instruction` and `input` are both empty".to_string(),
            None => "`instruction` is empty".to_string(),
        });
    }
    if is_blank(output) {
        return Err("`output` is empty".to_string());
    }
    Ok(())
}

fn check_alpaca(record: &Map<String, Value>) -> Result<(), String> {
    let instruction = required_str(record, "instruction")?;
    let input = optional_str(record, "input")?;
    let output = required_str(record, "output")?;
    optional_str(record, "system")?;
    match record.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(_), Value::String(_)]) => {}
                    _ => {
                        return Err(format!(
                            "history[{i}]: expected a [prompt, response] pair of strings"
                        ));
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "`history` must be an array of [prompt, response] pairs, found {}",
                kind(other)
            ));
        }
    }
    check_alpaca_text(instruction, input, output)
}

/// The names of a conversation format.
struct Dialect {
    list: &'static str,
    role: &'static str,
    content: &'static str,
    system: &'static str,
    /// Allowed at the 1st, 3rd... turn after the optional system turn.
    prompt_roles: [&'static str; 2],
    /// Allowed at the 2nd, 4th... turn; the last turn is one of these.
    reply_roles: [&'static str; 2],
    /// Roles whose text may be blank (besides the system turn).
    may_be_blank: &'static str,
    /// Every role, for messages.
    all_roles: &'static str,
}

const SHAREGPT: Dialect = Dialect {
    list: "conversations",
    role: "from",
    content: "value",
    system: "system",
    prompt_roles: ["human", "observation"],
    reply_roles: ["gpt", "function_call"],
    may_be_blank: "observation",
    all_roles: "human, gpt, system, function_call or observation",
};

const OPENAI: Dialect = Dialect {
    list: "messages",
    role: "role",
    content: "content",
    system: "system",
    prompt_roles: ["user", "tool"],
    reply_roles: ["assistant", "function"],
    may_be_blank: "tool",
    all_roles: "system, user, assistant, tool or function",
};

fn check_dialogue(record: &Map<String, Value>, dialect: &Dialect) -> Result<(), String> {
    let list = dialect.list;
    let turns = match record.get(list) {
        None => return Err(format!("missing field `{list}`")),
        Some(Value::Array(turns)) => turns,
        Some(other) => return Err(format!("`{list}` must be an array, found {}", kind(other))),
    };
    if turns.is_empty() {
        return Err(format!("`{list}` is empty"));
    }
    // Turns after the optional system turn.
    let mut position = 0usize;
    let mut last_role = "";
    for (i, turn) in turns.iter().enumerate() {
        let at = |message: String| format!("{list}[{i}]: {message}");
        let Value::Object(turn) = turn else {
            return Err(at(format!(
                "expected an object with `{}` and `{}`, found {}",
                dialect.role,
                dialect.content,
                kind(turn)
            )));
        };
        let role = required_str(turn, dialect.role).map_err(at)?;
        let is_prompt = dialect.prompt_roles.contains(&role);
        let is_reply = dialect.reply_roles.contains(&role);
        if !is_prompt && !is_reply && role != dialect.system {
            return Err(at(format!(
                "unknown `{}` value `{role}`; expected {}",
                dialect.role, dialect.all_roles
            )));
        }
        let content = required_str(turn, dialect.content).map_err(|message| {
            if turn.contains_key("tool_calls") {
                at(format!("{message} (`tool_calls` is not supported)"))
            } else {
                at(message)
            }
        })?;
        if role == dialect.system {
            if i > 0 {
                return Err(at("a system turn is only allowed first".to_string()));
            }
            continue;
        }
        let expected = if position.is_multiple_of(2) {
            &dialect.prompt_roles
        } else {
            &dialect.reply_roles
        };
        if !expected.contains(&role) {
            return Err(at(format!(
                "expected a {} or {} turn, found `{role}`",
                expected[0], expected[1]
            )));
        }
        if role != dialect.may_be_blank && is_blank(content) {
            return Err(at(format!("`{}` is empty", dialect.content)));
        }
        position += 1;
        last_role = role;
    }
    if position == 0 {
        return Err(format!("`{list}` has only a system turn"));
    }
    if position % 2 == 1 {
        return Err(format!(
            "`{list}` must end with a {} or {} turn, but ends with `{last_role}`",
            dialect.reply_roles[0], dialect.reply_roles[1]
        ));
    }
    optional_str(record, "system")?;
    optional_str(record, "tools")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;
    use tempfile::NamedTempFile;

    fn file(bytes: impl AsRef<[u8]>) -> NamedTempFile {
        let mut f = NamedTempFile::new().unwrap();
        f.write_all(bytes.as_ref()).unwrap();
        f.flush().unwrap();
        f
    }

    /// The summary without its columns (checked on their own in `columns_are_reported`).
    fn inspect_bytes(bytes: impl AsRef<[u8]>, hint: Option<&str>) -> Summary {
        let f = file(bytes);
        match inspect(f.path(), hint) {
            Ok(summary) => Summary {
                columns: Vec::new(),
                ..summary
            },
            Err(e) => panic!("expected a valid dataset, got: {e}"),
        }
    }

    #[test]
    fn columns_are_reported() {
        let f = file(
            "{\"instruction\": \"a\", \"output\": \"b\"}\n\
             {\"instruction\": \"a\", \"output\": \"b\", \"history\": [[\"q\", \"r\"]]}\n",
        );
        let s = inspect(f.path(), None).unwrap();
        assert_eq!(s.columns, vec!["history", "instruction", "output"]);
        let f = file("instruction,input,output,notes\na,,b,x\n");
        let s = inspect(f.path(), Some("d.csv")).unwrap();
        assert_eq!(
            s.columns,
            vec!["input", "instruction", "output"],
            "header columns, known ones"
        );
    }

    /// The user-facing error for invalid content.
    fn error(bytes: impl AsRef<[u8]>, hint: Option<&str>) -> String {
        let f = file(bytes);
        match inspect(f.path(), hint) {
            Ok(summary) => panic!("expected an error, got {summary:?}"),
            Err(InspectError::Invalid(e)) => e.to_string(),
            Err(InspectError::Io(e)) => panic!("unexpected I/O error: {e}"),
        }
    }

    fn lines(records: &[Value]) -> String {
        let mut out = String::new();
        for r in records {
            out.push_str(&r.to_string());
            out.push('\n');
        }
        out
    }

    fn array(records: &[Value]) -> String {
        serde_json::to_string_pretty(&Value::Array(records.to_vec())).unwrap()
    }

    fn summary(format: DatasetFormat, container: Container, num_rows: u64) -> Summary {
        Summary {
            format,
            container,
            num_rows,
            columns: Vec::new(),
        }
    }

    fn alpaca() -> Vec<Value> {
        vec![
            json!({"instruction": "Add", "input": "1 + 1", "output": "2"}),
            json!({"instruction": "Greet", "input": null, "output": "Hi", "system": "Be nice",
                   "history": [["hello", "hey"]]}),
            json!({"instruction": "", "input": "only input", "output": "ok", "extra": 5}),
        ]
    }

    fn sharegpt() -> Vec<Value> {
        vec![
            json!({"conversations": [
                {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}),
            json!({"conversations": [
                {"from": "system", "value": ""},
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": "{\"name\": \"weather\"}"},
                {"from": "observation", "value": ""},
                {"from": "gpt", "value": "sunny"}], "system": null, "tools": "[]"}),
        ]
    }

    fn openai() -> Vec<Value> {
        vec![
            json!({"messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "bye"}]}),
            json!({"messages": [
                {"role": "user", "content": "weather?"},
                {"role": "function", "content": "{\"name\": \"weather\"}"},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."}]}),
        ]
    }

    #[test]
    fn names_and_display() {
        assert_eq!(DatasetFormat::Sharegpt.to_string(), "sharegpt");
        assert_eq!(DatasetFormat::Openai.as_str(), "openai");
        assert_eq!(json!(DatasetFormat::Alpaca), json!("alpaca"));
        assert_eq!(
            serde_json::from_value::<Container>(json!("jsonl")).unwrap(),
            Container::Jsonl
        );
        assert_eq!(Container::Csv.extension(), "csv");
        assert_eq!(Container::Json.to_string(), "json");
        assert_eq!(
            FormatError::at("line 3", "oops").to_string(),
            "line 3: oops"
        );
        assert_eq!(FormatError::new("oops").to_string(), "oops");
        let e: InspectError = FormatError::at("row 1", "bad").into();
        assert_eq!(e.to_string(), "row 1: bad");
    }

    #[test]
    fn valid_alpaca_json_and_jsonl() {
        let records = alpaca();
        assert_eq!(
            inspect_bytes(array(&records), Some("a.json")),
            summary(DatasetFormat::Alpaca, Container::Json, 3)
        );
        // Blank lines and CRLF line ends are fine; the name is only a hint.
        let jsonl = format!("\n{}\r\n\r\n  \n", lines(&records).replace('\n', "\r\n"));
        assert_eq!(
            inspect_bytes(jsonl, Some("a.json")),
            summary(DatasetFormat::Alpaca, Container::Jsonl, 3)
        );
    }

    #[test]
    fn valid_sharegpt_json_and_jsonl() {
        let records = sharegpt();
        assert_eq!(
            inspect_bytes(array(&records), None),
            summary(DatasetFormat::Sharegpt, Container::Json, 2)
        );
        assert_eq!(
            inspect_bytes(lines(&records), Some("x.jsonl")),
            summary(DatasetFormat::Sharegpt, Container::Jsonl, 2)
        );
    }

    #[test]
    fn valid_openai_json_and_jsonl() {
        let records = openai();
        assert_eq!(
            inspect_bytes(array(&records), None),
            summary(DatasetFormat::Openai, Container::Json, 2)
        );
        assert_eq!(
            inspect_bytes(lines(&records), None),
            summary(DatasetFormat::Openai, Container::Jsonl, 2)
        );
    }

    #[test]
    fn valid_csv() {
        let csv = "id, instruction ,input,output,system\n\
                   1,Add,1 + 1,2,\n\
                   2,\"Write a\nmulti-line, quoted\",,\"Sure:\n\"\"ok\"\"\",Be brief\n\
                   3,,just input,fine,\n";
        assert_eq!(
            inspect_bytes(csv, Some("Data.CSV")),
            summary(DatasetFormat::Alpaca, Container::Csv, 3)
        );
        // Blank lines and CRLF line ends.
        assert_eq!(
            inspect_bytes(
                "\r\n\r\ninstruction,output\r\nq,a\r\n\r\nq2,a2\r\n",
                Some("a.csv")
            ),
            summary(DatasetFormat::Alpaca, Container::Csv, 2)
        );
        assert_eq!(
            error("instruction,output\r\nq,a\r\n\r\nq2,\r\n", Some("a.csv")),
            "row 2: `output` is empty"
        );
        // Not JSON and an alpaca header: CSV whatever the name.
        assert_eq!(
            inspect_bytes("instruction,output\nq,a\n", None),
            summary(DatasetFormat::Alpaca, Container::Csv, 1)
        );
        assert_eq!(
            inspect_bytes("instruction,output\nq,a\n", Some("data.txt")),
            summary(DatasetFormat::Alpaca, Container::Csv, 1)
        );
        // JSON content named .csv is still JSON.
        assert_eq!(
            inspect_bytes(array(&alpaca()), Some("data.csv")),
            summary(DatasetFormat::Alpaca, Container::Json, 3)
        );
    }

    #[test]
    fn empty_files() {
        assert_eq!(error("", Some("a.json")), "the file is empty");
        assert_eq!(error(" \n\t\r\n  ", None), "the file is empty");
        assert_eq!(error("\u{feff}", Some("a.csv")), "the file is empty");
        assert_eq!(error("\n\n", Some("a.csv")), "the file is empty");
        assert_eq!(error("[]", None), "no records");
        assert_eq!(error(" \n[ \n ]\n", None), "no records");
        assert_eq!(error("instruction,output\n", Some("a.csv")), "no records");
        assert_eq!(error("instruction,output", Some("a.csv")), "no records");
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        let json = format!("\u{feff}{}", array(&alpaca()));
        assert_eq!(
            inspect_bytes(json, None),
            summary(DatasetFormat::Alpaca, Container::Json, 3)
        );
        let jsonl = format!("\u{feff}{}", lines(&sharegpt()));
        assert_eq!(
            inspect_bytes(jsonl, None),
            summary(DatasetFormat::Sharegpt, Container::Jsonl, 2)
        );
        let csv = "\u{feff}instruction,output\nq,a\n";
        assert_eq!(
            inspect_bytes(csv, Some("a.csv")),
            summary(DatasetFormat::Alpaca, Container::Csv, 1)
        );
        assert_eq!(
            inspect_bytes(csv, None),
            summary(DatasetFormat::Alpaca, Container::Csv, 1)
        );
        let f = file(csv);
        assert_eq!(
            preview(f.path(), Container::Csv, 5).unwrap(),
            vec![json!({"instruction": "q", "output": "a"})]
        );
        // Line numbers are unaffected by the mark.
        assert_eq!(
            error("\u{feff}[\n{\"instruction\": \"a\"}]", None),
            "record 1 (line 2): missing field `output`"
        );
    }

    #[test]
    fn utf16_is_refused() {
        assert_eq!(
            error(b"\xFF\xFE[\x00]\x00", Some("a.json")),
            "the file is UTF-16 text; save it as UTF-8"
        );
        assert_eq!(
            error(b"\xFE\xFF\x00[", Some("a.csv")),
            "the file is UTF-16 text; save it as UTF-8"
        );
    }

    #[test]
    fn unknown_content() {
        assert_eq!(error("hello world", Some("a.txt")), UNKNOWN_CONTENT);
        assert_eq!(error("\"just a string\"", Some("a.json")), UNKNOWN_CONTENT);
        assert_eq!(error("a,b\n1,2\n", None), UNKNOWN_CONTENT);
        assert_eq!(
            error(b"PK\x03\x04\xff\xfe", Some("a.xlsx")),
            UNKNOWN_CONTENT
        );
    }

    #[test]
    fn unknown_and_ambiguous_shapes() {
        assert_eq!(
            error("[{\"prompt\": \"a\", \"completion\": \"b\"}]", None),
            format!("record 1 (line 1): {UNKNOWN_SHAPE}")
        );
        assert_eq!(
            error("{\"text\": \"a\"}\n", None),
            format!("line 1: {UNKNOWN_SHAPE}")
        );
        assert_eq!(
            error(
                "{\"instruction\": \"a\", \"output\": \"b\", \"messages\": []}\n",
                None
            ),
            "line 1: ambiguous record: has both alpaca (`instruction`/`output`) and openai \
             (`messages`) fields"
        );
    }

    #[test]
    fn mixed_shapes() {
        let mut records = alpaca();
        records.push(sharegpt()[0].clone());
        let text = array(&records);
        // The record starts on the line before its `conversations` key (0-based index).
        let line = text
            .lines()
            .position(|l| l.contains("conversations"))
            .unwrap();
        assert_eq!(
            error(&text, None),
            format!(
                "record 4 (line {line}): looks like sharegpt (`conversations`) but the file's \
                 first record is alpaca"
            )
        );
        let records = [openai()[0].clone(), alpaca()[0].clone()];
        assert_eq!(
            error(lines(&records), None),
            "line 2: looks like alpaca (`instruction`/`output`) but the file's first record is \
             openai"
        );
        // A later record with no known keys is held to the file's format.
        let text = format!("{}{{\"foo\": 1}}\n", lines(&sharegpt()));
        assert_eq!(error(text, None), "line 3: missing field `conversations`");
    }

    #[test]
    fn record_lines_skip_strings_and_nesting() {
        let text = r#"[
  {"instruction": "a [x] {y}, \"q\" \\", "output": "b]", "history": [["p,", "r}"]]},
  {"instruction": "c",
   "output": "d"},

  {"conversations": []}, {"instruction": "e", "output": "f"}
]"#;
        assert_eq!(
            error(text, None),
            "record 3 (line 6): looks like sharegpt (`conversations`) but the file's first \
             record is alpaca"
        );
        let text = text.replace(r#"{"conversations": []}, "#, "");
        assert_eq!(inspect_bytes(&text, None).num_rows, 3);
        let text = text.replace(r#""output": "f""#, r#""output": 7"#);
        assert_eq!(
            error(&text, None),
            "record 3 (line 6): `output` must be a string, found a number"
        );
    }

    #[test]
    fn huge_line() {
        let big = "x".repeat(20 * 1024 * 1024);
        let records = [
            json!({"instruction": "repeat", "output": big}),
            json!({"instruction": "b", "output": "c"}),
        ];
        let f = file(lines(&records));
        let s = inspect(f.path(), Some("big.jsonl")).unwrap();
        assert_eq!(
            (s.format, s.container, s.num_rows),
            (DatasetFormat::Alpaca, Container::Jsonl, 2)
        );
        let first = preview(f.path(), Container::Jsonl, 1).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0]["output"].as_str().map(str::len), Some(big.len()));
    }

    #[test]
    fn json_syntax_errors_have_line_and_column() {
        let text = "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"a\" \"output\": \"b\"}\n]";
        assert_eq!(
            error(text, None),
            "line 3, column 23: invalid JSON: expected `,` or `}`"
        );
        assert_eq!(
            error("[\n{\"instruction\": \"a\", \"output\": \"b\"},\n", None),
            "line 3: the file ends before the JSON array does"
        );
        assert_eq!(
            error("[{\"instruction\": \"a\", \"output\": \"b\"},]", None),
            "line 1, column 38: invalid JSON: trailing comma"
        );
        let text = "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": 'a'}\n";
        assert_eq!(
            error(text, None),
            "line 2, column 17: invalid JSON: expected value"
        );
        let text = "{\"instruction\": \"a\", \"output\": \"b\"} {\"x\": 1}\n";
        assert_eq!(
            error(text, None),
            "line 1, column 37: invalid JSON: unexpected content after the end of the record"
        );
    }

    #[test]
    fn pretty_printed_jsonl_is_explained() {
        let text = serde_json::to_string_pretty(&alpaca()[0]).unwrap();
        assert_eq!(
            error(text, Some("a.jsonl")),
            format!("line 1: {JSONL_INCOMPLETE}")
        );
        let text = format!("{}{{\"instruction\": \"a\",", lines(&alpaca()));
        assert_eq!(error(text, None), format!("line 4: {JSONL_INCOMPLETE}"));
    }

    #[test]
    fn trailing_content_after_the_array() {
        let text = format!("{}\n  garbage", array(&alpaca()));
        let line = text.lines().count();
        assert_eq!(
            error(text, None),
            format!("line {line}, column 3: unexpected content after the end of the JSON array")
        );
        assert_eq!(
            error("[{\"instruction\": \"a\", \"output\": \"b\"}] []", None),
            "line 1, column 39: unexpected content after the end of the JSON array"
        );
        // Trailing whitespace is fine.
        assert_eq!(
            inspect_bytes(format!("{} \n\r\n", array(&alpaca())), None).num_rows,
            3
        );
    }

    #[test]
    fn records_must_be_objects() {
        assert_eq!(
            error(
                "[{\"instruction\": \"a\", \"output\": \"b\"}, \"text\"]",
                None
            ),
            "record 2 (line 1): expected a JSON object, found a string"
        );
        assert_eq!(
            error("[\n  [1, 2]\n]", None),
            "record 1 (line 2): expected a JSON object, found an array"
        );
        assert_eq!(
            error("{\"instruction\": \"a\", \"output\": \"b\"}\nnull\n", None),
            "line 2: expected a JSON object, found null"
        );
    }

    #[test]
    fn alpaca_fields() {
        let cases = [
            (json!({"output": "b"}), "missing field `instruction`"),
            (json!({"instruction": "a"}), "missing field `output`"),
            (
                json!({"instruction": 1, "output": "b"}),
                "`instruction` must be a string, found a number",
            ),
            (
                json!({"instruction": "a", "output": null}),
                "`output` must be a string, found null",
            ),
            (
                json!({"instruction": "a", "output": " \n"}),
                "`output` is empty",
            ),
            (
                json!({"instruction": " ", "output": "b"}),
                "`instruction` is empty",
            ),
            (
                json!({"instruction": "", "input": "", "output": "b"}),
                "`instruction` and `input` are both empty",
            ),
            (
                json!({"instruction": "a", "input": ["x"], "output": "b"}),
                "`input` must be a string, found an array",
            ),
            (
                json!({"instruction": "a", "output": "b", "system": true}),
                "`system` must be a string, found a boolean",
            ),
            (
                json!({"instruction": "a", "output": "b", "history": [["q", "r"], ["q"]]}),
                "history[1]: expected a [prompt, response] pair of strings",
            ),
            (
                json!({"instruction": "a", "output": "b", "history": "q"}),
                "`history` must be an array of [prompt, response] pairs, found a string",
            ),
        ];
        for (record, message) in cases {
            let records = [alpaca()[0].clone(), record];
            assert_eq!(
                error(lines(&records), None),
                format!("line 2: {message}"),
                "{}",
                records[1]
            );
        }
    }

    fn turns(from: &[(&str, &str)]) -> Value {
        let turns: Vec<Value> = from
            .iter()
            .map(|(role, text)| json!({"from": role, "value": text}))
            .collect();
        json!({ "conversations": turns })
    }

    fn messages(from: &[(&str, &str)]) -> Value {
        let turns: Vec<Value> = from
            .iter()
            .map(|(role, text)| json!({"role": role, "content": text}))
            .collect();
        json!({ "messages": turns })
    }

    #[test]
    fn sharegpt_fields_and_turn_order() {
        let cases = [
            (json!({"conversations": []}), "`conversations` is empty"),
            (
                json!({"conversations": "hi"}),
                "`conversations` must be an array, found a string",
            ),
            (
                json!({"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}),
                "conversations[0]: missing field `value`",
            ),
            (
                json!({"conversations": ["hi"]}),
                "conversations[0]: expected an object with `from` and `value`, found a string",
            ),
            (
                turns(&[("user", "a"), ("gpt", "b")]),
                "conversations[0]: unknown `from` value `user`; expected human, gpt, system, \
                 function_call or observation",
            ),
            (
                turns(&[("human", "a"), ("human", "b")]),
                "conversations[1]: expected a gpt or function_call turn, found `human`",
            ),
            (
                turns(&[("system", "s"), ("gpt", "b")]),
                "conversations[1]: expected a human or observation turn, found `gpt`",
            ),
            (
                turns(&[("human", "a"), ("gpt", "b"), ("system", "s")]),
                "conversations[2]: a system turn is only allowed first",
            ),
            (
                turns(&[("human", "a"), ("gpt", "b"), ("human", "c")]),
                "`conversations` must end with a gpt or function_call turn, but ends with `human`",
            ),
            (
                turns(&[("system", "s")]),
                "`conversations` has only a system turn",
            ),
            (
                turns(&[("human", "a"), ("gpt", " ")]),
                "conversations[1]: `value` is empty",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "a"},
                                         {"from": "gpt", "value": "b"}], "tools": [1]}),
                "`tools` must be a string, found an array",
            ),
        ];
        for (record, message) in cases {
            let records = [sharegpt()[0].clone(), sharegpt()[1].clone(), record];
            assert_eq!(
                error(array(&records), None)
                    .split_once(": ")
                    .map(|(_, m)| m),
                Some(message),
                "{}",
                records[2]
            );
            assert!(error(array(&records), None).starts_with("record 3 (line "));
        }
    }

    #[test]
    fn openai_fields_and_turn_order() {
        let cases = [
            (json!({"messages": []}), "`messages` is empty"),
            (
                messages(&[("assistant", "a"), ("user", "b")]),
                "messages[0]: expected a user or tool turn, found `assistant`",
            ),
            (
                messages(&[("user", "a"), ("assistant", "b"), ("user", "c")]),
                "`messages` must end with a assistant or function turn, but ends with `user`",
            ),
            (
                messages(&[("user", "a"), ("tool", "b")]),
                "messages[1]: expected a assistant or function turn, found `tool`",
            ),
            (
                messages(&[("human", "a"), ("assistant", "b")]),
                "messages[0]: unknown `role` value `human`; expected system, user, assistant, \
                 tool or function",
            ),
            (
                json!({"messages": [{"content": "a"}]}),
                "messages[0]: missing field `role`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"},
                    {"role": "assistant", "content": null,
                     "tool_calls": [{"function": {"name": "f"}}]}]}),
                "messages[1]: `content` must be a string, found null (`tool_calls` is not \
                 supported)",
            ),
            (
                messages(&[("user", ""), ("assistant", "b")]),
                "messages[0]: `content` is empty",
            ),
        ];
        for (record, message) in cases {
            let records = [openai()[1].clone(), record];
            assert_eq!(
                error(lines(&records), None),
                format!("line 2: {message}"),
                "{}",
                records[1]
            );
        }
    }

    #[test]
    fn csv_errors() {
        assert_eq!(
            error("instruction,output\na,b\nc,d,e\n", Some("a.csv")),
            "row 2: has 3 fields but the header has 2"
        );
        assert_eq!(
            error("instruction,output\na\n", Some("a.csv")),
            "row 1: has 1 fields but the header has 2"
        );
        assert_eq!(
            error("instruction,input\na,b\n", Some("a.csv")),
            "header: missing column `output`; an alpaca CSV needs `instruction` and `output` \
             columns"
        );
        assert_eq!(
            error("Instruction,Output\na,b\n", Some("a.csv")),
            "header: missing columns `instruction` and `output`; an alpaca CSV needs both"
        );
        assert_eq!(
            error("instruction,output,output\na,b,c\n", Some("a.csv")),
            "header: column `output` appears more than once"
        );
        assert_eq!(
            error("instruction,input,output\na,b,c\nd,e,\n", Some("a.csv")),
            "row 2: `output` is empty"
        );
        assert_eq!(
            error("instruction,input,output\n,,c\n", Some("a.csv")),
            "row 1: `instruction` and `input` are both empty"
        );
        assert_eq!(
            error("instruction,output\n,c\n", Some("a.csv")),
            "row 1: `instruction` is empty"
        );
    }

    #[test]
    fn non_utf8_content() {
        let text = b"[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"\xff\xfe\", \"output\": \"b\"}\n]";
        assert_eq!(error(text, None), "line 3, column 18: not valid UTF-8 text");
        let text = b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"\xc3\x28\", \"output\": \"b\"}\n";
        assert_eq!(error(text, None), "line 2, column 18: not valid UTF-8 text");
        let text = b"instruction,output\na,b\nc,d\xff\n";
        assert_eq!(
            error(text, Some("a.csv")),
            "row 2: not valid UTF-8 text in column `output`"
        );
        assert_eq!(
            error(b"instr\xffuction,output\na,b\n", Some("a.csv")),
            "header: not valid UTF-8 text"
        );
    }

    #[test]
    fn preview_json_and_jsonl() {
        let records = openai();
        let f = file(array(&records));
        assert_eq!(
            preview(f.path(), Container::Json, 1).unwrap(),
            vec![records[0].clone()]
        );
        assert_eq!(preview(f.path(), Container::Json, 10).unwrap(), records);
        assert!(preview(f.path(), Container::Json, 0).unwrap().is_empty());

        let records = alpaca();
        let f = file(format!("\n{}", lines(&records)));
        assert_eq!(
            preview(f.path(), Container::Jsonl, 2).unwrap(),
            records[..2].to_vec()
        );
        assert_eq!(preview(f.path(), Container::Jsonl, 100).unwrap(), records);
    }

    #[test]
    fn preview_reads_only_what_it_returns() {
        // Whatever follows the records previewed is not read.
        let f = file(
            "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\", \"output\": \"d\"}, oops",
        );
        assert_eq!(
            preview(f.path(), Container::Json, 2).unwrap(),
            vec![
                json!({"instruction": "a", "output": "b"}),
                json!({"instruction": "c", "output": "d"}),
            ]
        );
        let f = file("{\"instruction\": \"a\", \"output\": \"b\"}\noops\n");
        assert_eq!(preview(f.path(), Container::Jsonl, 1).unwrap().len(), 1);
    }

    #[test]
    fn preview_csv_shape() {
        let csv = "id,instruction,input,output,system\n\
                   1,Add,1 + 1,2,\n\
                   2,\"multi\nline\",,\"a, b\",Be brief\n\
                   3,x,,y,\n";
        let f = file(csv);
        assert_eq!(
            preview(f.path(), Container::Csv, 2).unwrap(),
            vec![
                json!({"instruction": "Add", "input": "1 + 1", "output": "2"}),
                json!({"instruction": "multi\nline", "output": "a, b", "system": "Be brief"}),
            ]
        );
        assert_eq!(preview(f.path(), Container::Csv, 10).unwrap().len(), 3);
    }
}
