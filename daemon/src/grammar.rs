//! Structured output: a request's `response_format` (JSON object, JSON schema) or `grammar`
//! (Lark, regex) constrains which tokens may be sampled, with
//! [llguidance](https://github.com/guidance-ai/llguidance), the constrained-decoding library of
//! onnxruntime-genai, llama.cpp (as an option) and mistral.rs.
//!
//! - [`Format`] is what a request asks for, parsed from the wire (OpenAI's `response_format`
//!   vocabulary, and `grammar` as our extension).
//! - [`Grammars`] is built once per model, on the first constrained request: the token trie of
//!   the vocabulary (each token's bytes, from the tokenizer's byte table; special tokens marked
//!   so that no grammar text can spell them) and llguidance's parser factory.
//! - [`Grammar`] is a compiled format. The scheduler compiles a request's format when it admits
//!   it, so an invalid schema or grammar is refused (`invalid_request`, naming the problem)
//!   before anything is queued; the engine clones the compiled parser per sequence.
//! - [`Constraint`] runs with one sequence: before each sampling the mask of allowed tokens
//!   (applied by [`crate::sampler::Sampler::sample_masked`]), after it the token is committed,
//!   and the tokens the grammar then forces (`{"name": "` after `{` in a schema with one
//!   required key) are taken without sampling. The sequence ends (finish reason `stop`) when
//!   the grammar is complete; an end-of-sequence token is allowed whenever the grammar could
//!   end there. Mask time and forced tokens are counted for `usage`.
//!
//! JSON is generated in one layout: `", "` between items, `": "` after keys, no other
//! whitespace (Python's `json.dumps`). A grammar that lets the model add whitespace anywhere lets
//! a small model fill its answer with newlines; a fixed layout also lets more tokens be forced.
//! A schema's own `x-guidance` options (llguidance's JSON settings) override this.
//!
//! Masks are computed on the engine thread, just before sampling, not overlapped with the
//! forward pass: on the real model a mask costs about 0.2 ms on average against a 12 ms decode
//! step on two cores (1.5%; 0.16% of gpt-oss-20b's step on its 201k vocabulary:
//! `scripts/bench-grammar.sh`, docs/structured-output.md), so an overlap could save little,
//! and a helper thread would compete with ONNX Runtime's own threads on a small board's cores. Constrained sequences allocate (llguidance's masks and parser
//! state); unconstrained ones keep the engine's allocation-free decode step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{Value, json};

use crate::tokenizer::Tokenizer;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object: OpenAI's `{"type": "json_object"}`.
    JsonObject,
    /// OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. The
    /// schema is always enforced (`strict` is accepted and changes nothing).
    JsonSchema { name: String, schema: Value },
    /// A Lark grammar (llguidance's dialect: `start` is the start rule).
    Lark(String),
    /// A regular expression the whole answer matches.
    Regex(String),
}

/// A grammar that cannot be compiled, a format that cannot be parsed, or a tokenizer the
/// token trie cannot be built from. The message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

fn err(msg: impl Into<String>) -> GrammarError {
    GrammarError(msg.into())
}

