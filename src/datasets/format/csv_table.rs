//! The CSV container: always alpaca, with `instruction` and `output` columns.

use super::records::check_alpaca_text;
use super::*;

/// The alpaca columns of a CSV header.
pub(super) struct CsvColumns {
    instruction: usize,
    output: usize,
    input: Option<usize>,
    system: Option<usize>,
}

pub(super) fn header_name(name: &str) -> &str {
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
pub(super) struct CsvRow<'a> {
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

    pub(super) fn check(&self) -> Result<(), String> {
        check_alpaca_text(
            self.cell(self.columns.instruction),
            self.columns.input.map(|i| self.cell(i)),
            self.cell(self.columns.output),
        )
    }

    pub(super) fn to_value(&self) -> Value {
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

pub(super) fn csv_error(e: csv::Error, header: Option<&csv::StringRecord>) -> InspectError {
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
pub(super) fn looks_like_alpaca_csv(path: &Path) -> Result<bool, InspectError> {
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
pub(super) fn stream_csv<F>(path: &Path, mut on_row: F) -> Result<u64, InspectError>
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
