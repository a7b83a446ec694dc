//! Raw Hugging Face `config.json` -> [`ModelSpec`], resolved once. Everything the graph builder
//! needs (dimensions, RoPE, per-layer attention windows, MoE, token ids) is decided here, so the
//! builder never looks at JSON and every unsupported setting fails before any file is written.

use std::path::Path;

use serde_json::Value;

use crate::error::{ExportError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    GptOss,
}

impl Arch {
    fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "Phi3ForCausalLM" => Arch::Phi3,
            "GptOssForCausalLM" => Arch::GptOss,
            _ => return None,
        })
    }

    /// `model.type` in genai_config.json, as onnxruntime-genai's builder writes it.
    pub fn genai_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::GptOss => "gptoss",
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
        }
    }
}

/// How RoPE frequencies are derived (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: f64,
    },
    Yarn {
        factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// Per-dimension divisors of the inverse frequencies, as llama.cpp stores Llama 3's
    /// scaling in GGUF files (`rope_freqs.weight`): `inv_freq[i] = theta^(-2i/d) / factors[i]`.
    Factors(Vec<f64>),
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max: usize,
        attention_factor: f64,
    },
}

#[derive(Clone, Debug)]
pub struct Rope {
    pub theta: f64,
    /// Number of rotated dimensions (== head_dim; partial rotary is rejected).
    pub dim: usize,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    pub swiglu_limit: f32,
    pub swiglu_alpha: f32,
}

#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    /// `None` when config.json does not say; [`ModelSpec::resolve`] decides from the weights.
    pub tie_embeddings: Option<bool>,
    pub max_position: usize,
    pub rope: Rope,
    /// Per layer: `Some(W)` for sliding-window attention over the last W positions.
    pub windows: Vec<Option<usize>>,
    pub moe: Option<Moe>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    /// `generation_config.json`, when the checkpoint has one (sampling defaults).
    pub generation: Option<Value>,
}

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The largest value config.json may give a size: 2^24 for counts that scale a buffer
/// (vocabulary, context, widths), 2^16 for the rest (layers, heads, experts).
fn max_size(key: &str) -> u64 {
    match key {
        "vocab_size" | "max_position_embeddings" | "hidden_size" | "intermediate_size" => 1 << 24,
        _ => 1 << 16,
    }
}

