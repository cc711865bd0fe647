//! Text in and out: the tokenizer (from `tokenizer.json`, else built from the GGUF metadata),
//! the chat template and special tokens of a base model, incremental detokenisation into
//! clean UTF-8 pieces, and stop strings that may span token boundaries.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Content;
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::config::{ModelConfig, eos_from_hf};
use super::model::WeightsSource;
use super::template::{ChatTemplate, FALLBACK_TEMPLATE};
use crate::models::gguf::Meta;

/// What a base model needs before its weights: shape, tokenizer, template, stop tokens.
/// Cheap to load (tens of milliseconds), so requests can be checked before generation starts.
pub struct ChatAssets {
    pub source: WeightsSource,
    /// The shape (from config.json or the GGUF metadata), for checking adapters.
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Where the template came from (`tokenizer_config.json`, GGUF metadata, fallback).
    pub template_origin: String,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
}

impl ChatAssets {
    /// Loads the assets for weights `source`; `dir` is the model folder (tokenizer files).
    pub fn load(dir: &Path, source: WeightsSource) -> anyhow::Result<ChatAssets> {
        let tokenizer_json = dir.join("tokenizer.json");
        let (config, gguf_tok) = match &source {
            WeightsSource::Hf(d) => (ModelConfig::from_hf_file(&d.join("config.json"))?, None),
            WeightsSource::Gguf(p) => {
                let mut f = BufReader::new(
                    File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
                );
                let content = Content::read(&mut f)
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("{} is not a readable GGUF file", p.display()))?;
                let meta = Meta::new(&content.metadata)?;
                let tied = !content.tensor_infos.contains_key("output.weight");
                let bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
                let config = ModelConfig::from_gguf(&meta, None, tied, bias)?;
                let built =
                    crate::models::tokenizer::build(&meta, Some(config.max_positions as u64))?;
                let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                    .iter()
                    .filter_map(|k| meta.uint(k).ok().flatten().map(|v| v as u32))
                    .collect();
                (config, Some((built, eos)))
            }
        };
        let tokenizer = if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tokenizer_json.display()))?
        } else if let Some((built, _)) = &gguf_tok {
            tokenizer_from_json(&built.tokenizer_json)?
        } else {
            bail!("{} has no tokenizer.json", dir.display());
        };

        // Template and special tokens: the folder's files first, then the GGUF metadata.
        let tok_config: Option<Json> = std::fs::read(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut specials: Vec<(String, String)> = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let from_config = tok_config.as_ref().and_then(|c| token_string(&c[key]));
            let from_gguf = gguf_tok.as_ref().and_then(|(b, _)| {
                let s = &b.specials;
                match key {
                    "bos_token" => s.bos.as_ref(),
                    "eos_token" => s.eos.as_ref(),
                    "unk_token" => s.unk.as_ref(),
                    _ => s.pad.as_ref(),
                }
                .map(|(_, t)| t.clone())
            });
            if let Some(v) = from_config.or(from_gguf) {
                specials.push((key.to_string(), v));
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let (template_src, origin) = if jinja.is_file() {
            (
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
                "chat_template.jinja".to_string(),
            )
        } else if let Some(t) = tok_config
            .as_ref()
            .and_then(|c| template_string(&c["chat_template"]))
        {
            (t, "tokenizer_config.json".to_string())
        } else if let Some(t) = gguf_tok
            .as_ref()
            .and_then(|(b, _)| template_string(&b.tokenizer_config["chat_template"]))
        {
            (t, "GGUF metadata".to_string())
        } else {
            (
                FALLBACK_TEMPLATE.to_string(),
                "fallback (ChatML)".to_string(),
            )
        };
        let template = ChatTemplate::new(&template_src, specials.clone())
            .with_context(|| format!("the chat template ({origin}) does not compile"))?;

        let mut eos_ids = match &source {
            WeightsSource::Hf(d) => eos_from_hf(d),
            WeightsSource::Gguf(_) => {
                let mut ids = eos_from_hf(dir);
                if let Some((_, e)) = &gguf_tok {
                    ids.extend(e);
                }
                ids
            }
        };
        if let Some((_, eos)) = specials.iter().find(|(k, _)| k == "eos_token")
            && let Some(id) = tokenizer.token_to_id(eos)
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(ChatAssets {
            source,
            config,
            tokenizer,
            template,
            template_origin: origin,
            eos_ids,
        })
    }

    /// Token ids of rendered prompt text (special tokens in the text are recognised; nothing
    /// is added: templates write their own BOS).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
            .get_ids()
            .to_vec())
    }
}

