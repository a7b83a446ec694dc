//! Deterministic random-weight checkpoints of real model shapes, in Hugging Face layout
//! (`config.json`, one `model.safetensors` in bf16, MXFP4 experts for gpt-oss, and a small
//! byte-level BPE tokenizer whose special tokens sit at the real models' ids), so benchmarks of
//! real sizes run with no download. Weights are uniform with the std of the models' init
//! (0.02); the answers are noise, the speed and memory are real.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::{Value, json};

use crate::error::{ExportError, Result};
use crate::spec::{Arch, ModelSpec};

pub const SHAPES: &[&str] = &["qwen2.5-0.5b", "llama-3.2-1b", "qwen3-1.7b", "gpt-oss-20b"];
pub const SHAPES_HELP: &str =
    "Random-init shapes: qwen2.5-0.5b, llama-3.2-1b, qwen3-1.7b, gpt-oss-20b";

/// `(config.json, specials [(id, text)], chat_template)` of a shape; token ids are the real ones.
/// A random-init shape: its `config.json`, special tokens `(id, text)` at the real model's ids,
/// and a chat template.
type ShapeConfig = (Value, Vec<(u32, &'static str)>, &'static str);

fn shape_config(shape: &str) -> Result<ShapeConfig> {
    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    const LLAMA3: &str = "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
    let qwen_specials = vec![
        (151643, "<|endoftext|>"),
        (151644, "<|im_start|>"),
        (151645, "<|im_end|>"),
    ];
    Ok(match shape {
        "qwen2.5-0.5b" => (
            json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 32768,
                "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"
            }),
            qwen_specials,
            CHATML,
        ),
        "qwen3-1.7b" => (
            json!({
                "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "use_sliding_window": false,
                "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"
            }),
            qwen_specials,
            CHATML,
        ),
        "llama-3.2-1b" => (
            json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
                "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
            }),
            vec![
                (128000, "<|begin_of_text|>"),
                (128001, "<|end_of_text|>"),
                (128006, "<|start_header_id|>"),
                (128007, "<|end_header_id|>"),
                (128008, "<|eom_id|>"),
                (128009, "<|eot_id|>"),
            ],
            LLAMA3,
        ),
        "gpt-oss-20b" => (
            json!({
                "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_act": "silu",
                "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
                "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
                "vocab_size": 201088, "max_position_embeddings": 131072, "rope_theta": 150000,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 4096, "truncate": false},
                "sliding_window": 128, "initial_context_length": 4096,
                "layer_types": (0..24).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>(),
                "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "attention_bias": true, "tie_word_embeddings": false,
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert":
                    ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
                "bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999, "torch_dtype": "bfloat16"
            }),
            vec![
                (199998, "<|startoftext|>"),
                (199999, "<|endoftext|>"),
                (200002, "<|return|>"),
                (200003, "<|constrain|>"),
                (200005, "<|channel|>"),
                (200006, "<|start|>"),
                (200007, "<|end|>"),
                (200008, "<|message|>"),
                (200012, "<|call|>"),
            ],
            "",
        ),
        other => {
            return Err(ExportError::InvalidOption(format!(
                "unknown random-init shape {other:?}; known: {}",
                SHAPES.join(", ")
            )));
        }
    })
}

/// GPT-2's byte -> printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            if printable {
                char::from_u32(b).expect("byte range is valid unicode")
            } else {
                let c = char::from_u32(next).expect("256..324 is valid unicode");
                next += 1;
                c
            }
        })
        .collect()
}

