//! `edgellm-export --gguf` on the tiny GGUF fixtures, one per block type
//! (`tests/fixtures/gguf/`, made with the `gguf` Python package; references dequantized by
//! that package and goldens computed by transformers from the same files):
//!
//! * every weight the package holds dequantizes to the `gguf` package's own dequantization:
//!   each `MatMulNBits` (codes, scales, offset term) and the fp32 tensors, read back from
//!   `model.onnx` / `model.onnx.data`; bit for bit, except one f32 rounding of the per-block
//!   constant of the types that have one (Q4_1, Q4_K, Q5_K: `m + 8d`);
//! * the importer's own dequantization of every tensor (what `--precision fp32` writes) equals
//!   the reference bit for bit;
//! * with f32 activations (`accuracy_level` 0) the package's teacher-forced logits equal
//!   transformers' on both backends, and its greedy continuation is transformers';
//! * `gptoss_mxfp4` is tests/fixtures/gptoss/checkpoint converted by llama.cpp's own converter
//!   (MXFP4 experts, gate/up split, BF16 attention): its fp32 import computes transformers'
//!   logits of that checkpoint, its int4 import (`--allow-requantize`) is byte for byte the
//!   package the Hugging Face path builds, and without the flag the importer refuses, naming
//!   the MXFP4 tensors;
//! * `llama3_rope` and `phi3_longrope` are llama.cpp's conversions of a Llama 3-scaled llama
//!   (the scaling as the `rope_freqs.weight` tensor) and of tests/fixtures/phi3-longrope
//!   (`rope_factors_long` / `rope_factors_short` tensors and the attention factor): their fp32
//!   imports compute transformers' logits of the checkpoints, and their rope caches are the
//!   Hugging Face exports' (the long factors included);
//! * `spm_q8_0` carries a SentencePiece vocabulary (`tokenizer.ggml.model = llama`, scores,
//!   byte tokens, no merges): the package's tokenizer gives llama.cpp's ids for plain text,
//!   special tokens, byte fallback and a chat prompt, and decodes plain text back.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgellm::backend::{Backend, BackendChoice, BackendOptions};
use edgellm_export::checkpoint::Checkpoint;
use edgellm_export::onnx::proto::{ModelProto, NodeProto, TensorProto};
use edgellm_export::{ExportOptions, Precision};
use edgellm_tests::*;
use prost::Message;

/// `qwen2_q8_0`: the `qwen2` architecture (q/k/v biases, no Q/K row permutation);
/// `qwen3_q4_0`: `qwen3` (q/k norms, head_dim 128 != hidden / heads); `phi3_q8_0`: `phi3`
/// (fused attn_qkv and gate/up); `spm_q8_0`: `llama` with a SentencePiece vocabulary.
const QUANTIZED: &[&str] = &[
    "q4_0",
    "q4_1",
    "q8_0",
    "q4_k",
    "q5_k",
    "q6_k",
    "qwen2_q8_0",
    "qwen3_q4_0",
    "phi3_q8_0",
    "spm_q8_0",
];
const FLOAT: &[&str] = &["f16", "bf16", "f32"];

fn dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/gguf").join(name)
}

fn import(name: &str, opts: ExportOptions) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    edgellm_export::export_gguf(
        &dir(name).join("model.gguf"),
        &tmp.path().join("pkg"),
        &ExportOptions {
            max_length: Some(256),
            ..opts
        },
    )
    .unwrap_or_else(|e| panic!("import of {name}: {e}"));
    tmp
}

