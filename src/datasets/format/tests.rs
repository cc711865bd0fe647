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
        kind: DatasetKind::Supervised,
        rewritten: false,
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
    assert_eq!(error("hello world", Some("a.md")), UNKNOWN_CONTENT);
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
        error("[{\"question\": \"a\", \"answer\": \"b\"}]", None),
        format!("record 1 (line 1): {UNKNOWN_SHAPE}")
    );
    assert_eq!(
        error("{\"answer\": \"a\"}\n", None),
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
                                     {"from": "gpt", "value": "b"}], "tools": 1}),
            "`tools` must be a string, found a number",
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
                {"role": "assistant", "content": "I'll look", "tool_calls": [{"function": {"name": "f"}}]}]}),
            "messages[1]: an assistant message with both text and tool calls cannot be trained \
             as one turn (LlamaFactory's function turn holds only the calls): split it or drop \
             the text",
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

/// The records a rewritten upload stores.
fn rewritten(bytes: impl AsRef<[u8]>, hint: Option<&str>) -> (Summary, Vec<Value>) {
    let f = file(bytes);
    let summary = inspect(f.path(), hint).unwrap_or_else(|e| panic!("expected valid: {e}"));
    assert!(summary.rewritten, "{summary:?}");
    let out = NamedTempFile::new().unwrap();
    rewrite(f.path(), hint, out.path()).unwrap();
    // What is stored passes as it is, with the same summary.
    let again = inspect(out.path(), Some("stored.jsonl")).unwrap();
    assert!(!again.rewritten, "{again:?}");
    assert_eq!(
        (again.format, again.kind, again.num_rows),
        (summary.format, summary.kind, summary.num_rows)
    );
    (summary, preview(out.path(), Container::Jsonl, 100).unwrap())
}

#[test]
fn kinds_are_told_apart_and_held_to() {
    // LlamaFactory's kto_en_demo: messages with a boolean label, both labels present.
    let kto = r#"[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": false},
                  {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "label": true}]"#;
    let s = inspect_bytes(kto, None);
    assert_eq!(
        (s.format, s.kind, s.num_rows),
        (DatasetFormat::Openai, DatasetKind::Kto, 2)
    );
    // KTO needs good and bad answers.
    let one_sided = r#"[{"instruction": "a", "output": "b", "kto_tag": true}]"#;
    let e = error(one_sided, None);
    assert!(
        e.contains("needs both: this file has 1 labelled true and 0 labelled false"),
        "{e}"
    );
    // Its DPO demos: a conversation ending on the prompt with chosen and rejected answers.
    let dpo = r#"[{"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}}]"#;
    let s = inspect_bytes(dpo, None);
    assert_eq!(
        (s.format, s.kind),
        (DatasetFormat::Sharegpt, DatasetKind::Preference)
    );
    let s = inspect_bytes(
        r#"{"instruction": "a", "input": "x", "chosen": "b", "rejected": "c"}"#,
        None,
    );
    assert_eq!(
        (s.format, s.kind),
        (DatasetFormat::Alpaca, DatasetKind::Preference)
    );
    for (record, message) in [
        (
            r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}}"#,
            "must end with the prompt (a human or observation turn), but ends with `gpt`",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "gpt", "value": "b"}}"#,
            "missing field `rejected` (the other answer is there)",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "human", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}}"#,
            "chosen: expected a gpt or function_call turn, found `human`",
        ),
        (
            r#"{"instruction": "a", "output": "o", "chosen": "b", "rejected": "c"}"#,
            "has `output` as well as `chosen`/`rejected`",
        ),
        (
            r#"{"instruction": "a", "chosen": "b", "rejected": " "}"#,
            "`rejected` is empty",
        ),
        (
            r#"{"instruction": "a", "output": "b", "chosen": "b", "rejected": "c", "label": true}"#,
            "has both chosen/rejected answers",
        ),
        (r#"{"text": "  "}"#, "`text` is empty"),
    ] {
        let e = error(record, None);
        assert!(e.contains(message), "{record}: {e}");
    }
    // Kinds do not mix in one file.
    let mixed = "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n";
    assert_eq!(
        error(mixed, None),
        "line 2: is preference data (chosen/rejected answers) but the file's first record is \
         supervised data (prompts with answers)"
    );
    // Plain text: c4_demo's `text` records.
    let s = inspect_bytes(
        "{\"text\": \"one\"}\n{\"text\": \"two\", \"meta\": 1}\n",
        None,
    );
    assert_eq!(
        (s.format, s.kind, s.num_rows, s.rewritten),
        (DatasetFormat::Text, DatasetKind::Text, 2, false)
    );
    // Its multimodal demos: an image placeholder with its images.
    let image = r#"[{"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "b"}], "images": ["mllm_demo_data/1.jpg"]}]"#;
    let e = error(image, None);
    assert!(
        e.contains("`images`: multimodal records are not supported"),
        "{e}"
    );
    // Empty lists and non-boolean labels change nothing.
    let s = inspect_bytes(
        r#"[{"instruction": "a", "output": "b", "images": [], "label": "math"}]"#,
        None,
    );
    assert_eq!(s.kind, DatasetKind::Supervised);
}

