//! GGUF tokenizer metadata -> Hugging Face `tokenizer.json`, `tokenizer_config.json` and
//! `chat_template.jinja`, the files the daemon's tokenizer and chat template read.
//!
//! Supported:
//! * `tokenizer.ggml.model = gpt2` (byte-level BPE with merges), the vocabularies of Llama 3,
//!   Qwen2/2.5/3, SmolLM, gpt-oss (o200k) and GPT-2-style models. GGUF stores only the *name*
//!   of the pre-tokenizer (`tokenizer.ggml.pre`); llama.cpp maps each name to its split rules in
//!   `src/llama-vocab.cpp`, and so does [`pre_tokenizer`]: a name it does not know is refused
//!   rather than tokenized with the wrong rules.
//! * `tokenizer.ggml.model = llama`: SentencePiece BPE (Llama 2, Mistral 7B, TinyLlama, Phi-3),
//!   tokens with scores and `<0xXX>` byte tokens, usually without merges. The merges are derived
//!   from the scores ([`spm_merges`]), the whitespace rules are llama.cpp's ([`spm_text_rules`]).
//!
//! Token types (llama.cpp's `llama_token_type`): 3 = control and 4 = user-defined tokens become
//! Hugging Face added tokens (special for control tokens), matched whole in the input text as
//! transformers and llama.cpp both do.

use serde_json::{Map, Value as Json, json};

use super::{Gguf, Value};

type Res<T> = std::result::Result<T, String>;

/// `tokenizer.ggml.pre` names we can express, and their Hugging Face pre-tokenizer.
pub const SUPPORTED_PRE: &str =
    "default, gpt2, gpt-2, smollm, llama-bpe, llama3, llama-v3, qwen2, deepseek-r1-qwen, gpt-4o";

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// o200k (gpt-oss, GPT-4o): llama.cpp's `LLAMA_VOCAB_PRE_TYPE_GPT4O`.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
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
        "gpt-4o" => json!({"type": "Sequence", "pretokenizers": [
            split(GPT4O_SPLIT),
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
#[derive(Debug)]
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
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(format!(
                "tokenizer.ggml.model {other:?} is not supported; supported: \"gpt2\" (byte-level \
                 BPE), \"llama\" (SentencePiece BPE with scores and byte fallback)"
            ));
        }
    };
    let pre = if spm {
        None
    } else {
        Some(g.str("tokenizer.ggml.pre").unwrap_or("default"))
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
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
        // llama.cpp matches control (3), user-defined (4) and unknown (2) tokens whole in the
        // text; transformers adds them as added tokens (control and unknown ones special).
        if ty == 3 || ty == 4 || (spm && ty == 2) {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty != 4,
            }));
        }
    }
    let merges = match g.get("tokenizer.ggml.merges") {
        Some(_) => file_merges(&strings(g, "tokenizer.ggml.merges")?, &vocab)?,
        None if spm => spm_merges(&tokens, &scores(g, tokens.len())?),
        None => return Err("metadata tokenizer.ggml.merges is missing".into()),
    };
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
    // llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(spm);
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
        (false, _) if spm => Json::Null,
        (false, _) => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let unk_token = unk.map(|(_, t)| t);
    let (normalizer, pre_tokenizer, decoder, model) = match pre {
        None => {
            let add_space_prefix = g
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if unk_token.is_none() {
                return Err(
                    "a SentencePiece vocabulary needs tokenizer.ggml.unknown_token_id".into(),
                );
            }
            let (normalizer, decoder) = spm_text_rules(add_space_prefix);
            (
                normalizer,
                Json::Null,
                decoder,
                bpe(unk_token, true, vocab, merges),
            )
        }
        Some(pre) => (
            Json::Null,
            pre_tokenizer(pre)?,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            bpe(unk_token, false, vocab, merges),
        ),
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
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
        "gguf_tokenizer_model": model,
        "gguf_pre_tokenizer": pre,
    });
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config,
        chat_template,
    })
}

/// The BPE model of `tokenizer.json`. SentencePiece vocabularies fall back to `<0xXX>` byte
/// tokens for characters they lack and fuse runs of unknowns, as `LlamaTokenizer` does.
fn bpe(
    unk: Option<&str>,
    byte_fallback: bool,
    vocab: Map<String, Json>,
    merges: Vec<Json>,
) -> Json {
    json!({
        "type": "BPE", "dropout": null, "unk_token": unk,
        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback, "ignore_merges": false, "vocab": vocab, "merges": merges,
    })
}

/// SentencePiece's whitespace rules as llama.cpp applies them (`llama_vocab::tokenize`, SPM):
/// spaces become `▁`, and with `add_space_prefix` (the default) every text fragment that starts
/// the input or follows a special token gets a leading `▁`. A `Prepend` normalizer does exactly
/// that in `tokenizers`, which normalizes each fragment between added tokens on its own (the
/// form of Phi-3's and legacy Llama `tokenizer.json` files). `Metaspace` with
/// `prepend_scheme: first`, what `LlamaTokenizer` builds, would leave the fragment after a
/// special token unprefixed, unlike llama.cpp. Decoding undoes it: `▁` -> space, byte tokens
/// -> bytes, and the one leading space dropped.
fn spm_text_rules(add_space_prefix: bool) -> (Json, Json) {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    (
        normalizer,
        json!({"type": "Sequence", "decoders": decoders}),
    )
}

/// `tokenizer.ggml.merges` ("a b" per entry), checked against the vocabulary.
fn file_merges(merges: &[&str], vocab: &Map<String, Json>) -> Res<Vec<Json>> {
    merges
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
        .collect()
}

/// `tokenizer.ggml.scores`, one finite float per token.
fn scores(g: &Gguf, n: usize) -> Res<Vec<f64>> {
    let arr = g
        .get("tokenizer.ggml.scores")
        .ok_or("metadata tokenizer.ggml.scores is missing (a SentencePiece vocabulary needs it)")?
        .as_array()
        .ok_or("metadata tokenizer.ggml.scores is not an array")?;
    if arr.len() != n {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {n} tokens",
            arr.len()
        ));
    }
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(format!("tokenizer.ggml.scores[{i}] is not a finite number")),
        })
        .collect()
}

/// The merges a SentencePiece BPE vocabulary implies, which its GGUF file does not list.
/// llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined text is the
/// token of highest score; a BPE model does the same with one merge `(a, b)` per way of
/// cutting a token into two tokens, ranked by the token's score (best first). Ties are broken
/// as transformers' `generate_merges` does (longer left part first, then longer right part,
/// then token id and the parts' ids), so the result is its merge list.
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<Json> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut merges = Vec::new();
    for (id, (&tok, &score)) in tokens.iter().zip(scores).enumerate() {
        let mut local = Vec::new();
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (score, l.chars().count(), r.chars().count(), id, l, r)),
        );
    }
    // A stable sort on (score, |l|, |r|) descending keeps the (id, parts) order among ties.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges.into_iter().map(|(.., l, r)| json!([l, r])).collect()
}