/// A `tokenizers::Tokenizer` from a tokenizer.json value.
pub(crate) fn tokenizer_from_json(v: &Json) -> anyhow::Result<Tokenizer> {
    let bytes = serde_json::to_vec(v)?;
    Tokenizer::from_bytes(bytes).map_err(|e| anyhow::anyhow!("cannot build the tokenizer: {e}"))
}

/// The tokenizer built from a GGUF file's metadata alone (what a GGUF-only model uses).
pub fn tokenizer_from_gguf(path: &Path) -> anyhow::Result<Tokenizer> {
    let mut f = BufReader::new(File::open(path)?);
    let content = Content::read(&mut f).map_err(anyhow::Error::from)?;
    let meta = Meta::new(&content.metadata)?;
    let built = crate::models::tokenizer::build(&meta, None)?;
    tokenizer_from_json(&built.tokenizer_json)
}

/// `"<s>"` or `{"content": "<s>", …}` (older tokenizer_config.json files).
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// A template string, or the `default` one of a list of named templates.
/// A `chat_template` value: a string, or a list of named templates (the `default` one).
pub(crate) fn template_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| items.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The folder whose files describe the model (same for both sources).
pub fn model_dir(source: &WeightsSource) -> PathBuf {
    match source {
        WeightsSource::Hf(d) => d.clone(),
        WeightsSource::Gguf(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
    }
}

/// Turns generated ids into text pieces as they come, holding back bytes that do not yet
/// form whole UTF-8 characters (a character split over tokens) and never re-emitting text.
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Default for Detokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Detokenizer {
    pub fn new() -> Self {
        Detokenizer {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> anyhow::Result<Option<String>> {
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tok.decode(ids, true)
                .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = match now.get(before.len()..) {
                Some(p) if now.starts_with(&before) => p.to_string(),
                // Decoding the longer run changed earlier text (rare normalisation cases).
                _ => now.chars().skip(before.chars().count()).collect(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete character at the end), as text.
    pub fn flush(&mut self, tok: &Tokenizer) -> anyhow::Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let decode = |ids: &[u32]| {
            tok.decode(ids, true)
                .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        let piece: String = now.chars().skip(before.chars().count()).collect();
        // What was held back ends in an unfinished character (the answer was cut inside it):
        // its partial bytes are dropped, not shown as U+FFFD.
        let piece = piece.trim_end_matches('\u{FFFD}').to_string();
        Ok((!piece.is_empty()).then_some(piece))
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until the next piece decides; a stop string is never emitted.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to do with a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this (possibly empty) text and go on.
    Continue(String),
    /// Emit this text and stop: a stop string was found right after it.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(piece.to_string());
        }
        self.held.push_str(piece);
        // The earliest stop string wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stop(out);
        }
        // Hold back the longest tail that begins some stop string.
        let mut keep = 0;
        for s in &self.stops {
            // Proper prefixes (a whole stop string was looked for above).
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// The held-back text, at the end of generation (it was not a stop string after all).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out += &t,
                StopOutcome::Stop(t) => {
                    out += &t;
                    return (out, true);
                }
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_strings_across_pieces() {
        assert_eq!(
            run(&["END"], &["abc", "E", "N", "D", "x"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abcEN", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["abcEN", "d"]), ("abcENd".into(), false));
        assert_eq!(run(&["END"], &["abcE"]), ("abcE".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(
            run(&["\n\n", "User:"], &["Hi", "\n", "Us", "er:"]),
            ("Hi\n".into(), true)
        );
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn held_back_text_is_emitted_as_soon_as_it_cannot_stop() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ab ST"), StopOutcome::Continue("ab ".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("STx".into()));
    }
}
