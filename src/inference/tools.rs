//! What an answer holds besides text: **tool calls** (OpenAI's `tools`) and a reasoning
//! model's **thinking** (`<think>…</think>`, OpenAI-compatible servers' `reasoning_content`).
//!
//! Models call tools in the format their chat template teaches them, so the format is read
//! off the template ([`ToolFormat::of_template`]):
//! - **Hermes** (Qwen2.5, Qwen3, Hermes, SmolLM3, …): `<tool_call>\n{"name": …, "arguments":
//!   {…}}\n</tool_call>`, one block per call;
//! - **Llama 3.1+**: a JSON object `{"name": …, "parameters": {…}}` as the whole answer (after
//!   the `<|python_tag|>` special token, which decoding drops);
//! - **Mistral**: `[TOOL_CALLS]` (a special token, dropped) then a JSON list of `{"name",
//!   "arguments"}`;
//! - a template that knows nothing of tools (SmolLM2, base models' ChatML) gets the tools
//!   described in its system message the way Qwen2.5's template describes them, and answers
//!   in the Hermes format ([`ToolFormat::Described`]); past calls and tool results are
//!   written into the messages' text in that format.
//!
//! [`AnswerSplitter`] takes an answer's text as it streams and splits it into reasoning,
//! content and tool calls, holding back only what might still turn out to be a marker.
//! `tool_choice: "required"` or a named function is enforced by a grammar of the format's
//! calls ([`ToolFormat::grammar`], llguidance's Lark with the functions' parameter schemas).

use serde_json::{Value, json};

/// How a model's template writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
    /// The template has no tools section: tools are described in the system message and
    /// the model answers in the Hermes format.
    Described,
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// A tool call: OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`
/// with `arguments` a JSON text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's shape.
    pub fn to_openai(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }

    /// The shape chat templates read (transformers' convention): `arguments` as an object.
    pub fn to_template(&self) -> Value {
        let arguments = serde_json::from_str::<Value>(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()));
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": arguments}})
    }
}

fn new_call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

