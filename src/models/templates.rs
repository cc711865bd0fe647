//! Does a trained model chat the way it was trained? A task trains with one of LlamaFactory's
//! templates (`smollm2`, `llama3`, `alpaca`…); chat renders the base model's own Jinja chat
//! template. When the two format a conversation differently, the fine-tune is asked in a shape
//! it never saw: the model's detail says so instead of letting chat degrade silently.
//!
//! The comparison is by the special markers each template family puts around a turn (ChatML's
//! `<|im_start|>`, Llama 3's `<|start_header_id|>`, `[INST]`, Gemma's `<start_of_turn>`…), not
//! by rendering LlamaFactory's Python templates: it tells families apart, not the finer points
//! inside one family (a default system prompt, a trailing newline).

use std::path::Path;

/// What every turn of a LlamaFactory template contains, by family. `None`: a template we do
/// not know the shape of (no warning either way). An empty list: a plain-text format
/// (`alpaca`'s "### Instruction:", `default`'s "Human:") that no chat template uses.
fn markers(template: &str) -> Option<&'static [&'static str]> {
    Some(match template {
        "chatml" | "qwen" | "qwen2_vl" | "qwen3" | "qwen3_nothink" | "smollm" | "smollm2"
        | "yi" | "cpm4" => &["<|im_start|>"],
        "llama3" => &["<|start_header_id|>"],
        "llama4" => &["<|header_start|>"],
        "llama2" | "mistral" | "ministral" => &["[INST]"],
        "gemma" | "gemma2" | "gemma3" => &["<start_of_turn>"],
        "phi4" => &["<|im_sep|>"],
        "phi" | "zephyr" => &["<|user|>"],
        "glm4" => &["<|user|>"],
        "deepseek3" => &["<｜User｜>"],
        "default" | "alpaca" | "vicuna" | "empty" | "deepseek" => &[],
        _ => return None,
    })
}

/// The base model's chat template as chat reads it (`chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template`), or `None` when the folder has none (chat then
/// falls back to ChatML). Blocking: reads files.
pub fn chat_template_of(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let bytes = std::fs::read(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    crate::inference::text::template_string(&v["chat_template"])
}

/// A warning when `trained_with` (a LlamaFactory template name) and the chat template chat
/// will use (`chat_template`; `None`: the ChatML fallback) format conversations differently.
pub fn mismatch(trained_with: &str, chat_template: Option<&str>) -> Option<String> {
    let expected = markers(trained_with)?;
    let (template, origin) = match chat_template {
        Some(t) => (t, "the base model's chat template"),
        None => (
            crate::inference::template::FALLBACK_TEMPLATE,
            "the ChatML template chat falls back to (the base model has none)",
        ),
    };
    if expected.is_empty() {
        return Some(format!(
            "trained with LlamaFactory's `{trained_with}` template, a plain-text format, but chat \
             formats conversations with {origin}: answers may not follow the fine-tune. Train \
             with the model's own template (leave `template` empty) to chat as trained."
        ));
    }
    if expected.iter().all(|m| template.contains(m)) {
        return None;
    }
    Some(format!(
        "trained with LlamaFactory's `{trained_with}` template (turns marked {}), but chat \
         formats conversations with {origin}, which does not use those markers: answers may \
         not follow the fine-tune. Train with the model's own template (leave `template` empty) \
         to chat as trained.",
        expected.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const LLAMA3: &str = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}";

    #[test]
    fn the_same_family_is_quiet_and_another_is_named() {
        assert_eq!(mismatch("smollm2", Some(SMOLLM2)), None);
        assert_eq!(mismatch("chatml", Some(SMOLLM2)), None);
        assert_eq!(mismatch("llama3", Some(LLAMA3)), None);
        let w = mismatch("llama3", Some(SMOLLM2)).expect("llama3 over ChatML");
        assert!(
            w.contains("`llama3`") && w.contains("<|start_header_id|>"),
            "{w}"
        );
        assert!(mismatch("qwen", Some(LLAMA3)).is_some());
        let w = mismatch("alpaca", Some(SMOLLM2)).expect("a plain-text format");
        assert!(w.contains("plain-text"), "{w}");
        // No chat template: chat uses ChatML.
        assert_eq!(mismatch("qwen", None), None);
        assert!(mismatch("llama3", None).unwrap().contains("falls back"));
        // A template we do not know: no claim either way.
        assert_eq!(mismatch("something_new", Some(SMOLLM2)), None);
    }

    #[test]
    fn the_template_is_read_as_chat_reads_it() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(chat_template_of(d.path()), None);
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}).to_string(),
        )
        .unwrap();
        assert_eq!(chat_template_of(d.path()).as_deref(), Some("D"));
        std::fs::write(d.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(chat_template_of(d.path()).as_deref(), Some("J"));
    }
}