/// A byte-level BPE `tokenizer.json`: 256 byte tokens, a few merges of common English pairs
/// (llama.cpp's converter needs at least one merge), the shape's special tokens, and made-up
/// syllable words for every other id below `vocab_size`, so that what a random model generates
/// decodes to visible (if meaningless) text. Those words have no merges: encoding only ever
/// produces the byte tokens and the few merged pairs.
fn tokenizer_json(specials: &[(u32, &str)], vocab_size: usize) -> Value {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let sp = chars[b' ' as usize];
    let pairs: Vec<(String, String)> = [
        ("t", "h"),
        ("th", "e"),
        ("i", "n"),
        ("e", "r"),
        ("a", "n"),
        ("o", "n"),
        ("r", "e"),
        ("e", "d"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .chain([
        (sp.to_string(), "t".to_string()),
        (sp.to_string(), "the".to_string()),
        (sp.to_string(), "a".to_string()),
    ])
    .collect();
    let mut merges = Vec::new();
    for (a, b) in pairs {
        let merged = format!("{a}{b}");
        let id = vocab.len();
        vocab.entry(merged).or_insert(json!(id));
        merges.push(format!("{a} {b}"));
    }
    let taken: std::collections::HashSet<u32> = specials.iter().map(|(id, _)| *id).collect();
    const CONSONANTS: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    for id in vocab.len()..vocab_size {
        if taken.contains(&(id as u32)) {
            continue;
        }
        let mut word = String::new();
        let mut n = id;
        loop {
            word.push(CONSONANTS[n % CONSONANTS.len()] as char);
            n /= CONSONANTS.len();
            word.push(VOWELS[n % VOWELS.len()] as char);
            n /= VOWELS.len();
            if n == 0 {
                break;
            }
        }
        // Most tokens start a word (byte-level BPE's space marker).
        let token = if id % 4 == 0 {
            word
        } else {
            format!("{sp}{word}")
        };
        vocab.entry(token).or_insert(json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .map(|(id, text)| {
            json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

/// splitmix64: a tiny, stable generator, so a shape and seed give the same bytes forever.
struct Rng(u64);

impl Rng {
    fn for_tensor(seed: u64, name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

enum Init {
    /// bf16 uniform with this std around `mean`.
    Normal { mean: f32, std: f32 },
    /// u8 uniform in `[lo, hi]`.
    Bytes { lo: u8, hi: u8 },
}

/// The tensors of a spec in HF naming: `(name, shape, init)`.
fn tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>, Init)> {
    let w = || Init::Normal {
        mean: 0.0,
        std: 0.02,
    };
    let norm = || Init::Normal {
        mean: 1.0,
        std: 0.02,
    };
    let (h, i, v) = (spec.hidden, spec.intermediate, spec.vocab);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h], w())];
    if !spec.tied() {
        t.push(("lm_head.weight".into(), vec![v, h], w()));
    }
    t.push(("model.norm.weight".into(), vec![h], norm()));
    let bias = matches!(spec.arch, Arch::Qwen2 | Arch::GptOss);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h], norm()));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            norm(),
        ));
        for (n, rows) in [
            ("q", spec.q_dim()),
            ("k", spec.kv_dim()),
            ("v", spec.kv_dim()),
        ] {
            t.push((format!("{p}.self_attn.{n}_proj.weight"), vec![rows, h], w()));
            if bias {
                t.push((format!("{p}.self_attn.{n}_proj.bias"), vec![rows], w()));
            }
        }
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, spec.q_dim()],
            w(),
        ));
        if spec.arch == Arch::Qwen3 {
            t.push((
                format!("{p}.self_attn.q_norm.weight"),
                vec![spec.head_dim],
                norm(),
            ));
            t.push((
                format!("{p}.self_attn.k_norm.weight"),
                vec![spec.head_dim],
                norm(),
            ));
        }
        if let Some(moe) = &spec.moe {
            let e = moe.experts;
            t.push((format!("{p}.self_attn.o_proj.bias"), vec![h], w()));
            t.push((
                format!("{p}.self_attn.sinks"),
                vec![spec.heads],
                Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
            ));
            t.push((format!("{p}.mlp.router.weight"), vec![e, h], w()));
            t.push((format!("{p}.mlp.router.bias"), vec![e], w()));
            for (proj, n, k) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
                let x = format!("{p}.mlp.experts.{proj}");
                t.push((
                    format!("{x}_blocks"),
                    vec![e, n, k / 32, 16],
                    Init::Bytes { lo: 0, hi: 255 },
                ));
                // e8m0 scales around 2^-7: |w| up to 6 * 2^-7 ~ 0.05.
                t.push((
                    format!("{x}_scales"),
                    vec![e, n, k / 32],
                    Init::Bytes { lo: 118, hi: 121 },
                ));
                t.push((format!("{x}_bias"), vec![e, n], w()));
            }
        } else {
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], w()));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], w()));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], w()));
        }
    }
    t
}

