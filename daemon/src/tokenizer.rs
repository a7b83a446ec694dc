//! Text <-> token ids, as transformers does it: Hugging Face `tokenizers` on the package's
//! `tokenizer.json`, with `tokenizer_config.json` supplying the special tokens and chat
//! template. [`Detokenizer`] turns a growing id sequence into text deltas that never end in
//! half a UTF-8 character.
//!
//! Sits between the scheduler (prompt -> ids) and the engine (ids -> streamed text).

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Codec(String),
}

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The model's Jinja chat template (`chat_template.jinja` wins over tokenizer_config.json).
    pub chat_template: Option<String>,
    bos_id: Option<u32>,
    /// tokenizer_config.json's `add_bos_token`, which transformers applies on top of the
    /// post-processor of tokenizer.json.
    add_bos: Option<bool>,
    max_token_bytes: usize,
}

/// A special-token entry: a plain string or an AddedToken object `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required) and `tokenizer_config.json` / `chat_template.jinja`
    /// (optional) from a package or checkpoint folder.
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let load_err = |path: &Path, msg: String| TokenizerError::Load {
            path: path.to_path_buf(),
            msg,
        };
        if !path.exists() {
            return Err(load_err(&path, "missing (a model package needs it)".into()));
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| load_err(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| load_err(&cfg_path, e.to_string()))?
            }
            Err(_) => Value::Null,
        };
        let template_file = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&template_file) {
            Ok(t) => Some(t),
            Err(_) => match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: transformers uses "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        let bos_token = token_text(cfg.get("bos_token"));
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        Ok(Tokenizer {
            max_token_bytes,
            bos_token,
            eos_token: token_text(cfg.get("eos_token")),
            chat_template,
            bos_id,
            add_bos: cfg.get("add_bos_token").and_then(|v| v.as_bool()),
            inner,
        })
    }

    /// `tokenizer(text)` (`add_special_tokens = true`: BOS and the post-processor as
    /// transformers applies them), or a plain encoding of already-templated text (`false`, what
    /// `apply_chat_template(tokenize=True)` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && let Some(bos) = self.bos_id {
            match self.add_bos {
                Some(true) if ids.first() != Some(&bos) => ids.insert(0, bos),
                Some(false)
                    if ids.first() == Some(&bos)
                        && !text.starts_with(self.bos_token.as_deref().unwrap_or("")) =>
                {
                    ids.remove(0);
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// The id [`Tokenizer::encode`]`(text, true)` puts before the text's own tokens (the BOS of
    /// `add_bos_token` or of tokenizer.json's post-processor), if it adds one: llama.cpp's
    /// `add_bos`, which `edgellm perplexity` uses to start every window with it.
    pub fn added_bos(&self) -> Result<Option<u32>, TokenizerError> {
        // Any text shows it: the rule does not depend on the text (beyond a text that itself
        // starts with the BOS string, which a one-letter probe does not).
        let probe = "a";
        let with = self.encode(probe, true)?;
        let plain = self.encode(probe, false)?;
        Ok(match with.split_first() {
            Some((&first, rest)) if rest == plain.as_slice() => Some(first),
            _ => None,
        })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The longest token of the vocabulary, in bytes of its spelling (for byte-level
    /// vocabularies that spelling is longer than the text it stands for, so this is an upper
    /// bound on the text one token covers).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// The ids of the added tokens (special or not): what the text is split at before the
    /// model's own tokenization, so what comes after one never merges with what came before.
    pub fn added_ids(&self) -> Vec<u32> {
        self.inner.get_added_tokens_decoder().into_keys().collect()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Incremental detokenization (the prefix/read-offset scheme of TGI and vLLM): each new id is
/// decoded together with a few ids before it, and only text past the previous decode is
/// emitted, once it no longer ends in U+FFFD (an incomplete UTF-8 sequence that later bytes
/// will complete). Special tokens are skipped.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one generated id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = match now.strip_prefix(before.as_str()) {
            Some(d) => d.to_string(),
            // The decoder rewrote earlier text (rare: e.g. cleanup of spaces); emit the part
            // after the common prefix at a character boundary.
            None => {
                let common = before
                    .char_indices()
                    .zip(now.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                now[common..].to_string()
            }
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// Text still held back at the end of generation (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures' byte-level BPE: characters outside ASCII span several tokens.
    fn fixture_tokenizer() -> Tokenizer {
        Tokenizer::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2/checkpoint"),
        )
        .unwrap()
    }

    #[test]
    fn incremental_detokenization_never_emits_half_a_character() {
        let tok = fixture_tokenizer();
        let text = "Café naïve — 日本語 👩‍💻 ok";
        let ids = tok.encode(text, false).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "multi-byte characters should span tokens"
        );
        let mut d = Detokenizer::new();
        let mut deltas = Vec::new();
        for &id in &ids {
            deltas.push(d.push(&tok, id).unwrap());
        }
        deltas.push(d.finish(&tok).unwrap());
        for delta in &deltas {
            assert!(
                !delta.contains('\u{FFFD}'),
                "delta {delta:?} carries a broken character"
            );
        }
        assert_eq!(deltas.concat(), text);
        // Some tokens completed no character and were held back.
        assert!(deltas.iter().filter(|d| d.is_empty()).count() > 0);
    }

    #[test]
    fn an_incomplete_character_is_held_until_the_end() {
        let tok = fixture_tokenizer();
        let ids = tok.encode("日", false).unwrap();
        assert!(ids.len() > 1);
        let mut d = Detokenizer::new();
        assert_eq!(d.push(&tok, ids[0]).unwrap(), "");
        assert_eq!(d.finish(&tok).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn raw_encoding_adds_bos_as_transformers_does() {
        let tok = fixture_tokenizer();
        // tests/fixtures/qwen2/golden.json: tokenizer("The quick brown fox")
        assert_eq!(
            tok.encode("The quick brown fox", true).unwrap(),
            vec![1, 293, 328, 426, 329]
        );
        assert_eq!(
            tok.encode("The quick brown fox", false).unwrap(),
            vec![293, 328, 426, 329]
        );
        assert_eq!(tok.added_bos().unwrap(), Some(1));
    }

    /// Without the post-processor's BOS, `add_bos_token` alone decides.
    #[test]
    fn added_bos_follows_the_post_processor_and_add_bos_token() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2/checkpoint");
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
                .unwrap();
        json["post_processor"] = Value::Null;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let config = |add_bos: Option<bool>| {
            let mut c = serde_json::json!({"bos_token": "<s>"});
            if let Some(b) = add_bos {
                c["add_bos_token"] = b.into();
            }
            std::fs::write(dir.path().join("tokenizer_config.json"), c.to_string()).unwrap();
            Tokenizer::load(dir.path()).unwrap().added_bos().unwrap()
        };
        assert_eq!(config(None), None);
        assert_eq!(config(Some(false)), None);
        assert_eq!(config(Some(true)), Some(1));
    }
}
