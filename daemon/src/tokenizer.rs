//! Text <-> token ids, as transformers does it: Hugging Face `tokenizers` on the package's
//! `tokenizer.json`, with `tokenizer_config.json` supplying the special tokens and chat
//! template. [`Detokenizer`] turns a growing id sequence into text deltas that never end in
//! half a UTF-8 character.
//!
//! Sits between the scheduler (prompt -> ids) and the engine (ids -> streamed text).
//!
//! Decoding in the decode loop allocates nothing: for the decoders language models ship
//! (GPT-2's `ByteLevel`; SentencePiece's `Replace ▁`, `ByteFallback`, `Fuse`, `Strip`) the
//! text of a generated sequence is the concatenation of each token's bytes, read as UTF-8
//! (`from_utf8_lossy`), so [`Pieces`] holds every token's bytes once, computed at load, and the
//! detokenizer appends them to the caller's buffer, keeping the (at most three) bytes of an
//! unfinished character in a fixed-capacity buffer. Another decoder falls back to decoding a
//! short window of ids with `tokenizers` (which allocates) on every token. The one difference
//! from `tokenizers`, on output that is not UTF-8 at all: `ByteFallback` replaces each byte of
//! an invalid byte-token run with U+FFFD, where the table (as `ByteLevel` does) replaces each
//! maximal invalid sequence once.

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
    /// Shared with the structured-output tokenizer environment ([`crate::grammar`]).
    inner: std::sync::Arc<tokenizers::Tokenizer>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The model's Jinja chat template (`chat_template.jinja` wins over tokenizer_config.json).
    pub chat_template: Option<String>,
    bos_id: Option<u32>,
    /// tokenizer_config.json's `add_bos_token`, which transformers applies on top of the
    /// post-processor of tokenizer.json.
    add_bos: Option<bool>,
    max_token_bytes: usize,
    /// Every token's bytes, when the decoder is one [`Pieces`] reproduces.
    pieces: Option<Pieces>,
}

/// Each token's bytes as the package's decoder produces them (special tokens: none, as with
/// `skip_special_tokens`), in one buffer.
#[derive(Debug)]
struct Pieces {
    bytes: Vec<u8>,
    /// `bytes[offsets[id]..offsets[id + 1]]` is token `id`'s.
    offsets: Vec<u32>,
    /// SentencePiece's `Strip` decoder: the text's first space is dropped.
    strip_first_space: bool,
    longest: usize,
}

/// The decoders [`Pieces`] reproduces.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PieceRule {
    /// GPT-2's byte-to-unicode alphabet, read back into bytes.
    ByteLevel,
    /// `▁` -> space, `<0xXX>` -> that byte; `strip`: then one leading space dropped.
    SentencePiece { strip: bool },
}

