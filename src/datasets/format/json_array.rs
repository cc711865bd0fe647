//! The JSON array container: records streamed one value at a time, each located by its
//! position and the line it starts on.

use super::*;

/// The 1-based line on which the `index`th (1-based) element of the JSON array starts, found
/// by scanning the file again. Used only to report an invalid record: tracking lines while
/// parsing would make serde_json read through a wrapper byte by byte, several times slower.
/// The elements before `index` parsed, so a scan that only follows strings and brackets is
/// exact.
pub(super) fn array_element_line(path: &Path, index: u64) -> Result<Option<u64>, InspectError> {
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
pub(super) fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text);
    match message {
        "invalid unicode code point" => "not valid UTF-8 text".to_string(),
        _ => format!("invalid JSON: {message}"),
    }
}

/// Streams the records of a JSON array file; returns how many were read.
pub(super) fn stream_json_array<F>(path: &Path, on_record: F) -> Result<u64, InspectError>
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