impl ModelSpec {
    /// Reads `config.json` (and `generation_config.json` for token ids, as transformers'
    /// `generate` uses them) from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(ExportError::MissingFile {
                path,
                why: "Hugging Face model config",
            });
        }
        let text = std::fs::read_to_string(&path).map_err(ExportError::io(&path))?;
        let cfg: Value =
            serde_json::from_str(&text).map_err(|e| ExportError::config(&path, e.to_string()))?;
        let gen_path = dir.join("generation_config.json");
        let gen_cfg: Option<Value> = if gen_path.exists() {
            let t = std::fs::read_to_string(&gen_path).map_err(ExportError::io(&gen_path))?;
            Some(
                serde_json::from_str(&t)
                    .map_err(|e| ExportError::config(&gen_path, e.to_string()))?,
            )
        } else {
            None
        };
        let mut spec = Self::from_json(&cfg, gen_cfg.as_ref(), &path)?;
        spec.generation = gen_cfg;
        Ok(spec)
    }

    /// Reads a parsed `config.json` (and `generation_config.json`); `path` names it in errors.
    pub fn from_json(cfg: &Value, gen_cfg: Option<&Value>, path: &Path) -> Result<Self> {
        let bad = |msg: String| ExportError::config(path, msg);
        let arch_name = get(cfg, "architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .ok_or_else(|| bad("no \"architectures\" list".into()))?;
        let arch =
            Arch::from_hf(arch_name).ok_or_else(|| ExportError::UnsupportedArchitecture {
                found: arch_name.to_string(),
            })?;
        // Every size is positive and bounded (far above any published model's), so that what
        // is derived from them (q_dim, KV sizes, buffer lengths) cannot overflow: a config.json
        // is downloaded, untrusted input (the `hf_config` fuzz target found a zero head count
        // that divided by zero).
        let in_range = |key: &str, v: u64| -> Result<usize> {
            let max = max_size(key);
            if v == 0 || v > max {
                return Err(bad(format!("{key:?} is {v}: expected 1 to {max}")));
            }
            Ok(v as usize)
        };
        let usize_of = |key: &str| -> Result<usize> {
            let v = get(cfg, key)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad(format!("missing or non-integer {key:?}")))?;
            in_range(key, v)
        };
        let optional = |key: &str| -> Result<Option<usize>> {
            get(cfg, key)
                .and_then(|v| v.as_u64())
                .map(|v| in_range(key, v))
                .transpose()
        };
        let hidden = usize_of("hidden_size")?;
        let heads = usize_of("num_attention_heads")?;
        let layers = usize_of("num_hidden_layers")?;
        let vocab = usize_of("vocab_size")?;
        let intermediate = usize_of("intermediate_size")?;
        let kv_heads = optional("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match optional("head_dim")? {
            Some(d) => d,
            None => in_range("head_dim", (hidden / heads) as u64)?,
        };
        if heads % kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        if !head_dim.is_multiple_of(16) {
            return Err(bad(format!(
                "head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention requires"
            )));
        }
        let rms_eps = get(cfg, "rms_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-6) as f32;
        let act = get(cfg, "hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu");
        if act != "silu" {
            return Err(bad(format!(
                "hidden_act {act:?} is not supported (only \"silu\")"
            )));
        }
        if get(cfg, "mlp_bias").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        let partial = get(cfg, "partial_rotary_factor")
            .and_then(|v| v.as_f64())
            .unwrap_or(1.0);
        if (partial - 1.0).abs() > 1e-9 {
            return Err(bad(format!(
                "partial_rotary_factor {partial} is not supported (only 1.0)"
            )));
        }
        let max_position = usize_of("max_position_embeddings")?;
        let tie_embeddings = get(cfg, "tie_word_embeddings").and_then(|v| v.as_bool());
        let rope = rope_from_config(cfg, head_dim, max_position, path)?;
        let windows = windows_from_config(cfg, arch, layers, path)?;
        let moe = if arch == Arch::GptOss {
            Some(Moe {
                experts: usize_of("num_local_experts")?,
                top_k: in_range(
                    "num_experts_per_tok",
                    get(cfg, "num_experts_per_tok")
                        .or_else(|| get(cfg, "experts_per_token"))
                        .and_then(|v| v.as_u64())
                        .ok_or_else(|| bad("missing \"num_experts_per_tok\"".into()))?,
                )?,
                swiglu_limit: get(cfg, "swiglu_limit")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(7.0) as f32,
                swiglu_alpha: get(cfg, "swiglu_alpha")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.702) as f32,
            })
        } else {
            None
        };
        // generation_config.json wins for token ids, as in transformers' generate().
        let pick = |key: &str| -> Vec<u32> {
            let from_gen = ids(gen_cfg.and_then(|g| get(g, key)));
            if from_gen.is_empty() {
                ids(get(cfg, key))
            } else {
                from_gen
            }
        };
        let mut eos = pick("eos_token_id");
        // The model's own eos (config.json) stays in the list, first, as the genai builder does.
        for id in ids(get(cfg, "eos_token_id")).into_iter().rev() {
            if !eos.contains(&id) {
                eos.insert(0, id);
            }
        }
        Ok(ModelSpec {
            arch,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            rms_eps,
            tie_embeddings,
            max_position,
            rope,
            windows,
            moe,
            bos: pick("bos_token_id").first().copied(),
            pad: pick("pad_token_id").first().copied(),
            generation: None,
            eos,
        })
    }

    /// Settles what config.json leaves to the weights and to the package's length:
    /// - an absent `tie_word_embeddings` means tied exactly when there is no `lm_head.weight`;
    /// - a sliding window at least as long as `max_length` never slides, so those layers become
    ///   full attention (Phi-3.5's 262144-token window would otherwise size a huge KV buffer).
    pub fn resolve(&mut self, has_lm_head: bool, max_length: usize) {
        self.tie_embeddings.get_or_insert(!has_lm_head);
        for w in &mut self.windows {
            if w.is_some_and(|w| w >= max_length) {
                *w = None;
            }
        }
    }

    pub fn tied(&self) -> bool {
        self.tie_embeddings.unwrap_or(false)
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The sliding window shared by the windowed layers, if any (genai_config has one value).
    pub fn window(&self) -> Option<usize> {
        self.windows.iter().flatten().copied().next()
    }
}