impl ToolFormat {
    /// The format a chat template teaches.
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains(CALL_OPEN) {
            ToolFormat::Hermes
        } else if source.contains("<|python_tag|>")
            || (source.contains("<|start_header_id|>") && source.contains("tools"))
        {
            ToolFormat::Llama3
        } else if source.contains("tools") {
            // A template of its own that takes `tools`: Hermes is what most such models
            // were tuned on.
            ToolFormat::Hermes
        } else {
            ToolFormat::Described
        }
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// A Lark grammar (llguidance) whose sentences are calls of `functions` (OpenAI function
    /// objects: `name`, `parameters`) in this format: one call, or with `parallel` one or
    /// more.
    pub fn grammar(self, functions: &[Value], parallel: bool) -> String {
        let key = self.arguments_key();
        let alternatives: Vec<Value> = functions
            .iter()
            .map(|f| {
                let params = match f.get("parameters") {
                    Some(p @ Value::Object(_)) => p.clone(),
                    _ => json!({"type": "object"}),
                };
                let mut properties = serde_json::Map::new();
                properties.insert("name".into(), json!({"const": f["name"]}));
                properties.insert(key.into(), params);
                json!({"type": "object", "properties": properties,
                       "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let mut schema = json!({"anyOf": alternatives});
        llguidance::JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..llguidance::JsonCompileOptions::default()
        }
        .apply_to(&mut schema);
        let call = match self {
            ToolFormat::Hermes | ToolFormat::Described => {
                format!("\"{CALL_OPEN}\\n\" args \"\\n{CALL_CLOSE}\"")
            }
            ToolFormat::Llama3 | ToolFormat::Mistral => "args".to_string(),
        };
        let start = match (self, parallel) {
            (ToolFormat::Mistral, true) => "\"[\" call (\", \" call)* \"]\"",
            (ToolFormat::Mistral, false) => "\"[\" call \"]\"",
            (ToolFormat::Hermes | ToolFormat::Described, true) => "call (\"\\n\" call)*",
            (ToolFormat::Llama3, true) => "call (\"; \" call)*",
            (_, false) => "call",
        };
        format!("start: {start}\ncall: {call}\nargs: %json {schema}\n")
    }

    /// Calls in `text` (what follows content: the answer's tail from the first call on), or
    /// `None` when it is not calls after all. Text after the calls comes back too.
    fn parse(self, text: &str) -> Option<(Vec<ToolCall>, String)> {
        match self {
            ToolFormat::Hermes | ToolFormat::Described => {
                let mut calls = Vec::new();
                let mut rest = text.trim_start();
                let mut after = String::new();
                while let Some(body) = rest.strip_prefix(CALL_OPEN) {
                    // The closing tag may be missing when the end-of-turn token came first.
                    let (inner, tail) = match body.find(CALL_CLOSE) {
                        Some(i) => (&body[..i], &body[i + CALL_CLOSE.len()..]),
                        None => (body, ""),
                    };
                    calls.push(call_of(
                        &serde_json::from_str(inner.trim()).ok()?,
                        "arguments",
                    )?);
                    rest = tail.trim_start();
                    if !rest.starts_with(CALL_OPEN) {
                        after = rest.to_string();
                        break;
                    }
                }
                (!calls.is_empty()).then_some((calls, after))
            }
            ToolFormat::Llama3 => {
                let text = text.trim().trim_start_matches("<|python_tag|>").trim();
                let mut calls = Vec::new();
                for part in text.split("; ") {
                    let v: Value = serde_json::from_str(part.trim()).ok()?;
                    calls.push(call_of(&v, "parameters").or_else(|| call_of(&v, "arguments"))?);
                }
                (!calls.is_empty()).then_some((calls, String::new()))
            }
            ToolFormat::Mistral => {
                let text = text.trim().trim_start_matches("[TOOL_CALLS]").trim();
                let v: Value = serde_json::from_str(text).ok()?;
                let calls = match &v {
                    Value::Array(items) => items
                        .iter()
                        .map(|c| call_of(c, "arguments"))
                        .collect::<Option<Vec<_>>>()?,
                    Value::Object(_) => vec![call_of(&v, "arguments")?],
                    _ => return None,
                };
                (!calls.is_empty()).then_some((calls, String::new()))
            }
        }
    }

    /// Where calls start in content `text` (from `from` on): the byte offset, or `Hold(i)`
    /// when the text from `i` might still become the start.
    fn find_start(self, text: &str, content_so_far_blank: bool) -> Start {
        match self {
            ToolFormat::Hermes | ToolFormat::Described => match text.find(CALL_OPEN) {
                Some(i) => Start::At(i),
                None => match partial_suffix(text, CALL_OPEN) {
                    Some(i) => Start::Hold(i),
                    None => Start::No,
                },
            },
            // The whole answer is the call: it starts with `{` / `[`.
            ToolFormat::Llama3 | ToolFormat::Mistral => {
                if !content_so_far_blank {
                    return Start::No;
                }
                let trimmed = text.trim_start();
                let at = text.len() - trimmed.len();
                match trimmed.chars().next() {
                    None => Start::Hold(0),
                    Some('{') | Some('[') => Start::At(at),
                    Some(_) if "<|python_tag|>".starts_with(trimmed) => Start::Hold(at),
                    Some(_) if trimmed.starts_with("<|python_tag|>") => Start::At(at),
                    Some(_) => Start::No,
                }
            }
        }
    }

    /// What a system message says of `tools` for a template without a tools section
    /// (Qwen2.5's wording).
    pub fn describe(tools: &[Value]) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in tools {
            s.push('\n');
            s.push_str(&py_json(t));
        }
        s.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
             <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        s
    }

    /// An assistant message's calls as a [`ToolFormat::Described`] model writes them.
    pub fn write_calls(calls: &[ToolCall]) -> String {
        calls
            .iter()
            .map(|c| {
                let args = serde_json::from_str::<Value>(&c.arguments)
                    .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                format!(
                    "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
                    py_json(&json!({"name": c.name, "arguments": args}))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `v` as Python's `json.dumps` writes it (`", "` and `": "`): what templates print with
/// `tojson` and what models trained on them write.
pub fn py_json(v: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    match serde::Serialize::serialize(v, &mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => v.to_string(),
    }
}

enum Start {
    At(usize),
    Hold(usize),
    No,
}

/// A call from `{"name": …, <key>: {…}}` (arguments given as an object or a JSON text).
fn call_of(v: &Value, key: &str) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get(key) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ToolCall {
        id: new_call_id(),
        name,
        arguments,
    })
}

/// The start of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> Option<usize> {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .map(|n| text.len() - n)
        .find(|&i| text.is_char_boundary(i) && marker.starts_with(&text[i..]))
}

/// A piece of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Think {
    /// Nothing but blanks yet: a `<think>` may still open.
    Start,
    Inside,
    /// After the reasoning: blanks before the content are dropped.
    Closed,
    Content,
}

/// Splits a streamed answer into reasoning, content and tool calls.
#[derive(Debug)]
pub struct AnswerSplitter {
    tools: Option<ToolFormat>,
    parallel: bool,
    think: Think,
    held: String,
    /// From the first call on, everything (parsed at the end).
    calls: Option<String>,
    content_blank: bool,
}

impl AnswerSplitter {
    /// `tools`: parse calls in this format (none: the answer is text); `opened`: the prompt
    /// ended inside a `<think>` block (the template opened it); `parallel`: keep every call,
    /// else the first.
    pub fn new(tools: Option<ToolFormat>, parallel: bool, opened: bool) -> AnswerSplitter {
        AnswerSplitter {
            tools,
            parallel,
            think: if opened { Think::Inside } else { Think::Start },
            held: String::new(),
            calls: None,
            content_blank: true,
        }
    }

    /// The parts `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        let mut out = Vec::new();
        if let Some(c) = &mut self.calls {
            c.push_str(text);
            return out;
        }
        self.held.push_str(text);
        loop {
            match self.think {
                Think::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.held = rest.to_string();
                        self.think = Think::Inside;
                    } else if THINK_OPEN.starts_with(t) {
                        return out; // blanks, or the start of `<think>`
                    } else {
                        self.think = Think::Content;
                    }
                }
                Think::Inside => match self.held.find(THINK_CLOSE) {
                    Some(i) => {
                        if i > 0 {
                            out.push(Part::Reasoning(self.held[..i].to_string()));
                        }
                        self.held.drain(..i + THINK_CLOSE.len());
                        self.think = Think::Closed;
                    }
                    None => {
                        let keep =
                            partial_suffix(&self.held, THINK_CLOSE).unwrap_or(self.held.len());
                        if keep > 0 {
                            out.push(Part::Reasoning(self.held[..keep].to_string()));
                            self.held.drain(..keep);
                        }
                        return out;
                    }
                },
                Think::Closed => {
                    let t = self.held.trim_start();
                    if t.is_empty() {
                        self.held.clear();
                        return out;
                    }
                    self.held = t.to_string();
                    self.think = Think::Content;
                }
                Think::Content => {
                    self.content(&mut out);
                    return out;
                }
            }
        }
    }

