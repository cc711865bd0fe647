//! Property tests of the two parsers that take arbitrary user input: the dataset inspector
//! (every upload) and the chat-template renderer (every chat message).
//!
//! `make test` runs proptest's default number of cases (256 per property, a few seconds);
//! `make fuzz` runs many more (`PROPTEST_CASES`, default 20000 there). A failure prints the
//! shrunk input; proptest keeps it under `proptest-regressions/` to replay first next time.

use std::io::Write;

use ferrotune::datasets::format::{DatasetFormat, InspectError, inspect};
use ferrotune::inference::ChatMessage;
use ferrotune::inference::template::{ChatTemplate, FALLBACK_TEMPLATE};
use proptest::prelude::*;
use serde_json::{Value, json};

fn inspect_bytes(
    bytes: &[u8],
    name: &str,
) -> Result<ferrotune::datasets::format::Summary, InspectError> {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f.flush().expect("flush");
    inspect(f.path(), Some(name))
}

/// Text as people put it in datasets and chats: any Unicode, with a bias towards the
/// characters that break parsers and templates (quotes, braces, Jinja delimiters, newlines,
/// escapes, control characters, direction overrides).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![
                Just("{{".to_string()),
                Just("}}".to_string()),
                Just("{%".to_string()),
                Just("%}".to_string()),
                Just("\"".to_string()),
                Just("\\".to_string()),
                Just("\n".to_string()),
                Just("\r\n".to_string()),
                Just("<|im_end|>".to_string()),
                Just("\u{202E}".to_string()),
                Just("\u{0}".to_string()),
                Just("名前".to_string()),
                "[a-z ]{0,8}".prop_map(|s| s),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn non_blank(s: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    s.prop_filter("not blank", |s| !s.trim().is_empty())
}

proptest! {
    /// Whatever the bytes, inspecting them ends with a summary or a clear refusal — never a
    /// panic, never an I/O error on a readable file.
    #[test]
    fn any_bytes_are_accepted_or_refused_cleanly(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            // JSON-looking starts reach the deeper parsers.
            (prop_oneof![Just(b"[".to_vec()), Just(b"{".to_vec()), Just(b"[{\"".to_vec())],
             proptest::collection::vec(any::<u8>(), 0..1024))
                .prop_map(|(mut a, b)| { a.extend(b); a }),
        ],
        name in prop_oneof![Just("d.json"), Just("d.jsonl"), Just("d.csv"), Just("d")],
    ) {
        match inspect_bytes(&bytes, name) {
            Ok(summary) => prop_assert!(summary.num_rows > 0),
            Err(InspectError::Invalid(e)) => prop_assert!(!e.to_string().is_empty()),
            Err(InspectError::Io(e)) => prop_assert!(false, "an I/O error on a readable file: {e}"),
        }
    }

    /// Valid alpaca records with arbitrary text are accepted, as a JSON array and as JSON
    /// lines, with every record counted.
    #[test]
    fn alpaca_records_with_any_text_are_accepted(
        records in proptest::collection::vec(
            (non_blank(text()), text(), non_blank(text())), 1..20),
        jsonl in any::<bool>(),
    ) {
        let values: Vec<Value> = records
            .iter()
            .map(|(i, input, o)| json!({"instruction": i, "input": input, "output": o}))
            .collect();
        let bytes = if jsonl {
            values.iter().map(|v| format!("{v}\n")).collect::<String>().into_bytes()
        } else {
            serde_json::to_vec(&values).unwrap()
        };
        let summary = inspect_bytes(&bytes, if jsonl { "d.jsonl" } else { "d.json" })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(summary.format, DatasetFormat::Alpaca);
        prop_assert_eq!(summary.num_rows, records.len() as u64);
    }

    /// The fallback (ChatML) template puts every message's text in verbatim: text that looks
    /// like template syntax is data, never code.
    #[test]
    fn chat_text_is_never_template_code(
        messages in proptest::collection::vec(
            (prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool")], text()),
            1..8),
        add_generation_prompt in any::<bool>(),
    ) {
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|(role, content)| ChatMessage::new(role, content))
            .collect();
        let template = ChatTemplate::new(FALLBACK_TEMPLATE, vec![]).unwrap();
        let rendered = template
            .render(&messages, add_generation_prompt)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expected: String = messages
            .iter()
            .map(|m| match m.role.as_str() {
                // A template without tools sees a tool's result as the user's, in the
                // Hermes tags (what models without a tool role were tuned on).
                "tool" => format!(
                    "<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n",
                    m.content
                ),
                role => format!("<|im_start|>{role}\n{}<|im_end|>\n", m.content),
            })
            .collect();
        if add_generation_prompt {
            expected.push_str("<|im_start|>assistant\n");
        }
        prop_assert_eq!(rendered, expected);
    }

    /// `tojson` (which tool-using templates print messages with) writes JSON that reads back
    /// as the same messages, whatever their text.
    #[test]
    fn tojson_round_trips_any_text(
        messages in proptest::collection::vec(
            (prop_oneof![Just("user"), Just("assistant")], text()), 1..6),
    ) {
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|(role, content)| ChatMessage::new(role, content))
            .collect();
        let template = ChatTemplate::new("{{ messages | tojson }}", vec![]).unwrap();
        let rendered = template
            .render(&messages, false)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: Vec<ChatMessage> = serde_json::from_str(&rendered)
            .map_err(|e| TestCaseError::fail(format!("{e}: {rendered}")))?;
        prop_assert_eq!(back, messages);
    }
}