/// Writes `model.safetensors`, generating one tensor at a time.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Init)], seed: u64) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, init) in tensors {
        let (dtype, size) = match init {
            Init::Normal { .. } => ("BF16", 2),
            Init::Bytes { .. } => ("U8", 1),
        };
        let len = shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut hbytes = serde_json::to_vec(&Value::Object(header)).expect("JSON map serializes");
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let file = File::create(path).map_err(ExportError::io(path))?;
    let mut out = BufWriter::with_capacity(1 << 22, file);
    let io = ExportError::io(path);
    let res: std::io::Result<()> = (|| {
        out.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        out.write_all(&hbytes)?;
        let mut buf = Vec::with_capacity(1 << 22);
        for (name, shape, init) in tensors {
            let mut rng = Rng::for_tensor(seed, name);
            let mut left: usize = shape.iter().product();
            while left > 0 {
                let n = left.min(1 << 20);
                buf.clear();
                match init {
                    Init::Normal { mean, std } => {
                        // uniform on [-a, a] has std a / sqrt(3)
                        let a = std * 3f32.sqrt();
                        for _ in 0..n {
                            buf.extend_from_slice(
                                &bf16::from_f32(mean + a * rng.unit()).to_le_bytes(),
                            );
                        }
                    }
                    Init::Bytes { lo, hi } => {
                        let span = (*hi as u64 - *lo as u64) + 1;
                        buf.extend((0..n).map(|_| *lo + (rng.next() % span) as u8));
                    }
                }
                out.write_all(&buf)?;
                left -= n;
            }
        }
        out.flush()
    })();
    res.map_err(io)
}

/// Writes a random-init checkpoint of `shape` in HF layout to `out`.
pub fn write_checkpoint(shape: &str, out: &Path, seed: u64, force: bool) -> Result<()> {
    let (config, specials, template) = shape_config(shape)?;
    if out.exists()
        && fs::read_dir(out)
            .map_err(ExportError::io(out))?
            .next()
            .is_some()
        && !force
    {
        return Err(ExportError::InvalidOption(format!(
            "output {} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    fs::create_dir_all(out).map_err(ExportError::io(out))?;
    let spec = ModelSpec::from_json(&config, None, &out.join("config.json"))?;
    crate::package::write_json(&out.join("config.json"), &config)?;
    let name_of = |id: Option<u32>| {
        id.and_then(|id| specials.iter().find(|(i, _)| *i == id).map(|(_, t)| *t))
    };
    let eos = spec.eos.clone();
    crate::package::write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": spec.bos, "eos_token_id": eos, "pad_token_id": spec.pad.or(eos.first().copied()), "do_sample": false}),
    )?;
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of(spec.bos),
        "eos_token": name_of(eos.first().copied()),
        "pad_token": name_of(spec.pad.or(eos.first().copied())),
        "model_max_length": spec.max_position,
        "add_bos_token": false,
    });
    if !template.is_empty() {
        tok_cfg["chat_template"] = json!(template);
    }
    crate::package::write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;
    crate::package::write_json(
        &out.join("tokenizer.json"),
        &tokenizer_json(&specials, spec.vocab),
    )?;
    write_safetensors(&out.join("model.safetensors"), &tensors(&spec), seed)
}

/// A random-init checkpoint in a temporary folder beside `near`, removed on drop.
#[derive(Debug)]
pub struct TempCheckpoint {
    dir: PathBuf,
}

impl TempCheckpoint {
    pub fn new(shape: &str, near: &Path, seed: u64) -> Result<Self> {
        let parent = match near.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(ExportError::io(&parent))?;
        let dir = parent.join(format!(".random-init-{shape}-{}", std::process::id()));
        let tmp = TempCheckpoint { dir };
        write_checkpoint(shape, &tmp.dir, seed, true)?;
        Ok(tmp)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempCheckpoint {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_resolves_to_a_spec() {
        for shape in SHAPES {
            let (cfg, specials, _) = shape_config(shape).unwrap();
            let spec = ModelSpec::from_json(&cfg, None, Path::new("config.json")).unwrap();
            for id in spec.eos.iter().chain(spec.bos.iter()) {
                assert!(
                    specials.iter().any(|(i, _)| i == id),
                    "{shape}: token {id} has no special"
                );
            }
        }
    }

    #[test]
    fn every_merge_joins_two_vocabulary_tokens_into_one() {
        let tok = tokenizer_json(&[(1000, "<|end|>")], 2000);
        let vocab = tok["model"]["vocab"].as_object().unwrap();
        for m in tok["model"]["merges"].as_array().unwrap() {
            let (a, b) = m.as_str().unwrap().split_once(' ').unwrap();
            for t in [a, b, &format!("{a}{b}")] {
                assert!(
                    vocab.contains_key(t),
                    "merge {m} needs {t:?} in the vocabulary"
                );
            }
        }
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let c = byte_chars();
        let set: std::collections::HashSet<_> = c.iter().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(c[b'a' as usize], 'a');
        assert_eq!(c[b' ' as usize], '\u{120}');
    }
}
