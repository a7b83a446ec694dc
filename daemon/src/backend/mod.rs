//! The backend seam (DESIGN.md): the engine owns one backend on its own thread and feeds it
//! tokens; the backend owns the session and the KV cache. These are the only modules that
//! import `ort` or `tract`.

#[cfg(feature = "ort")]
pub mod ort;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("ONNX Runtime library {path}: {msg}")]
    Library { path: PathBuf, msg: String },
    #[error(transparent)]
    Package(#[from] crate::package::PackageError),
    #[error("{context}: {msg}")]
    Runtime { context: String, msg: String },
    #[error("sequence of {needed} tokens exceeds the KV cache capacity of {capacity} (max_length)")]
    ContextFull { needed: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("{0}")]
    Unsupported(String),
}

pub trait Backend: Send {
    /// `"ort"` or `"tract"`.
    fn name(&self) -> &'static str;
    /// Forget the sequence, KV cache included.
    fn reset(&mut self);
    /// Appends `tokens` to the sequence and returns the logits (`[vocab]`) of the last one.
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError>;
}
