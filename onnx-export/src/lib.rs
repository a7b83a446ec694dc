//! edgellm-export: a Hugging Face checkpoint -> an int4 (or fp32) ONNX model package in the
//! layout of onnxruntime-genai's model builder, without Python, streaming tensor by tensor.
//!
//! # Layout
//! In the order an export runs:
//! - [`spec`]: `config.json` (+ `generation_config.json`) -> a resolved [`spec::ModelSpec`].
//! - [`checkpoint`]: memory-mapped safetensors (single file or sharded), f32 row chunks on demand.
//! - [`decoder`]: the graph, layer by layer, pulling each weight from the checkpoint, encoding it
//!   ([`quant`], [`rope`]) and appending it to `model.onnx.data` ([`onnx`]) before the next.
//! - [`package`]: genai_config.json, tokenizer files, SHA256SUMS, atomic rename into place.
//! - [`random_init`]: deterministic random checkpoints of real model shapes, in HF layout.

pub mod checkpoint;
pub mod decoder;
pub mod error;
pub mod gguf;
pub mod onnx;
pub mod package;
pub mod quant;
pub mod random_init;
pub mod rope;
pub mod spec;

use std::path::{Path, PathBuf};

pub use decoder::{BuildOptions, Precision};
pub use error::{ExportError, Result};

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub precision: Precision,
    pub embeddings: Precision,
    pub block_size: usize,
    pub logits_all: bool,
    /// RoPE cache rows and genai `max_length`; default: the model's max_position_embeddings.
    pub max_length: Option<usize>,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// How float weights are quantized (`--quant`).
    pub quant: quant::Scheme,
    /// `MatMulNBits` accuracy level (4: int8 activations; 0: f32 activations).
    pub accuracy_level: i64,
    /// GGUF: dequantize and re-quantize tensors whose type has no exact form.
    pub allow_requantize: bool,
    /// GGUF: dequantize and re-quantize every tensor with `quant` (as if the file held floats).
    pub requantize: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            precision: Precision::Int4,
            // With `quant` offset the best size/quality point measured (docs/export-models.md §5).
            embeddings: Precision::Int4,
            block_size: 32,
            logits_all: false,
            max_length: None,
            force: false,
            quant: quant::Scheme::default(),
            accuracy_level: 4,
            allow_requantize: false,
            requantize: false,
        }
    }
}

#[derive(Debug)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub architecture: &'static str,
    pub layers: usize,
    pub data_bytes: u64,
}

fn check_options(opts: &ExportOptions) -> Result<()> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(16..=256).contains(&bs) {
        return Err(ExportError::InvalidOption(format!(
            "--block-size {bs}: must be a power of two between 16 and 256"
        )));
    }
    if opts.precision == Precision::Int8 {
        return Err(ExportError::InvalidOption(
            "--precision int8 is not supported (--embeddings int8 makes the embedding table and \
             the lm_head 8-bit)"
                .into(),
        ));
    }
    if ![0, 1, 2, 3, 4].contains(&opts.accuracy_level) {
        return Err(ExportError::InvalidOption(format!(
            "--accuracy-level {}: must be 0 to 4",
            opts.accuracy_level
        )));
    }
    Ok(())
}

fn build_options(
    spec: &spec::ModelSpec,
    opts: &ExportOptions,
    native: bool,
) -> Result<BuildOptions> {
    let max_length = opts.max_length.unwrap_or(spec.max_position);
    if max_length == 0 {
        return Err(ExportError::InvalidOption(
            "--max-length must be positive".into(),
        ));
    }
    Ok(BuildOptions {
        precision: opts.precision,
        // An fp32 package is float throughout (parity checks against the reference).
        embeddings: match opts.precision {
            Precision::Fp32 => Precision::Fp32,
            _ => opts.embeddings,
        },
        block: opts.block_size,
        logits_all: opts.logits_all,
        max_length,
        quant: opts.quant,
        accuracy_level: opts.accuracy_level,
        native: native && !opts.requantize,
        allow_requantize: opts.allow_requantize || opts.requantize,
    })
}

