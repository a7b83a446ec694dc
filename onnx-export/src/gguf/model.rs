//! GGUF metadata -> the Hugging Face `config.json` / `generation_config.json` the HF path reads,
//! and llama.cpp tensor names -> Hugging Face names (with the Q/K row order llama.cpp's
//! converter permuted for its RoPE layout undone).
//!
//! Supported `general.architecture`s: `llama` (Llama, SmolLM, Mistral without a window),
//! `qwen2`, `qwen3`, `phi3`, `gpt-oss` (its experts as llama.cpp's converter writes them:
//! gate and up split into `ffn_gate_exps` / `ffn_up_exps`, MXFP4; exposed here as
//! `mlp.experts.{gate,up,down}_exps` `[E, N, K]` for [`crate::decoder`]). Everything else, and any tensor this mapping does not know, is
//! refused before a file is written: an unknown tensor means a model feature the graph would
//! silently leave out.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::{Gguf, TensorInfo, Value};

pub const SUPPORTED: &str = "llama, qwen2, qwen3, phi3, gpt-oss";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    GptOss,
}

impl GgufArch {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => GgufArch::Llama,
            "qwen2" => GgufArch::Qwen2,
            "qwen3" => GgufArch::Qwen3,
            "phi3" => GgufArch::Phi3,
            "gpt-oss" => GgufArch::GptOss,
            _ => return None,
        })
    }

    fn hf(self) -> &'static str {
        match self {
            GgufArch::Llama => "LlamaForCausalLM",
            GgufArch::Qwen2 => "Qwen2ForCausalLM",
            GgufArch::Qwen3 => "Qwen3ForCausalLM",
            GgufArch::Phi3 => "Phi3ForCausalLM",
            GgufArch::GptOss => "GptOssForCausalLM",
        }
    }
}

/// Where a Hugging Face tensor lives in the GGUF file.
#[derive(Clone, Debug)]
pub struct Source {
    pub info: TensorInfo,
    /// llama.cpp's RoPE permutation of the rows, undone by [`Source::row`]: `Some(head_dim)`.
    pub permuted: Option<usize>,
}

impl Source {
    /// The GGUF row holding Hugging Face row `r` ([`gguf_row`]).
    pub fn row(&self, r: usize) -> usize {
        gguf_row(r, self.permuted)
    }
}

/// The GGUF row holding Hugging Face row `r` of a tensor stored with llama.cpp's RoPE row
/// order (`permuted = Some(head_dim)`): within each head, HF rows 0..d/2 are GGUF's even rows
/// and rows d/2..d its odd rows. `None`: the same row.
pub fn gguf_row(r: usize, permuted: Option<usize>) -> usize {
    match permuted {
        None => r,
        Some(d) => {
            let (head, j) = (r / d, r % d);
            head * d + 2 * (j % (d / 2)) + j / (d / 2)
        }
    }
}

/// The model a GGUF file describes, in Hugging Face terms.
#[derive(Debug)]
pub struct GgufModel {
    pub arch: GgufArch,
    pub config: Json,
    pub generation: Json,
    /// Hugging Face tensor name -> its GGUF source.
    pub tensors: BTreeMap<String, Source>,
    /// Llama 3's RoPE scaling as llama.cpp stores it (`rope_freqs.weight`, head_dim/2 divisors).
    pub rope_freqs: Option<Vec<f64>>,
}

type Res<T> = std::result::Result<T, String>;