/// The package's initializers (name -> dims, f32 or u8 bytes) and nodes.
struct Graph {
    nodes: Vec<NodeProto>,
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

impl Graph {
    fn read(pkg: &Path) -> Graph {
        let model =
            ModelProto::decode(std::fs::read(pkg.join("model.onnx")).unwrap().as_slice()).unwrap();
        let data = std::fs::read(pkg.join("model.onnx.data")).unwrap();
        let graph = model.graph.unwrap();
        let mut tensors = HashMap::new();
        for t in graph.initializer {
            let TensorProto {
                dims,
                name,
                raw_data,
                external_data,
                ..
            } = t;
            let get = |k: &str| {
                external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.parse::<usize>().unwrap())
            };
            let bytes = match (get("offset"), get("length")) {
                (Some(o), Some(l)) => data[o..o + l].to_vec(),
                _ => raw_data,
            };
            tensors.insert(name, (dims.iter().map(|&d| d as usize).collect(), bytes));
        }
        Graph {
            nodes: graph.node,
            tensors,
        }
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        self.tensors[name]
            .1
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn attr(node: &NodeProto, name: &str) -> i64 {
        node.attribute.iter().find(|a| a.name == name).unwrap().i
    }

    /// The dequantized `[N, K]` weight of a `MatMulNBits` node, its offset term included.
    fn dequantize(&self, node: &NodeProto) -> (String, Vec<f32>, usize, usize) {
        let (k, n) = (
            Self::attr(node, "K") as usize,
            Self::attr(node, "N") as usize,
        );
        let (bits, block) = (
            Self::attr(node, "bits") as usize,
            Self::attr(node, "block_size") as usize,
        );
        assert!(node.input.len() == 3, "GGUF imports write no zero points");
        let codes = &self.tensors[&node.input[1]].1;
        let scales = self.f32(&node.input[2]);
        let base = node.name.trim_end_matches("/MatMulNBits");
        let offsets = self
            .nodes
            .iter()
            .find(|m| m.name == format!("{base}/Offset/MatMul"))
            .map(|m| {
                let dims = &self.tensors[&m.input[1]].0;
                (self.f32(&m.input[1]), k / dims[0])
            });
        let mut w = vec![0f32; n * k];
        for r in 0..n {
            for i in 0..k {
                let code = match bits {
                    4 => (codes[(r * k + i) / 2] >> (4 * (i % 2))) & 0xf,
                    _ => codes[r * k + i],
                } as f32;
                let zp = (1u32 << (bits - 1)) as f32;
                let mut v = scales[r * (k / block) + i / block] * (code - zp);
                if let Some((o, ob)) = &offsets {
                    v += o[(i / ob) * n + r];
                }
                w[r * k + i] = v;
            }
        }
        (node.input[1].clone(), w, n, k)
    }
}

/// The reference rows a `MatMulNBits` initializer stands for (HF names, stacked along N).
fn reference_rows(reference: &Checkpoint, weight: &str, tied: bool) -> Vec<f32> {
    let prefix = weight.rsplit_once(".MatMul.").unwrap().0;
    let parts: Vec<String> = if prefix == "lm_head" {
        vec![
            if tied {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            }
            .to_string(),
        ]
    } else {
        let (layer, what) = prefix.rsplit_once('.').unwrap();
        let layer = layer.replace(".attn", ".self_attn");
        let names: &[&str] = match what {
            "qkv_proj" => &["q_proj", "k_proj", "v_proj"],
            "o_proj" => &["o_proj"],
            "gate_up_proj" => &["gate_proj", "up_proj"],
            "down_proj" => &["down_proj"],
            other => panic!("unexpected linear {other} ({weight})"),
        };
        // Phi-3 keeps q/k/v and gate/up fused in one tensor each.
        let fused = format!("{layer}.{what}.weight");
        if reference.contains(&fused) {
            vec![fused]
        } else {
            names
                .iter()
                .map(|p| format!("{layer}.{p}.weight"))
                .collect()
        }
    };
    parts
        .iter()
        .flat_map(|p| reference.f32(p).unwrap())
        .collect()
}

fn has_offset(name: &str) -> bool {
    matches!(name, "q4_1" | "q4_k" | "q5_k")
}

#[test]
fn every_packaged_weight_dequantizes_to_the_gguf_reference() {
    for &name in QUANTIZED {
        let pkg = import(name, ExportOptions::default());
        let g = Graph::read(&pkg.path().join("pkg"));
        let reference = Checkpoint::open(&dir(name).join("reference")).unwrap();
        let tied = !reference.contains("lm_head.weight");
        let mut checked = 0;
        for node in g.nodes.iter().filter(|n| n.op_type == "MatMulNBits") {
            let (weight, ours, n, k) = g.dequantize(node);
            let want = reference_rows(&reference, &weight, tied);
            assert_eq!(want.len(), n * k, "{name} {weight}: size");
            for (i, (a, b)) in want.iter().zip(&ours).enumerate() {
                // One f32 rounding of the per-block constant (m + 8d) for offset types.
                let tol = if has_offset(name) {
                    4.0 * f32::EPSILON * (a.abs() + 1.0)
                } else {
                    0.0
                };
                assert!(
                    (a - b).abs() <= tol,
                    "{name} {weight}[{}, {}]: package {b} vs gguf {a}",
                    i / k,
                    i % k
                );
            }
            checked += 1;
        }
        // qkv, o, gate_up, down per layer (2 layers) and the lm_head.
        assert_eq!(checked, 9, "{name}: MatMulNBits nodes checked");
        // Norm weights (and an F16 embedding table) are fp32 initializers equal to the reference.
        for (hf, onnx) in [
            (
                "model.norm.weight",
                "model.layers.2.final_norm_layernorm.weight",
            ),
            (
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
        ] {
            assert_eq!(g.f32(onnx), reference.f32(hf).unwrap(), "{name} {hf}");
        }
        if reference.contains("model.layers.0.self_attn.q_proj.bias") {
            for i in 0..2 {
                let want: Vec<f32> = ["q", "k", "v"]
                    .iter()
                    .flat_map(|p| {
                        reference
                            .f32(&format!("model.layers.{i}.self_attn.{p}_proj.bias"))
                            .unwrap()
                    })
                    .collect();
                assert_eq!(
                    g.f32(&format!("model.layers.{i}.attn.qkv_proj.Add.bias")),
                    want,
                    "{name}: layer {i} q/k/v biases"
                );
            }
        }
        if g.tensors.contains_key("model.embed_tokens.weight") {
            assert_eq!(
                g.f32("model.embed_tokens.weight"),
                reference.f32("model.embed_tokens.weight").unwrap(),
                "{name}: embedding table"
            );
        }
    }
}

#[test]
fn the_importers_dequantization_is_the_gguf_packages_bit_for_bit() {
    for &name in QUANTIZED.iter().chain(FLOAT) {
        let g = edgellm_export::gguf::Gguf::open(&dir(name).join("model.gguf")).unwrap();
        let model = edgellm_export::gguf::model::GgufModel::from_gguf(&g).unwrap();
        let names: Vec<String> = model.tensors.keys().cloned().collect();
        let ours = Checkpoint::from_gguf(g, &model);
        let reference = Checkpoint::open(&dir(name).join("reference")).unwrap();
        for t in names {
            let (a, b) = (ours.f32(&t).unwrap(), reference.f32(&t).unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(),
                "{name} {t}: the importer's dequantization differs from the gguf package's"
            );
        }
    }
}

#[derive(serde::Deserialize)]
struct SpmGolden {
    texts: Vec<SpmText>,
    chat_messages: Vec<SpmMessage>,
    chat_ids: Vec<u32>,
}
#[derive(serde::Deserialize)]
struct SpmText {
    text: String,
    ids: Vec<u32>,
}
#[derive(serde::Deserialize)]
struct SpmMessage {
    role: String,
    content: String,
}

/// The SentencePiece vocabulary is imported as llama.cpp tokenizes it: ids for every golden
/// text (special tokens parsed, BOS added; byte fallback for characters the vocabulary lacks;
/// `▁` before text that follows a special token), plain text decodes back to itself, and the
/// chat template renders to llama.cpp's ids. Merges derived in the wrong order, a missing byte
/// fallback or transformers' `Metaspace(prepend_scheme = first)` each fail some of them
/// (tests/fixtures/gguf/spm_q8_0/golden.json notes which differ under transformers).
#[test]
fn sentencepiece_vocabulary_tokenizes_as_llama_cpp() {
    let pkg = import("spm_q8_0", ExportOptions::default());
    let text = std::fs::read_to_string(dir("spm_q8_0").join("golden.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let spm: SpmGolden = serde_json::from_value(golden["spm_tokenizer"].clone()).unwrap();
    let model = edgellm::model::Model::load(&pkg.path().join("pkg")).unwrap();
    let tok = &model.tokenizer;
    let mut byte_fallback = false;
    for case in &spm.texts {
        let ids = tok.encode(&case.text, true).unwrap();
        assert_eq!(
            ids, case.ids,
            "{:?}: ids differ from llama.cpp's",
            case.text
        );
        byte_fallback |= ids
            .iter()
            .any(|&i| tok.id_to_token(i).is_some_and(|t| t.starts_with("<0x")));
        if !case.text.contains('<') {
            assert_eq!(tok.decode(&ids, true).unwrap(), case.text, "decode");
        }
    }
    assert!(byte_fallback, "the goldens exercise byte fallback");
    let messages = spm
        .chat_messages
        .iter()
        .map(|m| edgellm::chat::Message::new(m.role.clone(), m.content.clone()))
        .collect();
    let ids = model
        .prompt_ids(&edgellm::api::Input::Messages(messages), None)
        .unwrap();
    assert_eq!(ids, spm.chat_ids, "chat prompt ids differ from llama.cpp's");
}

/// The files llama.cpp's own converter wrote (tests/fixtures/gguf/make_converted_ggufs.py) and
/// the transformers goldens of their source checkpoints.
const CONVERTED: &[(&str, &str)] = &[
    ("gptoss_mxfp4", "gptoss"),
    ("llama3_rope", "gguf/llama3_rope"),
    ("phi3_longrope", "phi3-longrope"),
];

/// The converted files' tokenizers (the fixtures' vocabulary labelled `gpt-4o` for gpt-oss, as
/// gpt-oss files are, and `gpt-2` for the others) give llama.cpp's ids.
#[test]
fn converted_vocabularies_tokenize_as_llama_cpp() {
    for &(name, _) in CONVERTED {
        let pkg = import(name, fp32_logits_all());
        let text = std::fs::read_to_string(dir(name).join("golden.json")).unwrap();
        let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tok = edgellm::tokenizer::Tokenizer::load(&pkg.path().join("pkg")).unwrap();
        for case in golden["llama_tokenize_ids"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), want, "{name}: {text:?}");
        }
    }
}

fn fp32_logits_all() -> ExportOptions {
    ExportOptions {
        precision: Precision::Fp32,
        accuracy_level: 0,
        logits_all: true,
        ..Default::default()
    }
}

/// MXFP4 experts have no exact int4 form: the import refuses them by name unless asked to
/// re-quantize, and then writes exactly what the Hugging Face path writes from the released
/// MXFP4 checkpoint (the same dequantized values, quantized the same way): model.onnx and
/// model.onnx.data equal byte for byte.
#[test]
fn gptoss_int4_import_is_the_hugging_face_export() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = dir("gptoss_mxfp4").join("model.gguf");
    let opts = ExportOptions {
        max_length: Some(256),
        ..Default::default()
    };
    let err = edgellm_export::export_gguf(&gguf, &tmp.path().join("refused"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.0.ffn_gate_exps.weight (MXFP4)") && err.contains("--allow-requantize"),
        "{err}"
    );
    assert!(!tmp.path().join("refused").exists(), "no partial package");
    let imported = tmp.path().join("gguf");
    edgellm_export::export_gguf(
        &gguf,
        &imported,
        &ExportOptions {
            allow_requantize: true,
            ..opts.clone()
        },
    )
    .unwrap();
    let hf = tmp.path().join("hf");
    edgellm_export::export(
        &repo_root().join("tests/fixtures/gptoss/checkpoint"),
        &hf,
        &opts,
    )
    .unwrap();
    for f in ["model.onnx", "model.onnx.data"] {
        let (a, b) = (
            std::fs::read(imported.join(f)).unwrap(),
            std::fs::read(hf.join(f)).unwrap(),
        );
        assert!(
            a == b,
            "{f} differs between the GGUF import and the HF export"
        );
    }
    // The stop tokens llama.cpp derives from the vocabulary are the checkpoint's
    // generation_config ones.
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(imported.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["eos_token_id"], serde_json::json!([2, 5]));
}

/// f32 activations: the fp32 import of llama.cpp's file computes transformers' logits of the
/// original checkpoint, within the 1e-4 of the Hugging Face fp32 packages
/// (tests/tests/packages.rs), and its greedy continuation:
///
/// * `gptoss_mxfp4`: MXFP4 dequantized exactly, gate/up re-interleaved, sinks, YaRN with
///   gpt-oss's unrounded correction range, the sliding window on even layers;
/// * `llama3_rope`: Llama 3 scaling (factor 4, original context 40: 12 of 16 frequencies
///   divided by 4, 3 smoothed) read from `rope_freqs.weight`, not from metadata;
/// * `phi3_longrope`: LongRoPE's short factors and attention factor (1.19, on cos and sin) from
///   `rope_factors_short.weight` and `phi3.rope.scaling.attn_factor`.
fn converted_import_matches_transformers(name: &str, choice: BackendChoice) {
    let golden = CONVERTED.iter().find(|c| c.0 == name).unwrap().1;
    let pkg = import(name, fp32_logits_all());
    let golden = Golden::load(golden);
    let mut be = backend(pkg.path(), choice);
    let worst = worst_teacher_forced_diff(be.as_mut(), &golden);
    eprintln!("{name} on {choice:?}: max |logit - transformers| = {worst:.2e}");
    assert!(
        worst < 1e-4,
        "{name} on {choice:?}: logits differ by {worst}"
    );
    let out = greedy(be.as_mut(), &golden.prompt_ids, golden.greedy_ids.len());
    assert_eq!(out, golden.greedy_ids, "{name} on {choice:?}: greedy");
}

/// The largest |logit - golden| over the golden's teacher-forced positions, from an empty cache.
fn worst_teacher_forced_diff(be: &mut dyn Backend, golden: &Golden) -> f32 {
    be.reset();
    let rows = be.forward_all(&golden.teacher_forced_ids).unwrap().to_vec();
    let v = golden.vocab();
    (0..golden.teacher_forced_ids.len())
        .map(|i| max_abs_diff(&rows[i * v..(i + 1) * v], golden.row(i)))
        .fold(0f32, f32::max)
}

/// `(cos_cache, sin_cache)` of a package.
fn rope_caches(pkg: &Path) -> (Vec<f32>, Vec<f32>) {
    let g = Graph::read(pkg);
    (g.f32("cos_cache"), g.f32("sin_cache"))
}

/// The rope scaling llama.cpp's converter moved into tensors comes back as the checkpoint's:
/// the GGUF import's cos/sin caches equal those the Hugging Face export builds from the
/// checkpoint's config (up to the float32 rounding of the stored factors). For `phi3_longrope`
/// the caches run past the original 4096 positions, so the long factors
/// (`rope_factors_long.weight`), which no golden reaches, are compared too; `llama3_rope`'s
/// checkpoint is rebuilt from ../llama/checkpoint with the rope parameters recorded in its
/// golden.json.
#[test]
fn rope_tensors_give_the_hugging_face_rope_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir("llama3_rope").join("golden.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let llama3 = tmp.path().join("llama3_rope");
    std::fs::create_dir(&llama3).unwrap();
    for f in std::fs::read_dir(fixture_checkpoint("llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, llama3.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama3.join("config.json")).unwrap())
            .unwrap();
    cfg["rope_parameters"] = golden["hf_rope_parameters"].clone();
    std::fs::write(llama3.join("config.json"), cfg.to_string()).unwrap();
    for (name, hf, positions) in [
        ("llama3_rope", llama3, 256),
        (
            "phi3_longrope",
            fixture_checkpoint("phi3-longrope"),
            4096 + 128,
        ),
    ] {
        let opts = ExportOptions {
            max_length: Some(positions),
            ..fp32_logits_all()
        };
        let (a, b) = (
            tmp.path().join(format!("{name}-gguf")),
            tmp.path().join(format!("{name}-hf")),
        );
        edgellm_export::export_gguf(&dir(name).join("model.gguf"), &a, &opts).unwrap();
        edgellm_export::export(&hf, &b, &opts).unwrap();
        let ((cos, sin), (hf_cos, hf_sin)) = (rope_caches(&a), rope_caches(&b));
        assert_eq!(cos.len(), positions * 16, "{name}: cache size");
        let worst = max_abs_diff(&cos, &hf_cos).max(max_abs_diff(&sin, &hf_sin));
        eprintln!(
            "{name}: max |rope cache - Hugging Face export's| = {worst:.2e} ({positions} positions)"
        );
        // Angles are rounded to f32 (ulp 2.4e-4 near position 4096), and a factor stored as f32
        // can flip that rounding; a missing or wrong factor moves entries by > 0.1.
        assert!(worst < 1e-3, "{name}: rope caches differ by {worst}");
    }
}

fn backend(pkg: &Path, choice: BackendChoice) -> Box<dyn Backend> {
    let package = edgellm::package::Package::open(&pkg.join("pkg")).unwrap();
    let opts = BackendOptions {
        threads: 1,
        max_length: 256,
        prefill_chunk: 256,
        ..BackendOptions::default()
    };
    edgellm::backend::load(&package, choice, &opts)
        .unwrap_or_else(|e| panic!("{choice:?} loads the imported package: {e}"))
        .backend
}

/// f32 activations: the package computes transformers' model with the gguf package's weights.
/// The offset term and the blocked products sum in another order than a dense f32 GEMM, so the
/// logits differ by float rounding: measured at most ~2e-5 (logit std ~4); bound 1e-3. A wrong
/// nibble, scale, permutation or offset moves logits by > 0.1.
fn logits_match_transformers(choice: BackendChoice) {
    for &name in QUANTIZED.iter().chain(FLOAT) {
        let precision = if FLOAT.contains(&name) {
            Precision::Fp32
        } else {
            Precision::Int4
        };
        let pkg = import(
            name,
            ExportOptions {
                precision,
                accuracy_level: 0,
                logits_all: true,
                // q4_k's untied F16 embedding table stays float (quantized blocks are kept
                // exactly either way).
                embeddings: Precision::Fp32,
                ..Default::default()
            },
        );
        let golden = Golden::load(&format!("gguf/{name}"));
        let mut be = backend(pkg.path(), choice);
        let worst = worst_teacher_forced_diff(be.as_mut(), &golden);
        eprintln!("{name} on {choice:?}: max |logit - transformers| = {worst:.2e}");
        assert!(
            worst < 1e-3,
            "{name} on {choice:?}: logits differ by {worst}"
        );
        let out = greedy(be.as_mut(), &golden.prompt_ids, golden.greedy_ids.len());
        assert_eq!(out, golden.greedy_ids, "{name} on {choice:?}: greedy");
    }
}

/// The default import (int8 activations) runs on both backends and stays close: top-1 >= 85%
/// of the teacher-forced positions (the fixtures' random weights have near-ties among 512
/// tokens; RTN int4 alone reaches only 52-85% on them, tests/tests/packages.rs).
fn default_import_runs(choice: BackendChoice) {
    for &name in QUANTIZED {
        let pkg = import(
            name,
            ExportOptions {
                logits_all: true,
                ..Default::default()
            },
        );
        let golden = Golden::load(&format!("gguf/{name}"));
        let mut be = backend(pkg.path(), choice);
        be.reset();
        let rows = be.forward_all(&golden.teacher_forced_ids).unwrap().to_vec();
        let v = golden.vocab();
        let n = golden.teacher_forced_ids.len();
        let agree = (0..n)
            .filter(|&i| argmax(&rows[i * v..(i + 1) * v]) == argmax(golden.row(i)))
            .count() as f64
            / n as f64;
        eprintln!("{name} on {choice:?}, int8 activations: top-1 {agree:.3}");
        assert!(
            agree >= 0.85,
            "{name} on {choice:?}: top-1 agreement {agree}"
        );
    }
}

/// Each test body once per backend this build has (`mod ort`, `mod tract`).
macro_rules! on_both_backends {
    ($($name:ident => $body:expr;)*) => {
        #[cfg(feature = "ort")]
        mod ort {
            $(#[test]
            fn $name() {
                ($body)(edgellm::backend::BackendChoice::Ort);
            })*
        }
        #[cfg(feature = "tract")]
        mod tract {
            $(#[test]
            fn $name() {
                ($body)(edgellm::backend::BackendChoice::Tract);
            })*
        }
    };
}

on_both_backends! {
    imported_logits_and_greedy_match_transformers => super::logits_match_transformers;
    default_import_runs_with_int8_activations => super::default_import_runs;
    gptoss_import_matches_transformers =>
        |c| super::converted_import_matches_transformers("gptoss_mxfp4", c);
    llama3_rope_freqs_import_matches_transformers =>
        |c| super::converted_import_matches_transformers("llama3_rope", c);
    phi3_longrope_factors_import_matches_transformers =>
        |c| super::converted_import_matches_transformers("phi3_longrope", c);
}

/// LongRoPE against transformers itself (tests/fixtures/phi3-longrope/rope_golden.json): the
/// package's cos/sin caches equal transformers' rotary embedding with the short factors below
/// the original 4096 positions and with the long factors from there on (what transformers
/// computes once a sequence is longer than 4096), attention factor included. The tests' prompts
/// never reach 4096 tokens, so without this the long factors would go unchecked.
#[test]
fn longrope_caches_match_transformers_in_both_regimes() {
    let tmp = tempfile::tempdir().unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/phi3-longrope/rope_golden.json"))
            .unwrap(),
    )
    .unwrap();
    let pkg = tmp.path().join("pkg");
    edgellm_export::export(
        &fixture_checkpoint("phi3-longrope"),
        &pkg,
        &ExportOptions {
            max_length: Some(4096 + 64),
            ..fp32_logits_all()
        },
    )
    .unwrap();
    let (cos, sin) = rope_caches(&pkg);
    for regime in ["short", "long"] {
        let g = &golden[regime];
        let half = g["cos"][0].as_array().unwrap().len();
        let mut worst = 0f32;
        for (i, p) in g["positions"].as_array().unwrap().iter().enumerate() {
            let p = p.as_u64().unwrap() as usize;
            for (cache, key) in [(&cos, "cos"), (&sin, "sin")] {
                let want: Vec<f32> = serde_json::from_value(g[key][i].clone()).unwrap();
                worst = worst.max(max_abs_diff(&cache[p * half..(p + 1) * half], &want));
            }
        }
        eprintln!("LongRoPE {regime} factors: max |cache - transformers| = {worst:.2e}");
        // f32 angles (ulp ~2.4e-4 near position 4096) computed the same way; the other factor
        // set differs by > 0.1.
        assert!(worst < 1e-3, "{regime}: rope caches differ by {worst}");
    }
}