/// Exports the checkpoint in `hf` to a package folder `out`.
pub fn export(hf: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    check_options(opts)?;
    let mut spec = spec::ModelSpec::from_dir(hf)?;
    let build = build_options(&spec, opts, false)?;
    if !hf.join("tokenizer.json").exists() {
        return Err(ExportError::MissingFile {
            path: hf.join("tokenizer.json"),
            why: "Hugging Face tokenizers file; the package needs it to tokenize",
        });
    }
    let ck = checkpoint::Checkpoint::open(hf)?;
    spec.resolve(ck.contains("lm_head.weight"), build.max_length);
    let staging = package::Staging::new(out, opts.force)?;
    package::copy_support_files(hf, &staging.dir)?;
    write_package(staging, &spec, &ck, &build, &hf.display().to_string())
}

/// Exports a GGUF file (llama.cpp's format) to a package folder `out`: the metadata becomes
/// config.json and the tokenizer files, the tensors keep their quantized blocks where an exact
/// form exists (see [`gguf::blocks`]).
pub fn export_gguf(file: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    check_options(opts)?;
    let bad = |msg: String| ExportError::BadGguf {
        path: file.to_path_buf(),
        msg,
    };
    let g =
        gguf::Gguf::open(file).map_err(|e| bad(format!("not a usable GGUF file: {}", e.msg)))?;
    let model = gguf::model::GgufModel::from_gguf(&g).map_err(bad)?;
    let tok = gguf::vocab::tokenizer_files(&g).map_err(bad)?;
    let mut spec = spec::ModelSpec::from_json(&model.config, Some(&model.generation), file)?;
    if let Some(f) = &model.rope_freqs {
        spec.rope.scaling = spec::RopeScaling::Factors(f.clone());
    }
    spec.generation = Some(model.generation.clone());
    let build = build_options(&spec, opts, true)?;
    spec.resolve(
        model.tensors.contains_key("lm_head.weight"),
        build.max_length,
    );
    let ck = checkpoint::Checkpoint::from_gguf(g, &model);
    let staging = package::Staging::new(out, opts.force)?;
    let dir = &staging.dir;
    package::write_json(&dir.join("config.json"), &model.config)?;
    package::write_json(&dir.join("generation_config.json"), &model.generation)?;
    package::write_json(&dir.join("tokenizer.json"), &tok.tokenizer_json)?;
    package::write_json(&dir.join("tokenizer_config.json"), &tok.tokenizer_config)?;
    if let Some(t) = &tok.chat_template {
        let path = dir.join("chat_template.jinja");
        std::fs::write(&path, t).map_err(ExportError::io(&path))?;
    }
    write_package(staging, &spec, &ck, &build, &file.display().to_string())
}

/// The graph, genai_config.json, edgellm.json and SHA256SUMS into `staging` (which already
/// holds the tokenizer and config files), then the rename into place.
fn write_package(
    staging: package::Staging,
    spec: &spec::ModelSpec,
    ck: &checkpoint::Checkpoint,
    build: &BuildOptions,
    source: &str,
) -> Result<ExportSummary> {
    let data = onnx::DataFile::create(&staging.dir.join(onnx::DATA_FILE))?;
    let graph =
        decoder::DecoderBuilder::new(spec, ck, build, onnx::GraphBuilder::new(data)).build()?;
    graph.finish(
        "main_graph",
        &staging.dir.join("model.onnx"),
        env!("CARGO_PKG_VERSION"),
    )?;
    package::write_json(
        &staging.dir.join("genai_config.json"),
        &package::genai_config(spec, build, spec.generation.as_ref()),
    )?;
    package::write_json(
        &staging.dir.join("edgellm.json"),
        &package::export_info(spec, build, source),
    )?;
    package::write_checksums(&staging.dir)?;
    let data_bytes = std::fs::metadata(staging.dir.join(onnx::DATA_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let out = staging.commit()?;
    Ok(ExportSummary {
        out,
        architecture: spec.arch.hf_name(),
        layers: spec.layers,
        data_bytes,
    })
}
