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

mod csv_table;
mod json_array;
mod json_lines;
mod normalize;
mod plain_text;
mod records;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserializer as _;
use serde::de::{self, SeqAccess, Visitor};
use serde_json::{Map, Value};

use csv_table::{looks_like_alpaca_csv, stream_csv};
use json_array::stream_json_array;
use json_lines::stream_jsonl;
use normalize::normalize;
use plain_text::{looks_like_text_name, stream_text};
use records::Checker;

const UTF8_BOM: &[u8; 3] = b"\xEF\xBB\xBF";
const READ_BUFFER: usize = 256 * 1024;
/// How much of a file without a `.csv` name is read to look for a CSV header.
const CSV_SNIFF_BYTES: u64 = 64 * 1024;

const UNKNOWN_CONTENT: &str = "expected a JSON array, JSON Lines, or CSV with alpaca columns";
const UNKNOWN_SHAPE: &str = "unknown shape: expected alpaca (`instruction`/`output`), sharegpt \
                             (`conversations`), OpenAI (`messages`) or plain-text (`text`) \
                             fields";
const JSONL_INCOMPLETE: &str = "the JSON record is incomplete; JSON Lines needs one complete \
                                record per line (a JSON array of records is also accepted)";

/// The shape of the records (LlamaFactory's `formatting`, plus OpenAI-style `messages`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Alpaca,
    Sharegpt,
    Openai,
    /// Plain text: one `text` field per record (pre-training corpora).
    Text,
}

impl DatasetFormat {
    /// The format named `name` (as [`DatasetFormat::as_str`] writes it).
    pub fn parse(name: &str) -> Option<DatasetFormat> {
        [
            DatasetFormat::Alpaca,
            DatasetFormat::Sharegpt,
            DatasetFormat::Openai,
            DatasetFormat::Text,
        ]
        .into_iter()
        .find(|f| f.as_str() == name)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Sharegpt => "sharegpt",
            DatasetFormat::Openai => "openai",
            DatasetFormat::Text => "text",
        }
    }

    /// The key(s) that identify the format, for messages.
    fn marker(&self) -> &'static str {
        match self {
            DatasetFormat::Alpaca => "`instruction`/`output`",
            DatasetFormat::Sharegpt => "`conversations`",
            DatasetFormat::Openai => "`messages`",
            DatasetFormat::Text => "`text`",
        }
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a dataset trains, whatever its format: the stages it fits follow from it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Prompts with the answers to imitate (SFT).
    #[default]
    #[serde(rename = "sft")]
    Supervised,
    /// Prompts with a chosen and a rejected answer (DPO, ORPO, SimPO, reward models).
    Preference,
    /// Prompts with one answer labelled good or bad (KTO).
    Kto,
    /// Plain text (continued pre-training).
    Text,
}

impl DatasetKind {
    pub fn parse(name: &str) -> Option<DatasetKind> {
        [
            DatasetKind::Supervised,
            DatasetKind::Preference,
            DatasetKind::Kto,
            DatasetKind::Text,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetKind::Supervised => "sft",
            DatasetKind::Preference => "preference",
            DatasetKind::Kto => "kto",
            DatasetKind::Text => "text",
        }
    }

    /// For messages: "supervised data (prompts with answers)"...
    pub fn describe(&self) -> &'static str {
        match self {
            DatasetKind::Supervised => "supervised data (prompts with answers)",
            DatasetKind::Preference => "preference data (chosen/rejected answers)",
            DatasetKind::Kto => "KTO data (answers labelled good or bad)",
            DatasetKind::Text => "plain text",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the records are stored in the file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
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
    /// The container named `name` (its extension).
    pub fn parse(name: &str) -> Option<Container> {
        [Container::Json, Container::Jsonl, Container::Csv]
            .into_iter()
            .find(|c| c.extension() == name)
    }

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
    pub kind: DatasetKind,
    /// Records were rewritten into a shape LlamaFactory reads (see `normalize`), or the file
    /// is plain text: the upload stores [`rewrite`]'s JSON Lines instead of the file.
    pub rewritten: bool,
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
    let mut rewritten = false;
    let mut checker = Checker::default();
    let mut on_value = |value: Value| {
        let (value, changed) = normalize(value)?;
        rewritten |= changed;
        checker.check(&value)?;
        note_keys(&value);
        Ok(true)
    };
    let (container, num_rows) = match first {
        b'[' => (Container::Json, stream_json_array(path, &mut on_value)?),
        b'{' => (Container::Jsonl, stream_jsonl(path, &mut on_value)?),
        _ if !csv_hint && looks_like_text_name(name_hint) && !looks_like_alpaca_csv(path)? => {
            let rows = stream_text(path, &mut on_value)?;
            rewritten = true;
            (Container::Jsonl, rows)
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
            checker.format = Some(DatasetFormat::Alpaca);
            (Container::Csv, rows)
        }
        _ => return Err(FormatError::new(UNKNOWN_CONTENT).into()),
    };
    if num_rows > 0 {
        checker.finish().map_err(FormatError::new)?;
    }
    match checker.format {
        Some(format) if num_rows > 0 => Ok(Summary {
            format,
            kind: checker.kind.unwrap_or_default(),
            rewritten,
            container: if rewritten {
                Container::Jsonl
            } else {
                container
            },
            num_rows,
            columns: columns.into_iter().collect(),
        }),
        _ => Err(FormatError::new("no records").into()),
    }
}

/// Writes the records of a file [`inspect`] passed with `rewritten` set to `out`, as JSON
/// Lines in the shape LlamaFactory reads (see `normalize`; plain text becomes `{"text"}`
/// records).
pub fn rewrite(path: &Path, name_hint: Option<&str>, out: &Path) -> Result<(), InspectError> {
    use std::io::Write as _;
    let first = {
        let mut reader = open_content(path)?;
        first_content_byte(&mut reader)?
    };
    let mut writer = io::BufWriter::new(File::create(out)?);
    let mut failed: Option<io::Error> = None;
    let mut write = |value: Value| {
        let (value, _) = normalize(value)?;
        let line = serde_json::to_string(&value).map_err(|e| e.to_string())?;
        if let Err(e) = writer
            .write_all(line.as_bytes())
            .and_then(|()| writer.write_all(b"\n"))
        {
            failed = Some(e);
            return Ok(false);
        }
        Ok(true)
    };
    match first {
        Some(b'[') => stream_json_array(path, &mut write)?,
        Some(b'{') => stream_jsonl(path, &mut write)?,
        _ if looks_like_text_name(name_hint) => stream_text(path, &mut write)?,
        _ => return Err(FormatError::new(UNKNOWN_CONTENT).into()),
    };
    if let Some(e) = failed {
        return Err(e.into());
    }
    writer
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(())
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
