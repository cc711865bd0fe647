//! Plain-text corpora (`.txt`): documents for continued pre-training, each becoming a
//! `{"text": …}` record. A file with blank lines between its paragraphs holds one document
//! per blank-line-separated block (its lines joined with `\n`); a file without blank lines
//! holds one document per line (LlamaFactory's own `wiki_demo.txt` is one article a line).

use super::*;

/// Whether the client's file name says plain text.
pub(super) fn looks_like_text_name(name_hint: Option<&str>) -> bool {
    name_hint.is_some_and(|name| {
        Path::new(name)
            .extension()
            .and_then(OsStr::to_str)
            .is_some_and(|ext| ext.eq_ignore_ascii_case("txt"))
    })
}

/// Reads the lines of the file, each checked as UTF-8; calls `on_line(line_no, text)`.
fn for_each_line(
    path: &Path,
    mut on_line: impl FnMut(u64, &str) -> Result<bool, InspectError>,
) -> Result<(), InspectError> {
    let mut reader = open_content(path)?;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let text = std::str::from_utf8(&line).map_err(|e| {
            FormatError::at(
                format!("line {line_no}, column {}", e.valid_up_to() + 1),
                "not valid UTF-8 text",
            )
        })?;
        let text = text.trim_end_matches(['\n', '\r']);
        if !on_line(line_no, text)? {
            return Ok(());
        }
    }
}

/// Streams the documents of a text file as `{"text": …}` records; returns how many.
pub(super) fn stream_text<F>(path: &Path, mut on_record: F) -> Result<u64, InspectError>
where
    F: FnMut(Value) -> Result<bool, String>,
{
    // Blank lines between documents decide the splitting: one pass to find out.
    let mut seen_text = false;
    let mut paragraphs = false;
    for_each_line(path, |_, text| {
        if text.trim().is_empty() {
            if seen_text {
                paragraphs = true;
                return Ok(false);
            }
        } else {
            seen_text = true;
        }
        Ok(true)
    })?;
    let mut count = 0u64;
    let mut document = String::new();
    let mut starts_at = 0u64;
    let mut stopped = false;
    let mut emit = |document: &mut String, starts_at: u64| -> Result<bool, InspectError> {
        let text = std::mem::take(document);
        count += 1;
        on_record(serde_json::json!({ "text": text }))
            .map_err(|m| FormatError::at(format!("line {starts_at}"), m).into())
    };
    for_each_line(path, |line_no, text| {
        if text.trim().is_empty() {
            if !document.is_empty() && !emit(&mut document, starts_at)? {
                stopped = true;
                return Ok(false);
            }
            return Ok(true);
        }
        if paragraphs {
            if document.is_empty() {
                starts_at = line_no;
            } else {
                document.push('\n');
            }
            document.push_str(text);
            Ok(true)
        } else {
            document.push_str(text);
            let go_on = emit(&mut document, line_no)?;
            stopped = !go_on;
            Ok(go_on)
        }
    })?;
    if !stopped && !document.is_empty() {
        emit(&mut document, starts_at)?;
    }
    Ok(count)
}