/// llguidance's JSON layout options, unless the schema brings its own (`x-guidance`).
pub(crate) fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Format {
    /// OpenAI's `response_format`; `None` for `{"type": "text"}` (no constraint).
    pub fn from_response_format(v: &Value) -> Result<Option<Format>, GrammarError> {
        let o = v.as_object().ok_or_else(|| {
            err(format!(
                "response_format: expected an object, got {}",
                crate::transport::type_name(v)
            ))
        })?;
        let kind = o.get("type").and_then(Value::as_str).ok_or_else(|| {
            err("response_format: \"type\" (text, json_object or json_schema) is missing")
        })?;
        let allowed: &[&str] = match kind {
            "text" | "json_object" => &["type"],
            "json_schema" => &["type", "json_schema"],
            other => {
                return Err(err(format!(
                    "response_format: type {other:?}: expected text, json_object or json_schema"
                )));
            }
        };
        if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(err(format!(
                "response_format: unknown field {k:?} for type {kind}"
            )));
        }
        Ok(match kind {
            "text" => None,
            "json_object" => Some(Format::JsonObject),
            _ => {
                let js = o
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        err("response_format: json_schema: expected an object with \"name\" and \"schema\"")
                    })?;
                if let Some(k) = js
                    .keys()
                    .find(|k| !["name", "schema", "strict", "description"].contains(&k.as_str()))
                {
                    return Err(err(format!(
                        "response_format: json_schema: unknown field {k:?} (known: name, \
                         schema, strict, description)"
                    )));
                }
                let name = match js.get("name") {
                    Some(Value::String(n))
                        if (1..=64).contains(&n.len())
                            && n.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                    {
                        n.clone()
                    }
                    Some(_) => {
                        return Err(err(
                            "response_format: json_schema.name: 1 to 64 letters, digits, _ or -",
                        ));
                    }
                    None => return Err(err("response_format: json_schema.name is missing")),
                };
                if let Some(s) = js.get("strict")
                    && !s.is_boolean()
                {
                    return Err(err(
                        "response_format: json_schema.strict: expected a boolean",
                    ));
                }
                let schema = match js.get("schema") {
                    Some(s @ (Value::Object(_) | Value::Bool(true))) => s.clone(),
                    Some(_) => {
                        return Err(err(
                            "response_format: json_schema.schema: expected a JSON schema object",
                        ));
                    }
                    None => return Err(err("response_format: json_schema.schema is missing")),
                };
                Some(Format::JsonSchema { name, schema })
            }
        })
    }

    /// Our extension: `{"type": "lark" | "regex", "value": "..."}`.
    pub fn from_grammar(v: &Value) -> Result<Format, GrammarError> {
        let o = v.as_object().ok_or_else(|| {
            err(format!(
                "grammar: expected an object {{\"type\": \"lark\" or \"regex\", \"value\": ...}}, got {}",
                crate::transport::type_name(v)
            ))
        })?;
        if let Some(k) = o.keys().find(|k| !["type", "value"].contains(&k.as_str())) {
            return Err(err(format!(
                "grammar: unknown field {k:?} (known: type, value)"
            )));
        }
        let value = match o.get("value") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(err("grammar: value is empty")),
            Some(other) => {
                return Err(err(format!(
                    "grammar: value: expected a string, got {}",
                    crate::transport::type_name(other)
                )));
            }
            None => return Err(err("grammar: value is missing")),
        };
        match o.get("type").and_then(Value::as_str) {
            Some("lark") => Ok(Format::Lark(value)),
            Some("regex") => Ok(Format::Regex(value)),
            Some(other) => Err(err(format!(
                "grammar: type {other:?}: expected lark or regex"
            ))),
            None => Err(err("grammar: type (lark or regex) is missing")),
        }
    }

    /// The field a request named it with, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            Format::JsonObject | Format::JsonSchema { .. } => "response_format",
            Format::Lark(_) | Format::Regex(_) => "grammar",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        let with_layout = |mut schema: Value| {
            if let Value::Object(o) = &mut schema
                && !o.contains_key("x-guidance")
            {
                o.insert("x-guidance".into(), json_layout());
            }
            schema
        };
        match self {
            Format::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"})))
            }
            Format::JsonSchema { schema, .. } => {
                let schema = match schema {
                    Value::Bool(true) => json!({}),
                    s => s.clone(),
                };
                TopLevelGrammar::from_json_schema(with_layout(schema))
            }
            Format::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Format::Regex(r) => TopLevelGrammar::from_regex(r),
        }
    }
}

/// The tokenizer as llguidance sees it: the trie of every token's bytes, and the model's own
/// tokenizer for text a grammar forces.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Whether `tokenizers` encodes text in the middle of an answer as the model would
    /// (byte-level BPE: yes; SentencePiece adds a leading `▁`: no, so the trie's greedy
    /// tokenization is used, as llguidance does for such tokenizers).
    canonical: bool,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) if self.canonical => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            _ => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// A model's structured-output state: the token trie and llguidance's parser factory.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// For `tokenizer` with `vocab` logits per step (the model's vocabulary, padding
    /// included) and end-of-sequence ids `eos` (allowed wherever the grammar may end).
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: &[u32]) -> Result<Self, GrammarError> {
        let words = tokenizer.token_bytes(vocab).ok_or_else(|| {
            err(
                "structured output needs a tokenizer whose decoder is byte-level BPE or \
                 SentencePiece (this package's is neither)",
            )
        })?;
        let &first_eos = eos
            .first()
            .ok_or_else(|| err("structured output needs an end-of-sequence token"))?;
        let info = TokRxInfo::new(vocab as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let tokenizer = tokenizer.shared();
        // Canonical when tokenizing a piece of JSON gives back its bytes exactly.
        let probe = " {\"a\": [1, \"b\"]}";
        let canonical = tokenizer
            .encode(probe, false)
            .is_ok_and(|e| trie.decode(e.get_ids()) == probe.as_bytes());
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer,
            canonical,
        });
        let caps = InferenceCapabilities {
            ff_tokens: true,
            ..InferenceCapabilities::default()
        };
        let slices = llguidance::earley::SlicedBiasComputer::general_slices();
        let mut factory = ParserFactory::new(&env, caps, &slices)
            .map_err(|e| err(format!("structured output: {e}")))?;
        // Errors come back to the request; nothing on the daemon's stderr.
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles `format`; an error names what is wrong with it (prefixed with its field).
    pub fn compile(&self, format: &Format) -> Result<Grammar, GrammarError> {
        let parser = self
            .factory
            .create_parser(format.top_level())
            .map_err(|e| err(format!("{}: {e}", format.field())))?;
        Ok(Grammar {
            parser: Arc::new(parser),
        })
    }

    /// Tokens in the trie (the model's vocabulary, padding included).
    /// Compiles a grammar edgellm wrote itself (tool calls); `field` names the request field
    /// an error is about.
    pub fn compile_lark(&self, lark: &str, field: &str) -> Result<Grammar, GrammarError> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(lark.to_string()))
            .map_err(|e| err(format!("{field}: {e}")))?;
        Ok(Grammar {
            parser: Arc::new(parser),
        })
    }

    pub fn vocab(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }
}

