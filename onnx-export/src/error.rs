//! One error type for the exporter. Every variant names the file or tensor at fault and why, so
//! a user holding a checkpoint we have never seen can tell what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    // The io::Error is part of the message, not a `source`: `{:#}` (anyhow's chain, what the
    // CLI prints) would otherwise repeat it.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("copying {from} to {to}: {err}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        err: std::io::Error,
    },
    #[error("{path}: missing ({why})")]
    MissingFile { path: PathBuf, why: &'static str },
    #[error("{path}: invalid config: {msg}")]
    BadConfig { path: PathBuf, msg: String },
    #[error(
        "unsupported architecture {found:?}; supported: LlamaForCausalLM, MistralForCausalLM, \
         Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, GptOssForCausalLM"
    )]
    UnsupportedArchitecture { found: String },
    #[error(
        "unsupported RoPE scaling type {found:?}; supported: none, linear, llama3, yarn, longrope"
    )]
    UnsupportedRope { found: String },
    #[error("{path}: corrupt safetensors header: {msg}")]
    CorruptHeader { path: PathBuf, msg: String },
    #[error("tensor {name:?} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name:?}: unsupported dtype {dtype} (expected {expected})")]
    UnsupportedDtype {
        name: String,
        dtype: String,
        expected: &'static str,
    },
    #[error("tensor {name:?}: {msg}")]
    BadTensor { name: String, msg: String },
    #[error("{path}: {msg}")]
    BadGguf { path: PathBuf, msg: String },
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |err| ExportError::Io { path, err }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ExportError::BadConfig {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;