impl PieceRule {
    /// The rule of a `tokenizer.json` `decoder`, if it is one of the known shapes.
    fn of(decoder: &Value) -> Option<PieceRule> {
        let kind = |d: &Value| d.get("type").and_then(Value::as_str).map(str::to_owned);
        match kind(decoder)?.as_str() {
            "ByteLevel" => Some(PieceRule::ByteLevel),
            "Sequence" => {
                let steps = decoder.get("decoders")?.as_array()?;
                let replaces_metaspace = |d: &Value| {
                    kind(d).as_deref() == Some("Replace")
                        && d.pointer("/pattern/String").and_then(Value::as_str) == Some("\u{2581}")
                        && d.get("content").and_then(Value::as_str) == Some(" ")
                };
                let strips_one_space = |d: &Value| {
                    kind(d).as_deref() == Some("Strip")
                        && d.get("content").and_then(Value::as_str) == Some(" ")
                        && d.get("start").and_then(Value::as_u64) == Some(1)
                        && d.get("stop").and_then(Value::as_u64) == Some(0)
                };
                match steps.as_slice() {
                    [r, b, f] | [r, b, f, _]
                        if replaces_metaspace(r)
                            && kind(b).as_deref() == Some("ByteFallback")
                            && kind(f).as_deref() == Some("Fuse") =>
                    {
                        match steps.get(3) {
                            None => Some(PieceRule::SentencePiece { strip: false }),
                            Some(s) if strips_one_space(s) => {
                                Some(PieceRule::SentencePiece { strip: true })
                            }
                            Some(_) => None,
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The bytes the decoder makes of one token's spelling (`alphabet`: [`byte_level_alphabet`]).
    fn bytes(self, token: &str, alphabet: &[Option<u8>], out: &mut Vec<u8>) {
        match self {
            PieceRule::ByteLevel => {
                let start = out.len();
                for c in token.chars() {
                    match alphabet.get(c as usize).copied().flatten() {
                        Some(b) => out.push(b),
                        None => {
                            // As `tokenizers` does: a spelling outside the alphabet stays as it is.
                            out.truncate(start);
                            out.extend_from_slice(token.as_bytes());
                            return;
                        }
                    }
                }
            }
            PieceRule::SentencePiece { .. } => {
                let hex = token
                    .strip_prefix("<0x")
                    .and_then(|t| t.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(token.replace('\u{2581}', " ").as_bytes()),
                }
            }
        }
    }
}

/// GPT-2's `bytes_to_unicode`, inverted and indexed by code point: printable Latin-1 bytes
/// stand for themselves, the other 68 bytes for U+0100.. in byte order.
fn byte_level_alphabet() -> Vec<Option<u8>> {
    let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = vec![None; 0x100 + 68];
    let mut next = 0x100;
    for b in 0..=255u8 {
        if printable(b) {
            table[usize::from(b)] = Some(b);
        } else {
            table[next] = Some(b);
            next += 1;
        }
    }
    table
}

impl Pieces {
    fn build(inner: &tokenizers::Tokenizer, rule: PieceRule) -> Pieces {
        let n = inner.get_vocab_size(true);
        let special: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        let mut longest = 0;
        let alphabet = byte_level_alphabet();
        for id in 0..n as u32 {
            let start = bytes.len();
            if !special.contains(&id)
                && let Some(token) = inner.id_to_token(id)
            {
                rule.bytes(&token, &alphabet, &mut bytes);
            }
            longest = longest.max(bytes.len() - start);
            offsets.push(bytes.len() as u32);
        }
        Pieces {
            bytes,
            offsets,
            strip_first_space: rule == PieceRule::SentencePiece { strip: true },
            longest,
        }
    }

    fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            // Ids past the vocabulary (padded embedding rows) decode to nothing, as in
            // `tokenizers`.
            _ => &[],
        }
    }
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
        let inner = std::sync::Arc::new(
            tokenizers::Tokenizer::from_file(&path).map_err(|e| load_err(&path, e.to_string()))?,
        );
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
        let pieces = inner
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .as_ref()
            .and_then(PieceRule::of)
            .map(|rule| Pieces::build(&inner, rule));
        Ok(Tokenizer {
            pieces,
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

    /// Whether detokenizing reads the per-token byte table (allocation-free), not `tokenizers`.
    pub fn has_piece_table(&self) -> bool {
        self.pieces.is_some()
    }

    /// The most bytes of text one [`Detokenizer::push`] can append: every byte of the longest
    /// token and of a held-back character, each possibly replaced by U+FFFD (3 bytes).
    pub fn max_piece_text(&self) -> usize {
        let longest = self
            .pieces
            .as_ref()
            .map_or(self.max_token_bytes, |p| p.longest);
        3 * (longest + 4)
    }

    /// The ids of the added tokens (special or not): what the text is split at before the
    /// model's own tokenization, so what comes after one never merges with what came before.
    pub fn added_ids(&self) -> Vec<u32> {
        self.inner.get_added_tokens_decoder().into_keys().collect()
    }

    /// Every token's bytes (`ids` up to `vocab`, which may exceed the tokenizer's own
    /// vocabulary: padded rows are empty), special tokens as llguidance marks them (`0xFF`
    /// then their text, so no grammar's text can spell them); `None` when the decoder is not
    /// one the byte table reproduces. For [`crate::grammar`]'s token trie.
    pub fn token_bytes(&self, vocab: usize) -> Option<Vec<Vec<u8>>> {
        let pieces = self.pieces.as_ref()?;
        let mut words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| pieces.get(id).to_vec())
            .collect();
        for (id, t) in self.inner.get_added_tokens_decoder() {
            if let Some(w) = words.get_mut(id as usize)
                && t.special
            {
                w.clear();
                w.push(0xFF);
                w.extend_from_slice(t.content.as_bytes());
            }
        }
        Some(words)
    }

    /// The `tokenizers` tokenizer itself, shared (structured output tokenizes the text a
    /// grammar forces with it).
    pub(crate) fn shared(&self) -> std::sync::Arc<tokenizers::Tokenizer> {
        self.inner.clone()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Incremental detokenization: appends the text each generated id completes, never half a
/// UTF-8 character; special tokens are skipped. With the tokenizer's byte table ([`Pieces`])
/// it allocates nothing: a token's bytes join the held-back bytes of an unfinished character
/// (at most three, in a fixed buffer) in a scratch buffer sized once, for the longest token.
/// Otherwise it decodes a window of ids with `tokenizers` (the prefix/read-offset scheme of TGI
/// and vLLM: text past the previous decode is emitted once it no longer ends in U+FFFD).
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Bytes of a character not finished yet.
    pending: heapless::Vec<u8, 4>,
    /// Some byte has been read (SentencePiece drops the text's first space only).
    started: bool,
    scratch: Vec<u8>,
    /// The `tokenizers` fallback: ids and the window's offsets.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// A detokenizer for `tok`'s tokens, its buffers sized once.
    pub fn new(tok: &Tokenizer) -> Self {
        let scratch = match &tok.pieces {
            Some(p) => Vec::with_capacity(p.longest + 4),
            None => Vec::new(),
        };
        Detokenizer {
            scratch,
            ..Self::default()
        }
    }

    /// Starts over (a new message), keeping the buffers.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.started = false;
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
    }

    /// Adds one generated id; appends the text it completes (possibly none) to `out`.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        out: &mut String,
    ) -> Result<(), TokenizerError> {
        let Some(pieces) = &tok.pieces else {
            return self.push_window(tok, id, out);
        };
        let mut piece = pieces.get(id);
        if piece.is_empty() {
            return Ok(());
        }
        if !self.started {
            self.started = true;
            if pieces.strip_first_space && piece[0] == b' ' {
                piece = &piece[1..];
            }
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.pending);
        self.scratch.extend_from_slice(piece);
        self.pending.clear();
        let mut chunks = self.scratch.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            out.push_str(chunk.valid());
            let bad = chunk.invalid();
            if bad.is_empty() {
                continue;
            }
            let unfinished = chunks.peek().is_none()
                && std::str::from_utf8(bad).is_err_and(|e| e.error_len().is_none());
            if unfinished {
                // At most three bytes: a longer prefix would be a whole character.
                let _ = self.pending.extend_from_slice(bad);
            } else {
                out.push(char::REPLACEMENT_CHARACTER);
            }
        }
        Ok(())
    }

    /// End of generation: appends what is held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer, out: &mut String) -> Result<(), TokenizerError> {
        if tok.pieces.is_none() {
            let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
            let now = tok.decode(&self.ids[self.prefix..], true)?;
            self.prefix = self.ids.len();
            self.read = self.ids.len();
            out.push_str(now.get(before.len()..).unwrap_or_default());
        } else if !self.pending.is_empty() {
            self.pending.clear();
            out.push(char::REPLACEMENT_CHARACTER);
        }
        Ok(())
    }

    fn push_window(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        out: &mut String,
    ) -> Result<(), TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(());
        }
        match now.strip_prefix(before.as_str()) {
            Some(d) => out.push_str(d),
            // The decoder rewrote earlier text (rare: e.g. cleanup of spaces); emit the part
            // after the common prefix at a character boundary.
            None => {
                let common = before
                    .char_indices()
                    .zip(now.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                out.push_str(&now[common..]);
            }
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(())
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
        let mut d = Detokenizer::new(&tok);
        let mut deltas = Vec::new();
        for &id in &ids {
            let mut delta = String::new();
            d.push(&tok, id, &mut delta).unwrap();
            deltas.push(delta);
        }
        let mut tail = String::new();
        d.finish(&tok, &mut tail).unwrap();
        deltas.push(tail);
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
        let mut d = Detokenizer::new(&tok);
        let mut text = String::new();
        d.push(&tok, ids[0], &mut text).unwrap();
        assert_eq!(text, "");
        d.finish(&tok, &mut text).unwrap();
        assert_eq!(text, "\u{FFFD}");
    }

    /// Streams `ids` through a detokenizer; the pieces and their concatenation.
    fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut d = Detokenizer::new(tok);
        let mut text = String::new();
        for &id in ids {
            d.push(tok, id, &mut text).unwrap();
        }
        d.finish(tok, &mut text).unwrap();
        text
    }

    /// The byte table gives what `tokenizers` decodes, for real text and for random ids (whose
    /// bytes are mostly not UTF-8: replacement characters in the same places).
    #[test]
    fn the_byte_table_decodes_as_tokenizers_does() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for name in ["qwen2", "gptoss", "phi3"] {
            let tok = Tokenizer::load(&root.join(name).join("checkpoint")).unwrap();
            assert!(tok.has_piece_table(), "{name}: ByteLevel has a table");
            let ids = tok
                .encode("Café naïve — 日本語 👩‍💻 ok\n\tdone", false)
                .unwrap();
            assert_eq!(
                stream(&tok, &ids),
                tok.decode(&ids, true).unwrap(),
                "{name}"
            );
            let vocab = tok.inner.get_vocab_size(true) as u64;
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            for _ in 0..20 {
                let ids: Vec<u32> = (0..64)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % (vocab + 3)) as u32 // a few ids past the vocabulary too
                    })
                    .collect();
                assert_eq!(
                    stream(&tok, &ids),
                    tok.decode(&ids, true).unwrap(),
                    "{name}: {ids:?}"
                );
            }
        }
    }

    /// A SentencePiece vocabulary (byte fallback, `▁` for spaces, the first space stripped),
    /// as Llama 2, Mistral and GGUF SPM imports have.
    #[test]
    fn sentencepiece_pieces_decode_as_tokenizers_does() {
        let mut vocab = serde_json::Map::new();
        for (i, t) in [
            "<unk>",
            "<s>",
            "\u{2581}Hello",
            "\u{2581}world",
            "!",
            "\u{2581}",
        ]
        .iter()
        .enumerate()
        {
            vocab.insert(t.to_string(), i.into());
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (6 + b).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let tok = Tokenizer::load(dir.path()).unwrap();
        assert!(tok.has_piece_table());
        // "日" is E6 97 A5; "é" is C3 A9.
        let byte = |b: u32| 6 + b;
        let cases: [&[u32]; 4] = [
            &[2, 3, 4],
            &[1, 2, byte(0xE6), byte(0x97), byte(0xA5), 3],
            &[5, 2, byte(0xC3), byte(0xA9)],
            &[byte(0x20), 2, 1, 3],
        ];
        for ids in cases {
            assert_eq!(stream(&tok, ids), tok.decode(ids, true).unwrap(), "{ids:?}");
        }
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
