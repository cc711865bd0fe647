//! The JSON Lines container: one record object per line, blank lines skipped.

use super::json_array::json_message;
use super::*;

/// Streams the records of a JSON Lines file; returns how many were read.
pub(super) fn stream_jsonl<F>(path: &Path, mut on_record: F) -> Result<u64, InspectError>
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