    fn content(&mut self, out: &mut Vec<Part>) {
        let Some(format) = self.tools else {
            if !self.held.is_empty() {
                out.push(Part::Content(std::mem::take(&mut self.held)));
            }
            return;
        };
        let (emit, rest) = match format.find_start(&self.held, self.content_blank) {
            Start::At(i) => {
                let rest = self.held.split_off(i);
                self.calls = Some(rest);
                (std::mem::take(&mut self.held), String::new())
            }
            Start::Hold(i) => {
                let rest = self.held.split_off(i);
                (std::mem::take(&mut self.held), rest)
            }
            Start::No => (std::mem::take(&mut self.held), String::new()),
        };
        self.held = rest;
        if !emit.is_empty() {
            self.content_blank &= emit.trim().is_empty();
            out.push(Part::Content(emit));
        }
    }

    /// The end of the answer: what was held back, and the calls (none when what looked
    /// like calls does not parse: it is content then).
    pub fn finish(mut self) -> (Vec<Part>, Vec<ToolCall>) {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match self.think {
            Think::Inside if !held.is_empty() => out.push(Part::Reasoning(held)),
            Think::Start | Think::Closed | Think::Content if !held.trim().is_empty() => {
                out.push(Part::Content(held))
            }
            _ => {}
        }
        let Some(text) = self.calls.take() else {
            return (out, Vec::new());
        };
        match self.tools.and_then(|f| f.parse(&text)) {
            Some((mut calls, after)) => {
                if !self.parallel {
                    calls.truncate(1);
                }
                if !after.trim().is_empty() {
                    out.push(Part::Content(after));
                }
                (out, calls)
            }
            None => {
                out.push(Part::Content(text));
                (out, Vec::new())
            }
        }
    }