fn rope_from_config(
    cfg: &Value,
    head_dim: usize,
    max_position: usize,
    path: &Path,
) -> Result<Rope> {
    let bad = |msg: String| ExportError::config(path, msg);
    // transformers 5 writes `rope_parameters` (with rope_theta inside); older configs write
    // `rope_theta` plus an optional `rope_scaling` dict.
    let params = get(cfg, "rope_parameters").or_else(|| get(cfg, "rope_scaling"));
    let theta = get(cfg, "rope_theta")
        .or_else(|| params.and_then(|p| get(p, "rope_theta")))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    let kind = params
        .and_then(|p| get(p, "rope_type").or_else(|| get(p, "type")))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| params.and_then(|p| get(p, key)).and_then(|v| v.as_f64());
    let need =
        |key: &str| num(key).ok_or_else(|| bad(format!("rope scaling {kind:?} needs {key:?}")));
    let original_max = num("original_max_position_embeddings")
        .or_else(|| get(cfg, "original_max_position_embeddings").and_then(|v| v.as_f64()));
    let scaling = match kind {
        "default" | "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max: need("original_max_position_embeddings")?,
        },
        "yarn" => {
            let factor = need("factor")?;
            let original_max = original_max.unwrap_or(max_position as f64);
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                num("attention_factor"),
                num("mscale"),
                num("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(md)) if m != 0.0 && md != 0.0 => {
                    mscale(factor, m) / mscale(factor, md)
                }
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                original_max,
                truncate: params
                    .and_then(|p| get(p, "truncate"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
                attention_factor,
            }
        }
        "longrope" | "su" => {
            let list = |key: &str| -> Result<Vec<f64>> {
                let v: Vec<f64> = params
                    .and_then(|p| get(p, key))
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| bad(format!("longrope needs {key:?}")))?
                    .iter()
                    .filter_map(|x| x.as_f64())
                    .collect();
                if v.len() != head_dim / 2 {
                    return Err(bad(format!(
                        "longrope {key:?} has {} entries, expected head_dim/2 = {}",
                        v.len(),
                        head_dim / 2
                    )));
                }
                Ok(v)
            };
            let original_max = original_max
                .ok_or_else(|| bad("longrope needs \"original_max_position_embeddings\"".into()))?;
            let factor = num("factor").unwrap_or(max_position as f64 / original_max);
            let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original_max.ln()).sqrt()
            });
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max: original_max as usize,
                attention_factor,
            }
        }
        other => {
            return Err(ExportError::UnsupportedRope {
                found: other.to_string(),
            });
        }
    };
    Ok(Rope {
        theta,
        dim: head_dim,
        scaling,
    })
}

fn windows_from_config(
    cfg: &Value,
    arch: Arch,
    layers: usize,
    path: &Path,
) -> Result<Vec<Option<usize>>> {
    let window = get(cfg, "sliding_window")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    // Qwen2/Qwen3 carry a sliding_window value that is only used with use_sliding_window.
    let enabled = match arch {
        Arch::Qwen2 | Arch::Qwen3 => {
            get(cfg, "use_sliding_window").and_then(|v| v.as_bool()) == Some(true)
        }
        _ => true,
    };
    if let Some(types) = get(cfg, "layer_types").and_then(|v| v.as_array()) {
        if types.len() != layers {
            return Err(ExportError::config(
                path,
                format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                ),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    ExportError::config(path, "sliding_attention layer without sliding_window")
                }),
                other => Err(ExportError::config(
                    path,
                    format!("unsupported layer type {other:?}"),
                )),
            })
            .collect();
    }
    if arch == Arch::Qwen2 && enabled {
        return Err(ExportError::config(
            path,
            "use_sliding_window = true without layer_types is not supported",
        ));
    }
    Ok(vec![if enabled { window } else { None }; layers])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Value {
        serde_json::from_str(include_str!(
            "../../tests/fixtures/llama/checkpoint/config.json"
        ))
        .expect("the fixture's config.json")
    }

    /// Found by the `hf_config` fuzz target: `"num_attention_heads": 0` divided by zero (a
    /// panic where the exporter should name the field); huge sizes would overflow later.
    #[test]
    fn zero_and_huge_sizes_are_refused_naming_the_field() {
        let path = Path::new("config.json");
        ModelSpec::from_json(&llama(), None, path).expect("the fixture parses");
        for (key, v) in [
            ("num_attention_heads", 0),
            ("num_key_value_heads", 0),
            ("hidden_size", 0),
            ("num_hidden_layers", 0),
            ("head_dim", 0),
            ("vocab_size", 1 << 40),
            ("max_position_embeddings", u64::MAX),
        ] {
            let mut cfg = llama();
            cfg[key] = v.into();
            let e = ModelSpec::from_json(&cfg, None, path)
                .expect_err(key)
                .to_string();
            assert!(e.contains(key) && e.contains("expected 1 to"), "{key}: {e}");
        }
    }
}