impl GgufModel {
    pub fn from_gguf(g: &Gguf) -> Res<Self> {
        let arch_name = g
            .str("general.architecture")
            .ok_or("no general.architecture in the metadata")?;
        let arch = GgufArch::parse(arch_name).ok_or_else(|| {
            format!("architecture {arch_name:?} is not supported; supported: {SUPPORTED}")
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Res<Option<usize>> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
                    format!(
                        "{}: expected one non-negative integer, found {}",
                        key(k),
                        short(v)
                    )
                }),
            }
        };
        let need = |k: &str| int(k)?.ok_or_else(|| format!("metadata {} is missing", key(k)));
        let float = |k: &str| g.get(&key(k)).and_then(Value::as_f64);

        let hidden = need("embedding_length")?;
        let layers = need("block_count")?;
        let heads = need("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 || hidden == 0 || layers == 0 {
            return Err("embedding_length, block_count and head_count must be positive".into());
        }
        let head_dim = int("attention.key_length")?.unwrap_or(hidden / heads);
        if let Some(v) = int("attention.value_length")?
            && v != head_dim
        {
            return Err(format!(
                "attention.value_length {v} differs from key_length {head_dim}: not supported"
            ));
        }
        if let Some(r) = int("rope.dimension_count")?
            && r != head_dim
        {
            return Err(format!(
                "rope.dimension_count {r} != head dimension {head_dim}: partial rotary is not supported"
            ));
        }
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map_or(0, <[Value]>::len);
        let vocab = int("vocab_size")?.unwrap_or(tokens);
        let embd = g
            .tensors
            .get("token_embd.weight")
            .ok_or("tensor token_embd.weight is missing")?;
        if embd.shape() != [vocab, hidden] {
            return Err(format!(
                "token_embd.weight has shape {:?}, expected [{vocab}, {hidden}] (vocab, embedding_length)",
                embd.shape()
            ));
        }
        let tied = !g.tensors.contains_key("output.weight");
        let id = |k: &str| {
            g.get(&format!("tokenizer.ggml.{k}"))
                .and_then(Value::as_u64)
        };
        let mut eos: Vec<u64> = Vec::new();
        for k in ["eos_token_id", "eot_token_id", "eom_token_id"] {
            if let Some(i) = id(k)
                && !eos.contains(&i)
            {
                eos.push(i);
            }
        }
        for i in end_of_generation(g) {
            if !eos.contains(&i) {
                eos.push(i);
            }
        }
        let intermediate = match arch {
            GgufArch::GptOss => need("expert_feed_forward_length")?,
            _ => need("feed_forward_length")?,
        };
        let mut config = json!({
            "architectures": [arch.hf()],
            "model_type": if arch == GgufArch::GptOss { "gpt_oss" } else { arch_name },
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            "max_position_embeddings": need("context_length")?,
            "rope_theta": float("rope.freq_base").unwrap_or(10000.0),
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "bos_token_id": id("bos_token_id"),
            "eos_token_id": eos.first(),
            "pad_token_id": id("padding_token_id"),
            "torch_dtype": "float32",
        });
        match g.str(&key("rope.scaling.type")) {
            None | Some("none") => {}
            Some("linear") => {
                config["rope_scaling"] = json!({
                    "type": "linear",
                    "factor": float("rope.scaling.factor").ok_or("linear rope scaling without rope.scaling.factor")?,
                })
            }
            Some("yarn") => {
                config["rope_scaling"] = json!({
                    "type": "yarn",
                    "factor": float("rope.scaling.factor").ok_or("yarn rope scaling without rope.scaling.factor")?,
                    "original_max_position_embeddings": int("rope.scaling.original_context_length")?,
                    "beta_fast": float("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                    "beta_slow": float("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                });
                if arch == GgufArch::GptOss {
                    // gpt-oss's own config (and transformers) keep the YaRN correction range
                    // unrounded; llama.cpp always rounds it (ggml_rope_yarn_corr_dims), which
                    // shifts a few frequencies slightly. We follow the model's config.
                    config["rope_scaling"]["truncate"] = json!(false);
                }
            }
            Some(other) => return Err(format!("rope.scaling.type {other:?} is not supported")),
        }
        if let Some(w) = int("attention.sliding_window")? {
            match arch {
                // llama.cpp's converter writes 0 when the config has no window (Phi-3.5, Phi-4).
                GgufArch::Phi3 if w == 0 => {}
                GgufArch::Phi3 => config["sliding_window"] = json!(w),
                // llama.cpp's gpt-oss: windowed attention on even layers (il % 2 == 0), full
                // attention on odd ones, as gpt-oss's own layer_types.
                GgufArch::GptOss => {
                    config["sliding_window"] = json!(w);
                    config["layer_types"] = (0..layers)
                        .map(|l| {
                            if l % 2 == 0 {
                                "sliding_attention"
                            } else {
                                "full_attention"
                            }
                        })
                        .collect();
                }
                _ => {
                    return Err(format!(
                        "{}: sliding-window attention is not supported for {arch_name}",
                        key("attention.sliding_window")
                    ));
                }
            }
        }
        if arch == GgufArch::GptOss {
            config["num_local_experts"] = json!(need("expert_count")?);
            config["num_experts_per_tok"] = json!(need("expert_used_count")?);
            config["attention_bias"] = json!(true);
            // llama.cpp hard-codes gpt-oss's clamped SwiGLU (alpha 1.702, limit 7).
            config["swiglu_limit"] = json!(7.0);
            if g.get(&key("attention.sliding_window")).is_none() {
                return Err(format!(
                    "metadata {} is missing",
                    key("attention.sliding_window")
                ));
            }
        }
        let mut tensors = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut rope_factors = BTreeMap::new();
        let mut rope_freqs = None;
        for (name, info) in &g.tensors {
            if name == "rope_freqs.weight" && arch == GgufArch::Llama {
                if info.ty != super::GgmlType::F32 || info.shape() != [head_dim / 2] {
                    return Err(format!(
                        "rope_freqs.weight: expected F32 [{}], found {:?} {:?}",
                        head_dim / 2,
                        info.ty,
                        info.shape()
                    ));
                }
                rope_freqs = Some(f32s(g, info));
                continue;
            }
            if let Some(which) = name
                .strip_prefix("rope_factors_")
                .and_then(|n| n.strip_suffix(".weight"))
            {
                rope_factors.insert(which.to_string(), info.clone());
                continue;
            }
            match hf_name(arch, name) {
                Some(hf) => {
                    let permuted = match (arch, hf.rsplit('.').nth(1)) {
                        (GgufArch::Llama, Some("q_proj" | "k_proj")) => Some(head_dim),
                        _ => None,
                    };
                    if let Some(d) = permuted
                        && info.shape().first().is_none_or(|rows| rows % d != 0)
                    {
                        return Err(format!(
                            "tensor {name}: shape {:?} is not whole heads of {d} rows",
                            info.shape()
                        ));
                    }
                    tensors.insert(
                        hf,
                        Source {
                            info: info.clone(),
                            permuted,
                        },
                    );
                }
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            unknown.truncate(8);
            return Err(format!(
                "tensors this importer does not know for {arch_name} (a model feature edgellm does not implement): {}",
                unknown.join(", ")
            ));
        }
        if !rope_factors.is_empty() {
            // Phi-3 LongRoPE: llama.cpp keeps the factor lists as tensors.
            let list = |k: &str| -> Res<Vec<f64>> {
                let t = rope_factors
                    .get(k)
                    .ok_or_else(|| format!("rope_factors_{k}.weight is missing"))?;
                if t.ty != super::GgmlType::F32 {
                    return Err(format!("rope_factors_{k}.weight is {:?}, not F32", t.ty));
                }
                Ok(f32s(g, t))
            };
            if arch != GgufArch::Phi3 {
                return Err(format!(
                    "rope factor tensors are not supported for {arch_name}"
                ));
            }
            config["rope_scaling"] = json!({
                "type": "longrope",
                "short_factor": list("short")?,
                "long_factor": list("long")?,
            });
            config["original_max_position_embeddings"] =
                json!(int("rope.scaling.original_context_length")?);
            if let Some(a) = float("rope.scaling.attn_factor") {
                config["rope_scaling"]["attention_factor"] = json!(a);
            }
        }
        let generation = json!({
            "bos_token_id": id("bos_token_id"),
            "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
            "pad_token_id": id("padding_token_id"),
        });
        Ok(GgufModel {
            arch,
            config,
            generation,
            tensors,
            rope_freqs,
        })
    }
}