/// A compiled format, ready to constrain any number of sequences.
#[derive(Clone)]
pub struct Grammar {
    parser: Arc<TokenParser>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

/// One sequence's constraint: the parser state, this step's mask, and what it cost.
pub struct Constraint {
    matcher: Matcher,
    mask: SimpleVob,
    /// Time spent computing masks and forced tokens.
    pub time: Duration,
    /// Tokens the grammar forced (taken without sampling).
    pub forced: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("time", &self.time)
            .field("forced", &self.forced)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    pub fn new(grammar: &Grammar) -> Self {
        Constraint {
            matcher: Matcher::new(Ok((*grammar.parser).clone())),
            mask: SimpleVob::new(),
            time: Duration::ZERO,
            forced: 0,
        }
    }

    /// The tokens allowed next, as a bit set (bit `id % 32` of word `id / 32`).
    pub fn mask(&mut self) -> Result<&[u32], GrammarError> {
        let t = Instant::now();
        let mask = self.matcher.compute_mask();
        self.time += t.elapsed();
        self.mask = mask.map_err(|e| err(format!("structured output: {e}")))?;
        Ok(self.mask.as_slice())
    }

    /// Takes the sampled `token` and appends to `forced` the tokens the grammar now forces
    /// (consumed as well: the caller emits them as if sampled).
    pub fn commit(&mut self, token: u32, forced: &mut Vec<u32>) -> Result<(), GrammarError> {
        self.consume(&[token], forced)
    }

    /// Feeds tokens the model wrote before this grammar took over (the opening of a tool
    /// call), and appends the tokens the grammar forces after them to `forced`.
    pub fn consume(&mut self, tokens: &[u32], forced: &mut Vec<u32>) -> Result<(), GrammarError> {
        let t = Instant::now();
        let result = self.matcher.consume_tokens(tokens).map(|()| {
            if !self.matcher.is_stopped() {
                let ff = self.matcher.consume_ff_tokens();
                self.forced += ff.len();
                forced.extend_from_slice(&ff);
            }
        });
        self.time += t.elapsed();
        result.map_err(|e| err(format!("structured output: {e}")))?;
        match self.matcher.get_error() {
            Some(e) => Err(err(format!("structured output: {e}"))),
            None => Ok(()),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_format_is_parsed_and_checked() {
        let f = |s: &str| Format::from_response_format(&serde_json::from_str(s).unwrap());
        assert_eq!(f(r#"{"type":"text"}"#), Ok(None));
        assert_eq!(f(r#"{"type":"json_object"}"#), Ok(Some(Format::JsonObject)));
        let schema = f(
            r#"{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"},"strict":true}}"#,
        );
        assert!(matches!(schema, Ok(Some(Format::JsonSchema { .. }))));
        let e = |s: &str| f(s).unwrap_err().0;
        assert!(e(r#"{"type":"xml"}"#).contains("xml"));
        assert!(e(r#"{}"#).contains("type"));
        assert!(e(r#"{"type":"json_schema"}"#).contains("json_schema"));
        assert!(e(r#"{"type":"json_schema","json_schema":{"schema":{}}}"#).contains("name"));
        assert!(
            e(r#"{"type":"json_schema","json_schema":{"name":"a b","schema":{}}}"#)
                .contains("name")
        );
        assert!(
            e(r#"{"type":"json_schema","json_schema":{"name":"a","schema":3}}"#).contains("schema")
        );
        assert!(e(r#"{"type":"json_object","schema":{}}"#).contains("\"schema\""));
    }

    #[test]
    fn grammar_is_parsed_and_checked() {
        let f = |s: &str| Format::from_grammar(&serde_json::from_str(s).unwrap());
        assert_eq!(
            f(r#"{"type":"regex","value":"[a-z]+"}"#),
            Ok(Format::Regex("[a-z]+".into()))
        );
        assert_eq!(
            f(r#"{"type":"lark","value":"start: \"a\""}"#),
            Ok(Format::Lark("start: \"a\"".into()))
        );
        assert!(
            f(r#"{"type":"gbnf","value":"x"}"#)
                .unwrap_err()
                .0
                .contains("gbnf")
        );
        assert!(f(r#"{"type":"regex"}"#).unwrap_err().0.contains("value"));
        assert!(
            f(r#"{"type":"regex","value":""}"#)
                .unwrap_err()
                .0
                .contains("empty")
        );
        assert!(f(r#""x""#).unwrap_err().0.contains("object"));
    }
}