#[test]
fn text_files_become_documents() {
    // One document a line (wiki_demo.txt), blank-line separated paragraphs otherwise.
    let (s, rows) = rewritten("First doc.\nSecond doc.\n", Some("wiki.TXT"));
    assert_eq!(
        (s.format, s.kind, s.container),
        (DatasetFormat::Text, DatasetKind::Text, Container::Jsonl)
    );
    assert_eq!(
        rows,
        vec![
            json!({"text": "First doc."}),
            json!({"text": "Second doc."})
        ]
    );
    let (_, rows) = rewritten("\nA line\nand more.\n\n\n B\r\n", Some("p.txt"));
    assert_eq!(
        rows,
        vec![json!({"text": "A line\nand more."}), json!({"text": " B"})]
    );
    assert!(error(b"a\n\xff\n", Some("x.txt")).contains("line 2, column 1: not valid UTF-8"));
    assert_eq!(error("\n \n", Some("x.txt")), "the file is empty");
    // Without the name, text is not guessed.
    assert!(error("First doc.\n", None).starts_with("expected a JSON array"));
}

#[test]
fn openai_shapes_are_rewritten_for_llamafactory() {
    // Content parts (OpenAI's `text`, LlamaFactory v1's `value`) and reasoning.
    let v1 = r#"{"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0}, {"role": "assistant", "content": [{"type": "reasoning", "value": "greet"}, {"type": "text", "text": "Hello"}], "loss_weight": 1.0}]}"#;
    let (s, rows) = rewritten(v1, None);
    assert_eq!(
        (s.format, s.kind),
        (DatasetFormat::Openai, DatasetKind::Supervised)
    );
    assert_eq!(
        rows[0],
        json!({"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello"}]})
    );
    // Tool calls, parallel tool results, a tools array.
    let tools = json!({"messages": [
        {"role": "user", "content": "weather in A and B?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"A\"}"}},
            {"id": "2", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"B\"}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sun"},
        {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "A sunny, B rainy."}],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}]});
    let (_, rows) = rewritten(tools.to_string(), None);
    let m = &rows[0]["messages"];
    assert_eq!(m[1]["role"], "function");
    assert_eq!(
        serde_json::from_str::<Value>(m[1]["content"].as_str().unwrap()).unwrap(),
        json!([{"name": "w", "arguments": {"city": "A"}}, {"name": "w", "arguments": {"city": "B"}}])
    );
    assert_eq!(m[2], json!({"role": "tool", "content": "sun\nrain"}));
    assert_eq!(m.as_array().unwrap().len(), 4);
    assert!(
        rows[0]["tools"]
            .as_str()
            .unwrap()
            .contains("\"name\":\"w\"")
    );
    // OpenAI's legacy prompt/completion rows are alpaca.
    let (s, rows) = rewritten(r#"{"prompt": "2+2=", "completion": "4"}"#, None);
    assert_eq!(
        (s.format, s.kind),
        (DatasetFormat::Alpaca, DatasetKind::Supervised)
    );
    assert_eq!(rows[0], json!({"instruction": "2+2=", "output": "4"}));
    // OpenAI's DPO JSONL and LlamaFactory v1's.
    let dpo = r#"{"input": {"messages": [{"role": "user", "content": "2+2?"}]}, "preferred_output": [{"role": "assistant", "content": "4"}], "non_preferred_output": [{"role": "assistant", "content": "5"}]}"#;
    let (s, rows) = rewritten(dpo, None);
    assert_eq!(
        (s.format, s.kind),
        (DatasetFormat::Openai, DatasetKind::Preference)
    );
    assert_eq!(
        rows[0],
        json!({"messages": [{"role": "user", "content": "2+2?"}],
               "chosen": {"role": "assistant", "content": "4"},
               "rejected": {"role": "assistant", "content": "5"}})
    );
    let v1 = r#"{"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}]}, {"role": "assistant", "content": [{"type": "text", "value": "good"}]}], "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}]}, {"role": "assistant", "content": [{"type": "text", "value": "bad"}]}]}"#;
    let (_, rows) = rewritten(v1, None);
    assert_eq!(
        rows[0]["chosen"],
        json!({"role": "assistant", "content": "good"})
    );
    assert_eq!(
        rows[0]["messages"],
        json!([{"role": "user", "content": "q"}])
    );
    // Refused with a reason.
    for (record, message) in [
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "b"}]}"#,
            "messages[0]: content[0]: `image_url` parts are multimodal",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}"#,
            "messages[1]: `weight: 0` asks not to train this assistant turn",
        ),
        (
            r#"{"chosen_messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected_messages": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}"#,
            "must share every turn but the last",
        ),
        (
            r#"{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [], "non_preferred_output": [{"role": "assistant", "content": "b"}]}"#,
            "`preferred_output` must hold one assistant message, found 0",
        ),
    ] {
        let e = error(record, None);
        assert!(e.contains(message), "{record}: {e}");
    }
}
