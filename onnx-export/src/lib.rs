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
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            precision: Precision::Int4,
            embeddings: Precision::Fp32,
            block_size: 32,
            logits_all: false,
            max_length: None,
            force: false,
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

/// Exports the checkpoint in `hf` to a package folder `out`.
pub fn export(hf: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(16..=256).contains(&bs) {
        return Err(ExportError::InvalidOption(format!(
            "--block-size {bs}: must be a power of two between 16 and 256"
        )));
    }
    let mut spec = spec::ModelSpec::from_dir(hf)?;
    let max_length = opts.max_length.unwrap_or(spec.max_position);
    if max_length == 0 {
        return Err(ExportError::InvalidOption(
            "--max-length must be positive".into(),
        ));
    }
    let build = BuildOptions {
        precision: opts.precision,
        embeddings: opts.embeddings,
        block: bs,
        logits_all: opts.logits_all,
        max_length,
    };
    if !hf.join("tokenizer.json").exists() {
        return Err(ExportError::MissingFile {
            path: hf.join("tokenizer.json"),
            why: "Hugging Face tokenizers file; the package needs it to tokenize",
        });
    }
    let ck = checkpoint::Checkpoint::open(hf)?;
    spec.resolve(ck.contains("lm_head.weight"), max_length);
    let staging = package::Staging::new(out, opts.force)?;
    let data = onnx::DataFile::create(&staging.dir.join(onnx::DATA_FILE))?;
    let graph =
        decoder::DecoderBuilder::new(&spec, &ck, &build, onnx::GraphBuilder::new(data)).build()?;
    graph.finish(
        "main_graph",
        &staging.dir.join("model.onnx"),
        env!("CARGO_PKG_VERSION"),
    )?;
    package::write_json(
        &staging.dir.join("genai_config.json"),
        &package::genai_config(&spec, &build, spec.generation.as_ref()),
    )?;
    package::write_json(
        &staging.dir.join("edgellm.json"),
        &package::export_info(&spec, &build, &hf.display().to_string()),
    )?;
    package::copy_support_files(hf, &staging.dir)?;
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
