//! GGUF tokenizer metadata -> Hugging Face `tokenizer.json`, `tokenizer_config.json` and
//! `chat_template.jinja`, the files the daemon's tokenizer and chat template read.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE with merges), the vocabularies of
//! Llama 3, Qwen2/2.5/3, SmolLM and GPT-2-style models. GGUF stores only the *name* of the
//! pre-tokenizer (`tokenizer.ggml.pre`); llama.cpp maps each name to its split rules in
//! `src/llama-vocab.cpp`, and so does [`pre_tokenizer`]: a name it does not know is refused
//! rather than tokenized with the wrong rules. SentencePiece-style `llama` vocabularies (scores,
//! byte fallback) are refused for now, naming what is supported.
//!
//! Token types (llama.cpp's `llama_token_type`): 3 = control and 4 = user-defined tokens become
//! Hugging Face added tokens (special for control tokens), matched whole in the input text as
//! transformers and llama.cpp both do.

use serde_json::{Map, Value as Json, json};

use super::{Gguf, Value};

type Res<T> = std::result::Result<T, String>;

/// `tokenizer.ggml.pre` names we can express, and their Hugging Face pre-tokenizer.
pub const SUPPORTED_PRE: &str =
    "default, gpt2, gpt-2, smollm, llama-bpe, llama3, llama-v3, qwen2, deepseek-r1-qwen";

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The Hugging Face pre-tokenizer of a llama.cpp pre-tokenizer name.
fn pre_tokenizer(name: &str) -> Res<Json> {
    Ok(match name {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // SmolLM: every digit on its own, then GPT-2's rules.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT),
            byte_level(false),
        ]}),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT),
            byte_level(false),
        ]}),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not supported; supported: {SUPPORTED_PRE}"
            ));
        }
    })
}

/// The tokenizer files of a package, built from the metadata.
pub struct TokenizerFiles {
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub chat_template: Option<String>,
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Res<Vec<&'a str>> {
    let arr = g
        .get(key)
        .ok_or_else(|| format!("metadata {key} is missing"))?
        .as_array()
        .ok_or_else(|| format!("metadata {key} is not an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| format!("metadata {key}[{i}] is not a string"))
        })
        .collect()
}

pub fn tokenizer_files(g: &Gguf) -> Res<TokenizerFiles> {
    let model = g
        .str("tokenizer.ggml.model")
        .ok_or("metadata tokenizer.ggml.model is missing (the file has no tokenizer)")?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model {model:?} is not supported yet (only \"gpt2\", byte-level BPE)"
        ));
    }
    let pre = g.str("tokenizer.ggml.pre").unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(pre)?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .ok_or("tokenizer.ggml.token_type is not an array")?
            .iter()
            .map(|t| {
                t.as_u64()
                    .ok_or_else(|| "tokenizer.ggml.token_type holds a non-integer".to_string())
            })
            .collect::<Res<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(format!(
                "tokenizer.ggml.tokens: token {tok:?} appears twice"
            ));
        }
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m
                .split_once(' ')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
                .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] {m:?} is not \"a b\""))?;
            if !vocab.contains_key(a) || !vocab.contains_key(b) {
                return Err(format!(
                    "tokenizer.ggml.merges[{i}] {m:?} names a token that is not in the vocabulary"
                ));
            }
            Ok(json!([a, b]))
        })
        .collect::<Res<Vec<_>>>()?;
    let token = |key: &str| -> Res<Option<(u64, &str)>> {
        match g
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(Value::as_u64)
        {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some((id, *t)))
                .ok_or_else(|| format!("tokenizer.ggml.{key} {id} is outside the vocabulary")),
        }
    };
    let bos = token("bos_token_id")?;
    let eos = token("eos_token_id")?;
    let pad = token("padding_token_id")?;
    let unk = token("unknown_token_id")?;
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let add_eos = g
        .get("tokenizer.ggml.add_eos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if add_eos {
        return Err("tokenizer.ggml.add_eos_token = true is not supported".into());
    }
    let post_processor = match (add_bos, bos) {
        (true, Some((id, t))) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}},
        }),
        (true, None) => return Err("add_bos_token is true but bos_token_id is missing".into()),
        (false, _) => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk.map(|(_, t)| t),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let chat_template = g.str("tokenizer.chat_template").map(str::to_string);
    let tokenizer_config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "bos_token": bos.map(|(_, t)| t),
        "eos_token": eos.map(|(_, t)| t),
        "pad_token": pad.map(|(_, t)| t),
        "unk_token": unk.map(|(_, t)| t),
        "model_max_length": g
            .get(&format!("{}.context_length", g.str("general.architecture").unwrap_or("")))
            .and_then(Value::as_u64),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "gguf_pre_tokenizer": pre,
    });
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config,
        chat_template,
    })
}
