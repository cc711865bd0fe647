//! The record formats (alpaca, sharegpt, openai): shape detection and validation of each
//! record, whatever container it came from.

use super::*;

/// "a string", "an array"... for messages.
pub(super) fn kind(value: &Value) -> &'static str {
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
pub(super) struct Checker {
    pub(super) format: Option<DatasetFormat>,
}

impl Checker {
    pub(super) fn check(&mut self, value: &Value) -> Result<(), String> {
        let Value::Object(record) = value else {
            return Err(format!("expected a JSON object, found {}", kind(value)));
        };
        refuse_dropped_fields(record)?;
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

/// Fields that change what a record means but that the supervised stages ferrotune trains
/// would drop: accepting them would train something else than the data says (KTO rows whose
/// `label` marks a bad answer would be imitated; `<image>` placeholders learnt as text
/// without their images). Refused until those kinds are supported.
pub(super) fn refuse_dropped_fields(record: &Map<String, Value>) -> Result<(), String> {
    for key in ["label", "kto_tag"] {
        if record.get(key).is_some_and(Value::is_boolean) {
            return Err(format!(
                "`{key}` marks this as KTO data (answers labelled good or bad), which ferrotune                  does not train yet: as supervised data every answer would be imitated, the bad                  ones too. Keep the rows labelled true and drop `{key}` to train them as SFT"
            ));
        }
    }
    for key in ["images", "videos", "audios"] {
        if record
            .get(key)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(format!(
                "`{key}`: multimodal records are not supported yet (the {key} would be dropped                  and their placeholders learnt as text); remove `{key}` and the placeholders to                  train on the text"
            ));
        }
    }
    for key in ["chosen", "rejected"] {
        if record.contains_key(key) {
            return Err(format!(
                "`{key}` marks this as preference data (chosen/rejected answers for DPO or a                  reward model), which ferrotune does not train yet"
            ));
        }
    }
    Ok(())
}

/// The format a record's keys point to; `None` when they point to none.
pub(super) fn shape_of(record: &Map<String, Value>) -> Result<Option<DatasetFormat>, String> {
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

pub(super) fn required_str<'a>(
    record: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, String> {
    match record.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

/// A string field that may be missing or null.
pub(super) fn optional_str<'a>(
    record: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, String> {
    match record.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

pub(super) fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

pub(super) fn check_alpaca_text(
    instruction: &str,
    input: Option<&str>,
    output: &str,
) -> Result<(), String> {
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

pub(super) fn check_alpaca(record: &Map<String, Value>) -> Result<(), String> {
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
pub(super) struct Dialect {
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

pub(super) const SHAREGPT: Dialect = Dialect {
    list: "conversations",
    role: "from",
    content: "value",
    system: "system",
    prompt_roles: ["human", "observation"],
    reply_roles: ["gpt", "function_call"],
    may_be_blank: "observation",
    all_roles: "human, gpt, system, function_call or observation",
};

pub(super) const OPENAI: Dialect = Dialect {
    list: "messages",
    role: "role",
    content: "content",
    system: "system",
    prompt_roles: ["user", "tool"],
    reply_roles: ["assistant", "function"],
    may_be_blank: "tool",
    all_roles: "system, user, assistant, tool or function",
};

pub(super) fn check_dialogue(record: &Map<String, Value>, dialect: &Dialect) -> Result<(), String> {
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