/// Token texts llama.cpp treats as end of generation in any vocabulary (`llama_vocab::load`,
/// `special_eog_ids`), whatever ids the metadata names: chat-turn ends such as `<|im_end|>`,
/// `<|eot_id|>`, and gpt-oss's `<|return|>` / `<|call|>`.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
];

/// The ids of [`EOG_TEXTS`] in the vocabulary, in id order. As llama.cpp does, `<|end|>` is
/// left out when `<|return|>` and `<|call|>` are there (o200k_harmony: `<|end|>` closes a
/// message, not the answer).
fn end_of_generation(g: &Gguf) -> Vec<u64> {
    let Some(tokens) = g.get("tokenizer.ggml.tokens").and_then(Value::as_array) else {
        return Vec::new();
    };
    let found: Vec<(u64, &str)> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_str().map(|t| (i as u64, t)))
        .filter(|(_, t)| EOG_TEXTS.contains(t))
        .collect();
    let has = |x: &str| found.iter().any(|(_, t)| *t == x);
    let harmony = has("<|return|>") && has("<|call|>");
    found
        .into_iter()
        .filter(|(_, t)| !(harmony && *t == "<|end|>"))
        .map(|(i, _)| i)
        .collect()
}

fn f32s(g: &Gguf, t: &TensorInfo) -> Vec<f64> {
    g.data(t)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
        .collect()
}

