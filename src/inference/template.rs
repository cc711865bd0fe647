//! The model's own Jinja chat template, rendered with minijinja the way transformers renders
//! it (`apply_chat_template`): `trim_blocks` + `lstrip_blocks`, loop controls, Python string
//! and dict methods, `raise_exception`, `strftime_now`, and a `tojson` that writes what
//! Python's `json.dumps` writes (no HTML escaping, `", "` / `": "` separators).

use std::collections::BTreeMap;

use indexmap::IndexMap;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::ChatMessage;
use super::tools::ToolFormat;

/// Used when a model ships no template (base models): ChatML, as LlamaFactory's `chatml`.
pub const FALLBACK_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// How the template writes tool calls.
    tool_format: ToolFormat,
    /// Extra variables: `bos_token`, `eos_token`, `unk_token`, `pad_token` when known.
    specials: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("specials", &self.specials)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `specials` are the special-token variables (`bos_token`, …).
    pub fn new(source: &str, specials: Vec<(String, String)>) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())?;
        Ok(ChatTemplate {
            env,
            tool_format: ToolFormat::of_template(source),
            specials,
        })
    }

    /// How this template's model writes tool calls.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with `tools` (OpenAI tool objects) the model may call. A
    /// template without a tools section gets them described in the system message, and past
    /// calls and results written into the messages' text ([`ToolFormat::Described`]).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let tmpl = self.env.get_template("chat")?;
        let described;
        let messages = if self.tool_format == ToolFormat::Described {
            described = describe_tools(messages, tools);
            &described[..]
        } else {
            messages
        };
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                // Insertion order, as a Python dict (what `tojson` prints).
                let mut d: IndexMap<Value, Value> = IndexMap::new();
                d.insert(Value::from("role"), Value::from(m.role.as_str()));
                d.insert(Value::from("content"), Value::from(m.content.as_str()));
                if !m.tool_calls.is_empty() {
                    let calls: Vec<Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| Value::from(minijinja::value::Serde(c.to_template())))
                        .collect();
                    d.insert(Value::from("tool_calls"), Value::from(calls));
                }
                if let Some(id) = &m.tool_call_id {
                    d.insert(Value::from("tool_call_id"), Value::from(id.as_str()));
                }
                Value::from(d)
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        if !tools.is_empty() && self.tool_format != ToolFormat::Described {
            ctx.insert("tools".into(), Value::from(minijinja::value::Serde(tools)));
        }
        ctx.insert("messages".into(), Value::from(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        tmpl.render(Value::from(ctx))
    }
}

/// The conversation as a model whose template knows nothing of tools sees it: the tools
/// described in the system message (one is added when there is none), calls written out in
/// the Hermes format, tool results as user messages in `<tool_response>` tags.
fn describe_tools(messages: &[ChatMessage], tools: &[serde_json::Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let calls = ToolFormat::write_calls(&m.tool_calls);
                let content = if m.content.is_empty() {
                    calls
                } else {
                    format!("{}\n{calls}", m.content)
                };
                ChatMessage::new("assistant", content)
            }
            "tool" => ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            ),
            _ => m.clone(),
        })
        .collect();
    if !tools.is_empty() {
        let described = ToolFormat::describe(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{described}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", described)),
        }
    }
    out
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current time (UTC) formatted with the common C specifiers.
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = time::OffsetDateTime::now_utc();
    Ok(Value::from(strftime(&now, &format)))
}

