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

/// Decides the format and kind from the first record and holds every later record to them.
#[derive(Default)]
pub(super) struct Checker {
    pub(super) format: Option<DatasetFormat>,
    pub(super) kind: Option<DatasetKind>,
    /// KTO rows labelled good and bad.
    desirable: u64,
    undesirable: u64,
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
        let record_kind = kind_of(record, format)?;
        match self.kind {
            None => self.kind = Some(record_kind),
            Some(first) if first != record_kind => {
                return Err(format!(
                    "is {} but the file's first record is {}",
                    record_kind.describe(),
                    first.describe()
                ));
            }
            Some(_) => {}
        }
        match (format, record_kind) {
            (DatasetFormat::Text, _) => check_text(record),
            (DatasetFormat::Alpaca, DatasetKind::Preference) => check_alpaca_preference(record),
            (DatasetFormat::Alpaca, _) => check_alpaca(record),
            (DatasetFormat::Sharegpt, DatasetKind::Preference) => {
                check_preference(record, &SHAREGPT)
            }
            (DatasetFormat::Openai, DatasetKind::Preference) => check_preference(record, &OPENAI),
            (DatasetFormat::Sharegpt, _) => check_dialogue(record, &SHAREGPT, true),
            (DatasetFormat::Openai, _) => check_dialogue(record, &OPENAI, true),
        }?;
        if record_kind == DatasetKind::Kto {
            if kto_label(record) == Some(true) {
                self.desirable += 1;
            } else {
                self.undesirable += 1;
            }
        }
        Ok(())
    }

    /// What is wrong with the file as a whole, once every record passed.
    pub(super) fn finish(&self) -> Result<(), String> {
        if self.kind == Some(DatasetKind::Kto) && (self.desirable == 0 || self.undesirable == 0) {
            return Err(format!(
                "KTO learns from answers labelled good (true) and bad (false), and needs both: \
                 this file has {} labelled true and {} labelled false",
                self.desirable, self.undesirable
            ));
        }
        Ok(())
    }
}

/// The KTO label of a record (`kto_tag` or `label`, a boolean), if it has one.
pub(super) fn kto_label(record: &Map<String, Value>) -> Option<bool> {
    KTO_KEYS
        .iter()
        .find_map(|k| record.get(*k).and_then(Value::as_bool))
}

/// The keys LlamaFactory's KTO datasets mark answers good or bad with.
pub(super) const KTO_KEYS: [&str; 2] = ["kto_tag", "label"];

/// What a record trains: the keys decide.
fn kind_of(record: &Map<String, Value>, format: DatasetFormat) -> Result<DatasetKind, String> {
    let preference = record.contains_key("chosen") || record.contains_key("rejected");
    let kto = kto_label(record).is_some();
    if format == DatasetFormat::Text {
        return Ok(DatasetKind::Text);
    }
    match (preference, kto) {
        (true, true) => Err(
            "has both chosen/rejected answers (preference data) and a boolean `label`/`kto_tag` \
             (KTO data): keep one of them"
                .to_string(),
        ),
        (true, false) => Ok(DatasetKind::Preference),
        (false, true) => Ok(DatasetKind::Kto),
        (false, false) => Ok(DatasetKind::Supervised),
    }
}

/// Fields that change what a record means but that no stage ferrotune trains reads:
/// accepting them would train something else than the data says (`<image>` placeholders
/// learnt as text without their images). Refused until those kinds are supported.
pub(super) fn refuse_dropped_fields(record: &Map<String, Value>) -> Result<(), String> {
    for key in ["images", "videos", "audios"] {
        if record
            .get(key)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(format!(
                "`{key}`: multimodal records are not supported yet (the {key} would be dropped \
                 and their placeholders learnt as text); remove `{key}` and the placeholders to \
                 train on the text"
            ));
        }
    }
    Ok(())
}

/// A plain-text record: `text`, not blank.
fn check_text(record: &Map<String, Value>) -> Result<(), String> {
    if is_blank(required_str(record, "text")?) {
        return Err("`text` is empty".to_string());
    }
    Ok(())
}

/// An alpaca preference record: a prompt and two answer strings, no `output`.
fn check_alpaca_preference(record: &Map<String, Value>) -> Result<(), String> {
    let instruction = required_str(record, "instruction")?;
    let input = optional_str(record, "input")?;
    optional_str(record, "system")?;
    if record.contains_key("output") {
        return Err(
            "has `output` as well as `chosen`/`rejected`: preference training compares the two \
             answers and would ignore `output`; drop it (or drop chosen/rejected for SFT)"
                .to_string(),
        );
    }
    if is_blank(instruction) && input.is_none_or(is_blank) {
        return Err("`instruction` is empty".to_string());
    }
    for key in ["chosen", "rejected"] {
        if is_blank(required_str(record, key)?) {
            return Err(format!("`{key}` is empty"));
        }
    }
    Ok(())
}

/// A conversation preference record: the conversation ends with the prompt, `chosen` and
/// `rejected` are the two answers (one turn each).
fn check_preference(record: &Map<String, Value>, dialect: &Dialect) -> Result<(), String> {
    check_dialogue(record, dialect, false)?;
    for key in ["chosen", "rejected"] {
        let turn = match record.get(key) {
            None => return Err(format!("missing field `{key}` (the other answer is there)")),
            Some(Value::Object(turn)) => turn,
            Some(other) => {
                return Err(format!(
                    "`{key}` must be one {} turn (an object with `{}` and `{}`), found {}",
                    dialect.reply_roles[0],
                    dialect.role,
                    dialect.content,
                    kind(other)
                ));
            }
        };
        let at = |m: String| format!("{key}: {m}");
        let role = required_str(turn, dialect.role).map_err(at)?;
        if !dialect.reply_roles.contains(&role) {
            return Err(at(format!(
                "expected a {} or {} turn, found `{role}`",
                dialect.reply_roles[0], dialect.reply_roles[1]
            )));
        }
        if is_blank(required_str(turn, dialect.content).map_err(at)?) {
            return Err(at(format!("`{}` is empty", dialect.content)));
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
        [] if record.contains_key("text") => Ok(Some(DatasetFormat::Text)),
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

/// A conversation; `ends_with_reply`: it ends with the answer (supervised, KTO) rather than
/// with the prompt (preference data, whose answers are `chosen` and `rejected`).
pub(super) fn check_dialogue(
    record: &Map<String, Value>,
    dialect: &Dialect,
    ends_with_reply: bool,
) -> Result<(), String> {
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
    if ends_with_reply && position % 2 == 1 {
        return Err(format!(
            "`{list}` must end with a {} or {} turn, but ends with `{last_role}`",
            dialect.reply_roles[0], dialect.reply_roles[1]
        ));
    }
    if !ends_with_reply && position.is_multiple_of(2) {
        return Err(format!(
            "`{list}` of preference data must end with the prompt (a {} or {} turn), but ends \
             with `{last_role}`: the answers are `chosen` and `rejected`",
            dialect.prompt_roles[0], dialect.prompt_roles[1]
        ));
    }
    optional_str(record, "system")?;
    optional_str(record, "tools")?;
    Ok(())
}