/// A short rendering of a metadata value for error messages.
fn short(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Str(s) => format!("{:?}", s.chars().take(40).collect::<String>()),
        other => format!("{other:?}"),
    }
}

/// llama.cpp tensor name -> Hugging Face tensor name for `arch`.
fn hf_name(arch: GgufArch, name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match (arch, tail) {
        (_, "attn_norm.weight") => "input_layernorm.weight",
        (_, "ffn_norm.weight") => "post_attention_layernorm.weight",
        (_, "attn_output.weight") => "self_attn.o_proj.weight",
        (_, "ffn_down.weight") => "mlp.down_proj.weight",
        (GgufArch::Phi3, "attn_qkv.weight") => "self_attn.qkv_proj.weight",
        (GgufArch::Phi3, "ffn_up.weight") => "mlp.gate_up_proj.weight",
        (GgufArch::Phi3, _) => return None,
        (GgufArch::GptOss, "post_attention_norm.weight") => "post_attention_layernorm.weight",
        (GgufArch::GptOss, "attn_sinks.weight") => "self_attn.sinks",
        (GgufArch::GptOss, "attn_output.bias") => "self_attn.o_proj.bias",
        (GgufArch::GptOss, "attn_q.bias") => "self_attn.q_proj.bias",
        (GgufArch::GptOss, "attn_k.bias") => "self_attn.k_proj.bias",
        (GgufArch::GptOss, "attn_v.bias") => "self_attn.v_proj.bias",
        (GgufArch::GptOss, "ffn_gate_inp.weight") => "mlp.router.weight",
        (GgufArch::GptOss, "ffn_gate_inp.bias") => "mlp.router.bias",
        (GgufArch::GptOss, "ffn_gate_exps.weight") => "mlp.experts.gate_exps",
        (GgufArch::GptOss, "ffn_up_exps.weight") => "mlp.experts.up_exps",
        (GgufArch::GptOss, "ffn_down_exps.weight") => "mlp.experts.down_exps",
        (GgufArch::GptOss, "ffn_gate_exps.bias") => "mlp.experts.gate_exps_bias",
        (GgufArch::GptOss, "ffn_up_exps.bias") => "mlp.experts.up_exps_bias",
        (GgufArch::GptOss, "ffn_down_exps.bias") => "mlp.experts.down_proj_bias",
        (GgufArch::GptOss, "ffn_gate.weight" | "ffn_up.weight") => return None,
        (_, "attn_q.weight") => "self_attn.q_proj.weight",
        (_, "attn_k.weight") => "self_attn.k_proj.weight",
        (_, "attn_v.weight") => "self_attn.v_proj.weight",
        (_, "ffn_gate.weight") => "mlp.gate_proj.weight",
        (_, "ffn_up.weight") => "mlp.up_proj.weight",
        (GgufArch::Qwen2, "attn_q.bias") => "self_attn.q_proj.bias",
        (GgufArch::Qwen2, "attn_k.bias") => "self_attn.k_proj.bias",
        (GgufArch::Qwen2, "attn_v.bias") => "self_attn.v_proj.bias",
        (GgufArch::Qwen3, "attn_q_norm.weight") => "self_attn.q_norm.weight",
        (GgufArch::Qwen3, "attn_k_norm.weight") => "self_attn.k_norm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}