fn strftime(t: &time::OffsetDateTime, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    let day = DAYS[usize::from(t.weekday().number_days_from_monday())];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &t.year().to_string(),
            Some('y') => out += &format!("{:02}", t.year().rem_euclid(100)),
            Some('m') => out += &format!("{:02}", u8::from(t.month())),
            Some('d') => out += &format!("{:02}", t.day()),
            Some('e') => out += &format!("{:>2}", t.day()),
            Some('j') => out += &format!("{:03}", t.ordinal()),
            Some('H') => out += &format!("{:02}", t.hour()),
            Some('I') => out += &format!("{:02}", (t.hour() + 11) % 12 + 1),
            Some('p') => out += if t.hour() < 12 { "AM" } else { "PM" },
            Some('M') => out += &format!("{:02}", t.minute()),
            Some('S') => out += &format!("{:02}", t.second()),
            Some('B') => out += month,
            Some('b') | Some('h') => out += &month[..3],
            Some('A') => out += day,
            Some('a') => out += &day[..3],
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    // Accepted and ignored, as far as they change nothing for templates' values.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0, sort_keys.unwrap_or(false))?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    sort: bool,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&python_float(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String => write_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1, sort)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => write_str(out, s),
                    None => write_str(out, &k.to_string()),
                }
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1, sort)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_str(out, &v.to_string()),
    }
    Ok(())
}

fn python_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(FALLBACK_TEMPLATE, vec![]).unwrap();
        let s = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_compatibility() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip().upper() }}|{{ m | tojson }}\n{% endfor %}{{ bos_token }}{{ {'a': [1, 2.5, none, true], 'b': 'x\"<y>'} | tojson }}";
        let t = ChatTemplate::new(src, vec![("bos_token".into(), "<s>".into())]).unwrap();
        let s = t.render(&[msg("user", "  héllo ")], false).unwrap();
        assert_eq!(
            s,
            "HÉLLO|{\"role\": \"user\", \"content\": \"  héllo \"}\n<s>{\"a\": [1, 2.5, null, true], \"b\": \"x\\\"<y>\"}"
        );
        let e = t.render(&[msg("system", "x")], false).unwrap_err();
        assert!(e.to_string().contains("bad role system"), "{e}");
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {% if loop.first %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, vec![]).unwrap();
        assert_eq!(
            t.render(&[msg("user", "a"), msg("user", "b")], false)
                .unwrap(),
            "[a]\n"
        );
    }

    #[test]
    fn tools_reach_templates_that_take_them() {
        use crate::inference::tools::ToolCall;
        // The tools part of Qwen2.5's template.
        let src = r#"{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for message in messages %}{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;
        let t = ChatTemplate::new(src, vec![]).unwrap();
        assert_eq!(t.tool_format(), ToolFormat::Hermes);
        let tools = vec![
            serde_json::json!({"type": "function", "function": {"name": "w",
            "parameters": {"type": "object"}}}),
        ];
        let mut call = msg("assistant", "");
        call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "w".into(),
            arguments: "{\"city\": \"Oslo\"}".into(),
        }];
        let mut result = msg("tool", "{\"c\": 3}");
        result.tool_call_id = Some("call_1".into());
        let s = t
            .render_with_tools(&[msg("user", "weather?"), call, result], &tools, true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\n# Tools\n<tools>{\"type\": \"function\", \"function\": {\"name\": \"w\", \"parameters\": {\"type\": \"object\"}}}</tools><|im_end|>\n<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"c\": 3}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        );
        // A template without tools: described in the system message, calls and results in
        // the messages' text.
        let t = ChatTemplate::new(FALLBACK_TEMPLATE, vec![]).unwrap();
        assert_eq!(t.tool_format(), ToolFormat::Described);
        let mut call = msg("assistant", "");
        call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "w".into(),
            arguments: "{\"city\": \"Oslo\"}".into(),
        }];
        let s = t
            .render_with_tools(
                &[
                    msg("system", "Be brief."),
                    msg("user", "weather?"),
                    call,
                    msg("tool", "3C"),
                ],
                &tools,
                true,
            )
            .unwrap();
        assert!(
            s.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n"),
            "{s}"
        );
        assert!(
            s.contains("\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"w\""),
            "{s}"
        );
        assert!(s.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n3C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), "{s}");
    }

    #[test]
    fn strftime_formats() {
        let t = time::macros::datetime!(2024-07-05 13:04:09 UTC);
        assert_eq!(
            strftime(&t, "%d %b %Y, %A %H:%M:%S %%"),
            "05 Jul 2024, Friday 13:04:09 %"
        );
    }
}
