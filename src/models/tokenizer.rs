//! The Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
//! `special_tokens_map.json`) written from a GGUF file's `tokenizer.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by SmolLM, Llama 3, Qwen2) is
//! supported. The pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does (for
//! example SmolLM's `smollm` splits every digit on its own), which is what the model was
//! trained with; transformers' own GGUF loader ignores `tokenizer.ggml.pre` and always uses
//! GPT-2 splitting, so the two differ on text with digits for such models.

use anyhow::{Context, bail};
use serde_json::{Map, Value as Json, json};

use super::gguf::Meta;

/// llama.cpp's `tokenizer.ggml.token_type` values that matter here.
const TOKEN_UNKNOWN: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// The pre-tokenizer regular expressions of the original Hugging Face tokenizers.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens by role, as strings.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Specials {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
}

/// Everything written for the tokenizer.
pub(crate) struct TokenizerFiles {
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub special_tokens_map: Json,
    pub specials: Specials,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Things worth telling the user (fallbacks taken).
    pub notes: Vec<String>,
}

/// Builds the tokenizer files; `context_length` becomes `model_max_length`.
pub(crate) fn build(
    meta: &Meta<'_>,
    context_length: Option<u64>,
) -> anyhow::Result<TokenizerFiles> {
    let model = meta
        .string("tokenizer.ggml.model")?
        .context("the GGUF file has no `tokenizer.ggml.model`")?;
    if model != "gpt2" {
        bail!(
            "the GGUF tokenizer model `{model}` is not supported (only byte-level BPE, \
             `gpt2`, as in SmolLM, Llama 3 and Qwen2; SentencePiece `llama` tokenizers are not)"
        );
    }
    let mut notes = Vec::new();
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .context("the GGUF file has no `tokenizer.ggml.tokens`")?;
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .context("the GGUF file has no `tokenizer.ggml.merges`")?;
    let types = meta.uints("tokenizer.ggml.token_type")?;
    if let Some(t) = &types
        && t.len() != tokens.len()
    {
        bail!(
            "`tokenizer.ggml.token_type` has {} entries for {} tokens",
            t.len(),
            tokens.len()
        );
    }

    let special = |keys: &[&str]| -> anyhow::Result<Option<(u32, String)>> {
        for key in keys {
            if let Some(id) = meta.uint(key)? {
                let token = tokens
                    .get(id as usize)
                    .with_context(|| format!("`{key}` = {id} is outside the vocabulary"))?;
                let id = u32::try_from(id).with_context(|| format!("`{key}` = {id}"))?;
                return Ok(Some((id, (*token).to_string())));
            }
        }
        Ok(None)
    };
    let specials = Specials {
        bos: special(&["tokenizer.ggml.bos_token_id"])?,
        eos: special(&["tokenizer.ggml.eos_token_id"])?,
        unk: special(&[
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.unk_token_id",
        ])?,
        pad: special(&[
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.pad_token_id",
        ])?,
    };

    // Vocabulary and merges.
    let mut vocab = Map::new();
    let mut duplicates = 0usize;
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert((*token).to_string(), json!(id)).is_some() {
            duplicates += 1;
        }
    }
    if duplicates > 0 {
        notes.push(format!(
            "{duplicates} token strings occur more than once in the vocabulary; the last id wins"
        ));
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .with_context(|| format!("invalid merge `{m}` (expected two parts)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Added tokens: control and user-defined tokens, plus every token named by a role.
    let mut added: std::collections::BTreeMap<u32, bool> = Default::default();
    if let Some(types) = &types {
        for (id, ty) in types.iter().enumerate() {
            let special = match *ty {
                TOKEN_CONTROL | TOKEN_UNKNOWN => true,
                TOKEN_USER_DEFINED => false,
                _ => continue,
            };
            added.insert(id as u32, special);
        }
    }
    for (id, _) in [&specials.bos, &specials.eos, &specials.unk, &specials.pad]
        .into_iter()
        .flatten()
    {
        added.insert(*id, true);
    }
    let added_tokens: Vec<Json> = added
        .iter()
        .map(|(id, special)| {
            json!({
                "id": id,
                "content": tokens[*id as usize],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": special,
            })
        })
        .collect();

    // Pre-tokenizer, as llama.cpp splits for `tokenizer.ggml.pre`.
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let pre = meta.string("tokenizer.ggml.pre")?;
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
        Some("smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone") => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        Some("llama-bpe" | "llama3" | "smaug-bpe") => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(REGEX_LLAMA3), byte_level(false)]}),
            true,
        ),
        Some("qwen2") => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(REGEX_QWEN2), byte_level(false)]}),
            false,
        ),
        Some("gpt-2" | "gpt2") => (Json::Null, byte_level(true), false),
        other => {
            notes.push(format!(
                "pre-tokenizer `{}` is not known here; using GPT-2 byte-level splitting \
                 (as transformers does)",
                other.unwrap_or("(none)")
            ));
            (Json::Null, byte_level(true), false)
        }
    };

    // Post-processor: byte-level offsets, plus BOS/EOS when the model wants them added.
    let add_bos = meta
        .boolean("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = meta
        .boolean("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let post_processor = if add_bos || add_eos {
        let mut special_tokens = Map::new();
        let mut role = |on: bool, which: &Option<(u32, String)>, name: &str| {
            if !on {
                return Ok(None);
            }
            let (id, tok) = which.clone().with_context(|| {
                format!("add_{name}_token is set but the GGUF names no {name} token")
            })?;
            special_tokens.insert(
                tok.clone(),
                json!({"id": tok, "ids": [id], "tokens": [tok]}),
            );
            Ok::<_, anyhow::Error>(Some(tok))
        };
        let bos = role(add_bos, &specials.bos, "bos")?;
        let eos = role(add_eos, &specials.eos, "eos")?;
        let part = |seq: &str, type_id: u32| {
            let mut part = Vec::new();
            if let Some(b) = &bos {
                part.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            part.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = &eos {
                part.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
            part
        };
        let single = part("A", 0);
        let mut pair = part("A", 0);
        pair.extend(part("B", 1));
        json!({"type": "Sequence", "processors": [
            byte_level_post,
            {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
        ]})
    } else {
        byte_level_post
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": specials.unk.as_ref().map(|(_, t)| t.clone()),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let mut map = Map::new();
    for (name, which) in [
        ("bos_token", &specials.bos),
        ("eos_token", &specials.eos),
        ("unk_token", &specials.unk),
        ("pad_token", &specials.pad),
    ] {
        if let Some((_, tok)) = which {
            map.insert(name.to_string(), json!(tok));
        }
    }
    let special_tokens_map = Json::Object(map.clone());
    let mut config = map;
    if let Some(template) = meta.string("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    } else {
        notes.push("the GGUF file has no chat template (`tokenizer.chat_template`)".into());
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(n) = context_length {
        config.insert("model_max_length".into(), json!(n));
    }
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: Json::Object(config),
        special_tokens_map,
        specials,
        vocab_size: tokens.len(),
        notes,
    })
}
