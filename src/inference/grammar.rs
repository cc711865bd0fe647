//! Constrained decoding: answers that must be JSON (OpenAI's `response_format`
//! `json_object` / `json_schema`) are generated under a grammar with **llguidance** (the
//! library llama.cpp, mistral.rs and vLLM use), so even a small model emits JSON that
//! parses and fits the schema.
//!
//! Each step the matcher of a sequence computes which tokens may come next (a bit per
//! vocabulary entry, from a token trie built once per model from the tokenizer's bytes);
//! the others' logits become −∞ before the sampler runs, and the chosen token advances the
//! matcher. Once the grammar is complete only the end-of-sequence token is allowed.

use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

/// What an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's JSON mode).
    JsonObject,
    /// JSON valid under this JSON Schema.
    JsonSchema(Value),
    /// A grammar in llguidance's Lark syntax (tool calls: [`super::tools::ToolFormat::grammar`]).
    Lark(String),
    /// Calls of these functions (OpenAI function objects) in the model's own tool-call
    /// format, one or (`parallel`) more: the engine makes it [`Grammar::Lark`] once it knows
    /// the model's template.
    ToolCalls {
        functions: Vec<Value>,
        parallel: bool,
    },
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        let mut schema = match self {
            Grammar::JsonObject => serde_json::json!({"type": "object"}),
            Grammar::JsonSchema(schema) => schema.clone(),
            Grammar::Lark(text) => return TopLevelGrammar::from_lark(text.clone()),
            // Made Lark by the engine before any use; here, the Hermes form.
            Grammar::ToolCalls {
                functions,
                parallel,
            } => {
                return TopLevelGrammar::from_lark(
                    super::tools::ToolFormat::Hermes.grammar(functions, *parallel),
                );
            }
        };
        // JSON as models write it (`{"a": 1, "b": 2}`), one way: with flexible whitespace a
        // small model may emit runs of blanks or newlines until `max_tokens` runs out. A
        // schema's own `x-guidance` options win.
        if schema.is_object() && schema.get("x-guidance").is_none() {
            JsonCompileOptions {
                item_separator: ", ".into(),
                key_separator: ": ".into(),
                whitespace_flexible: false,
                ..JsonCompileOptions::default()
            }
            .apply_to(&mut schema);
        }
        TopLevelGrammar::from_json_schema(schema)
    }

    /// Checks that the grammar compiles (an unsupported or malformed schema is the
    /// caller's error), independently of any model: against a vocabulary of single bytes.
    pub fn check(&self) -> Result<(), String> {
        static FACTORY: OnceLock<Result<ParserFactory, String>> = OnceLock::new();
        let factory = FACTORY
            .get_or_init(|| {
                ParserFactory::new_simple(
                        &llguidance::toktrie::ApproximateTokEnv::single_byte_env(),
                    )
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| format!("the grammar library cannot start: {e}"))?;
        factory
            .create_parser(self.top_level())
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

/// One model's vocabulary as llguidance sees it: built once, on first use, on the model's
/// worker thread (decoding every token takes a moment).
pub struct GrammarVocab {
    factory: ParserFactory,
    vocab: usize,
}

/// The tokenizer behind a trie: llguidance tokenizes forced text through it.
struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl GrammarVocab {
    /// `bytes(id)`: the bytes token `id` stands for; `vocab`: the logits' width (at least
    /// the tokenizer's size); `eos`: the token that ends an answer.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        vocab: usize,
        eos: u32,
        bytes: impl Fn(u32) -> Vec<u8>,
    ) -> Result<Self> {
        let specials: std::collections::HashMap<u32, String> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match specials.get(&id) {
                // Special tokens never stand for text: the trie marks them.
                Some(name) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(name.as_bytes());
                    w
                }
                None if (id as usize) < tokenizer.get_vocab_size(true) => bytes(id),
                None => Vec::new(), // padding rows of the output layer
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let factory = ParserFactory::new_simple(&env).context("llguidance")?;
        Ok(GrammarVocab { factory, vocab })
    }

    /// A fresh matcher for one answer.
    pub fn matcher(&self, grammar: &Grammar) -> Result<Constrained> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| anyhow!("{e:#}"))?;
        Ok(Constrained {
            matcher: Matcher::new(Ok(parser)),
            vocab: self.vocab,
        })
    }
}

/// One answer's place in its grammar.
pub struct Constrained {
    matcher: Matcher,
    vocab: usize,
}

impl Constrained {
    /// Bans (−∞) every token the grammar does not allow next.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("{e:#}"))?;
        if allowed.is_zero() {
            return Err(anyhow!("the grammar allows no token here"));
        }
        for (id, l) in logits.iter_mut().enumerate().take(self.vocab) {
            if !allowed.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in logits.iter_mut().skip(self.vocab) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances past the chosen token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("{e:#}"))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