    /// A whole answer at once: (reasoning, content, calls).
    pub fn split(mut self, text: &str) -> (Option<String>, String, Vec<ToolCall>) {
        let mut parts = self.push(text);
        let (more, calls) = self.finish();
        parts.extend(more);
        let (mut reasoning, mut content) = (None::<String>, String::new());
        for p in parts {
            match p {
                Part::Reasoning(r) => reasoning.get_or_insert_with(String::new).push_str(&r),
                Part::Content(c) => content.push_str(&c),
            }
        }
        (reasoning, content, calls)
    }
}

/// Whether a rendered prompt ends inside a `<think>` block its template opened
/// (DeepSeek-R1's distills, Qwen3 with thinking forced): the answer starts as reasoning.
pub fn prompt_opens_think(prompt: &str) -> bool {
    let t = prompt.trim_end();
    t.ends_with(THINK_OPEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(s: &mut AnswerSplitter, text: &str, step: usize) -> Vec<Part> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for chunk in chars.chunks(step) {
            out.extend(s.push(&chunk.iter().collect::<String>()));
        }
        out
    }

    fn joined(parts: &[Part]) -> (String, String) {
        let (mut r, mut c) = (String::new(), String::new());
        for p in parts {
            match p {
                Part::Reasoning(x) => r.push_str(x),
                Part::Content(x) => c.push_str(x),
            }
        }
        (r, c)
    }

    #[test]
    fn formats_are_read_off_templates() {
        let qwen = "{%- if tools %}<tools>{% endif %}<tool_call>\\n{\"name\": ...";
        assert_eq!(ToolFormat::of_template(qwen), ToolFormat::Hermes);
        let llama = "<|start_header_id|>ipython<|end_header_id|>{% if tools %}<|python_tag|>";
        assert_eq!(ToolFormat::of_template(llama), ToolFormat::Llama3);
        let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        assert_eq!(ToolFormat::of_template(mistral), ToolFormat::Mistral);
        assert_eq!(
            ToolFormat::of_template(super::super::template::FALLBACK_TEMPLATE),
            ToolFormat::Described
        );
    }

    #[test]
    fn hermes_calls_split_out_of_a_stream_at_any_chunking() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 2, 3, 5, 7, 200] {
            let mut s = AnswerSplitter::new(Some(ToolFormat::Hermes), true, false);
            let mut parts = stream(&mut s, text, step);
            let (more, calls) = s.finish();
            parts.extend(more);
            assert_eq!(
                joined(&parts),
                (String::new(), "Let me look.\n".into()),
                "{step}"
            );
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(calls[0].arguments, "{\"city\":\"Paris\"}");
            assert_eq!(calls[1].name, "get_time");
            assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
        }
        // Not parallel: the first call only.
        let (_, _, calls) = AnswerSplitter::new(Some(ToolFormat::Hermes), false, false).split(text);
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn text_that_is_not_a_call_stays_content() {
        // A tag without JSON, and a lone `<` that might have been a tag.
        for text in ["Use <tool_call> tags, like <b>.", "a < b", "x <tool_ca"] {
            let (r, c, calls) =
                AnswerSplitter::new(Some(ToolFormat::Hermes), true, false).split(text);
            assert_eq!((r, c.as_str(), calls.len()), (None, text, 0));
        }
        // Without tools nothing is held.
        let mut s = AnswerSplitter::new(None, true, false);
        assert_eq!(s.push("<tool_c"), vec![Part::Content("<tool_c".into())]);
    }

    #[test]
    fn llama_and_mistral_calls_are_the_whole_answer() {
        let (_, c, calls) = AnswerSplitter::new(Some(ToolFormat::Llama3), true, false)
            .split("{\"name\": \"f\", \"parameters\": {\"x\": 1}}");
        assert_eq!((c.as_str(), calls[0].name.as_str()), ("", "f"));
        assert_eq!(calls[0].arguments, "{\"x\":1}");
        let (_, c, calls) = AnswerSplitter::new(Some(ToolFormat::Llama3), true, false)
            .split("The answer is {\"name\": 1}");
        assert_eq!(
            (c.as_str(), calls.len()),
            ("The answer is {\"name\": 1}", 0)
        );
        let (_, _, calls) = AnswerSplitter::new(Some(ToolFormat::Mistral), true, false)
            .split(" [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"y\": \"z\"}}]");
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // Looked like a call, is not: it comes back as content.
        let (_, c, calls) =
            AnswerSplitter::new(Some(ToolFormat::Mistral), true, false).split("[1, 2]");
        assert_eq!((c.as_str(), calls.len()), ("[1, 2]", 0));
    }

    #[test]
    fn thinking_is_split_from_the_answer() {
        let text = "<think>\nThe user greets me.\n</think>\n\nHello!";
        for step in [1, 2, 4, 100] {
            let mut s = AnswerSplitter::new(None, true, false);
            let mut parts = stream(&mut s, text, step);
            parts.extend(s.finish().0);
            assert_eq!(
                joined(&parts),
                ("\nThe user greets me.\n".into(), "Hello!".into()),
                "{step}"
            );
        }
        // The template opened the block: the answer starts inside it.
        let (r, c, _) = AnswerSplitter::new(None, true, true).split("Hmm, 2+2.\n</think>\n4");
        assert_eq!((r.as_deref(), c.as_str()), (Some("Hmm, 2+2.\n"), "4"));
        // An answer that never thinks is all content, `<` included.
        let (r, c, _) = AnswerSplitter::new(None, true, false).split("<b>bold</b>");
        assert_eq!((r, c.as_str()), (None, "<b>bold</b>"));
        // Thinking, then a call.
        let (r, c, calls) = AnswerSplitter::new(Some(ToolFormat::Hermes), true, false).split(
            "<think>need weather</think>\n<tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(
            (r.as_deref(), c.as_str(), calls.len()),
            (Some("need weather"), "", 1)
        );
        assert!(prompt_opens_think("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_think("<|im_start|>assistant\n"));
    }

    #[test]
    fn call_grammars_compile() {
        let f = vec![
            json!({"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}),
        ];
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Described,
        ] {
            for parallel in [true, false] {
                let g = super::super::Grammar::Lark(format.grammar(&f, parallel));
                g.check().unwrap_or_else(|e| panic!("{format:?}: {e}"));
            }
        }
    }
}
