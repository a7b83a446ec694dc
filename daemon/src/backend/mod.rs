//! The backend seam (DESIGN.md): the engine owns one backend on its own thread and feeds it
//! tokens; the backend owns the session and the KV cache. These are the only modules that
//! import `ort` or `tract`.

#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
pub mod tract;

use std::path::{Path, PathBuf};

use crate::package::Package;

/// Which runtime serves the package (`backend` in the config, `--backend` on the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// ONNX Runtime when its library loads and the session builds, else tract.
    #[default]
    Auto,
    Ort,
    Tract,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "ort" => Self::Ort,
            "tract" => Self::Tract,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ort => "ort",
            Self::Tract => "tract",
        }
    }
}

/// An ONNX Runtime execution provider (`[onnxruntime] execution_providers`, `--ep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    /// NVIDIA's CUDA provider (Jetson): registering it must succeed.
    Cuda,
}

impl ExecutionProvider {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// How a backend is built.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// `libonnxruntime.so`; `None`: see [`ort_library_candidates`].
    pub library: Option<PathBuf>,
    /// Intra-op threads; 0 = all cores.
    pub threads: usize,
    /// KV capacity in tokens (prompt + generated), clamped to the package's context length.
    pub max_length: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Let ONNX Runtime's worker threads spin between operators while a request runs. About
    /// 15% faster decoding on 2 cores (scripts/bench-vs-genai.sh); after the last step of a
    /// request the threads spin for some milliseconds and then park, so an idle process stays
    /// idle (measured: 0.03 s of CPU in the 10 s after a run, then nothing). `false` for devices
    /// where even that tail matters.
    pub allow_spinning: bool,
    /// ONNX Runtime execution providers (`[onnxruntime] execution_providers`): `cuda` is
    /// registered and must succeed (an ONNX Runtime without it is an error naming it); `cpu`
    /// is always there. tract runs on the CPU whatever this says.
    pub execution_providers: Vec<ExecutionProvider>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            library: None,
            threads: 0,
            max_length: 4096,
            prefill_chunk: PREFILL_CHUNK,
            allow_spinning: true,
            execution_providers: vec![ExecutionProvider::Cpu],
        }
    }
}

/// Prompt tokens per prefill step unless configured ([`BackendOptions::prefill_chunk`]); also
/// the step size of the engine's teacher-forced runs, which bounds one step's attention scratch.
pub const PREFILL_CHUNK: usize = 256;

/// Where to look for ONNX Runtime, in order: the configured path; `ORT_DYLIB_PATH`; the folder
/// `scripts/fetch-onnxruntime.sh` fills (`.onnxruntime/<version>/`), searched upwards from the
/// executable and from the working directory; the system library (`libonnxruntime.so`, then
/// `libonnxruntime.so.1`, on the loader's search path).
pub fn ort_library_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured.filter(|p| !p.as_os_str().is_empty()) {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let fetched = Path::new(".onnxruntime")
        .join(ORT_VERSION)
        .join("libonnxruntime.so");
    let mut out = Vec::new();
    let starts = [
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
        std::env::current_dir().ok(),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let c = dir.join(&fetched);
            if c.exists() && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    // The development symlink, then the runtime soname (what distribution and Yocto packages
    // install without their -dev package).
    out.push(PathBuf::from("libonnxruntime.so"));
    out.push(PathBuf::from("libonnxruntime.so.1"));
    out
}

/// The ONNX Runtime release `scripts/fetch-onnxruntime.sh` fetches and CI tests.
pub const ORT_VERSION: &str = "1.31.1";
/// The oldest ONNX Runtime the backend can use (`ort`'s `api-22` feature): older libraries are
/// refused with their version named.
pub const ORT_MIN_VERSION: &str = "1.22";

/// A built backend and why it was chosen.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub reason: Reason,
}

/// Why a backend serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `ort` or `tract` was asked for.
    Configured,
    /// `auto`, and ONNX Runtime loaded and built the session.
    AutoOrt,
    /// `auto`, and ONNX Runtime could not serve (the error): tract serves instead.
    Fallback(String),
}

impl std::fmt::Display for Reason {
    /// The one-line form the D-Bus `BackendReason` property and the MQTT status carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Configured => f.write_str("configured"),
            Reason::AutoOrt => f.write_str("auto: ONNX Runtime runs the package"),
            Reason::Fallback(e) => write!(f, "auto: ONNX Runtime cannot serve the package ({e})"),
        }
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("backend", &self.backend.name())
            .field("reason", &self.reason)
            .finish()
    }
}

/// Builds the backend `choice` asks for. `Auto` uses ONNX Runtime when its library loads and
/// the session builds, otherwise tract, and says why in [`Loaded::reason`].
pub fn load(
    pkg: &Package,
    choice: BackendChoice,
    opts: &BackendOptions,
) -> Result<Loaded, BackendError> {
    let configured = |backend| Loaded {
        backend,
        reason: Reason::Configured,
    };
    match choice {
        BackendChoice::Ort => Ok(configured(load_ort(pkg, opts)?)),
        BackendChoice::Tract => Ok(configured(load_tract(pkg, opts)?)),
        BackendChoice::Auto => match load_ort(pkg, opts) {
            Ok(backend) => Ok(Loaded {
                backend,
                reason: Reason::AutoOrt,
            }),
            // A package that is broken for both is reported as such, not as an ORT problem.
            Err(e @ BackendError::Package(_)) => Err(e),
            Err(ort_error) => {
                let reason = Reason::Fallback(ort_error.to_string());
                match load_tract(pkg, opts) {
                    Ok(backend) => Ok(Loaded { backend, reason }),
                    Err(tract_error) => Err(BackendError::Unsupported(format!(
                        "no backend can serve the package: ONNX Runtime: {ort_error}; tract: {tract_error}"
                    ))),
                }
            }
        },
    }
}

#[cfg(feature = "tract")]
fn load_tract(pkg: &Package, opts: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(tract::TractBackend::load(pkg, opts)?))
}

#[cfg(not(feature = "tract"))]
fn load_tract(_: &Package, _: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Err(BackendError::Unsupported(
        "this build has no tract backend (feature `tract`)".into(),
    ))
}

#[cfg(feature = "ort")]
fn load_ort(pkg: &Package, opts: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(ort::OrtBackend::load(pkg, opts)?))
}

#[cfg(not(feature = "ort"))]
fn load_ort(_: &Package, _: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Err(BackendError::Unsupported(
        "this build has no ONNX Runtime backend (feature `ort`)".into(),
    ))
}

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

/// Checks a step of `tokens` appended at `pos` against the KV capacity and the vocabulary;
/// returns the sequence length after it. Shared by the backends.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn check_step(
    pos: usize,
    tokens: &[u32],
    max_length: usize,
    vocab: usize,
) -> Result<usize, BackendError> {
    let total = pos + tokens.len();
    if total > max_length {
        return Err(BackendError::ContextFull {
            needed: total,
            capacity: max_length,
        });
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(BackendError::BadToken { id, vocab });
    }
    Ok(total)
}

/// [`Backend::forward`] for backends that run prompts in chunks of `chunk` tokens through
/// `forward_all`: the last row of the last chunk's logits.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn forward_in_chunks<'a, B: Backend + ?Sized>(
    backend: &'a mut B,
    tokens: &[u32],
    chunk: usize,
    vocab: usize,
) -> Result<&'a [f32], BackendError> {
    let mut chunks = tokens.chunks(chunk.max(1));
    let last = chunks
        .next_back()
        .ok_or_else(|| BackendError::Unsupported("forward() needs at least one token".into()))?;
    for c in chunks {
        backend.forward_all(c)?;
    }
    let rows = backend.forward_all(last)?;
    Ok(&rows[rows.len() - vocab..])
}

/// A copy of a backend's KV cache at one position ([`Backend::snapshot`]), to resume from
/// later with [`Backend::restore`]: a prefix computed once (a system prompt) and kept, in
/// memory and, with `[model] prefix_cache_dir`, in a file (`crate::prefix_cache`).
#[derive(Debug, Clone, PartialEq)]
pub struct KvSnapshot {
    /// The backend that made it (`ort`, `tract`): only that backend reads it back.
    pub backend: String,
    /// Tokens the cache held.
    pub pos: usize,
    /// The rows, in the backend's own order and shapes; [`Backend::restore`] checks every
    /// shape against its cache before copying anything.
    pub parts: Vec<KvPart>,
}

/// One block of cache rows: its shape and its f32 values (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct KvPart {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl KvSnapshot {
    /// Bytes of rows held.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.data.len() * 4).sum()
    }
}

pub trait Backend: Send {
    /// `"ort"` or `"tract"`.
    fn name(&self) -> &'static str;
    /// Forget the sequence, KV cache included.
    fn reset(&mut self);
    /// Keeps the first `len` tokens of the sequence (and their keys and values) and forgets
    /// the rest, so the next forward continues at position `len`: a request that shares a
    /// prefix with the previous sequence computes only what follows it. `false` when the cache
    /// can no longer serve position `len` (a sliding-window layer has dropped rows the window
    /// there needs, or `len` is past the sequence); the cache is then unchanged.
    fn rewind(&mut self, len: usize) -> bool;
    /// A copy of the cache as it is now: every row a later step could read (for a
    /// sliding-window layer, its whole buffer). `None`: this backend cannot.
    fn snapshot(&mut self) -> Option<KvSnapshot> {
        None
    }
    /// Puts the cache back as [`Backend::snapshot`] copied it; `false` (cache unchanged) for a
    /// snapshot this backend did not make.
    fn restore(&mut self, _snapshot: &KvSnapshot) -> bool {
        false
    }
    /// Appends `tokens` to the sequence and returns the logits (`[vocab]`) of the last one.
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError>;
    /// Appends `tokens` in one step (no chunking) and returns the logits of every position the
    /// graph reports: `[S, vocab]` for packages exported with `--logits all`, `[1, vocab]`
    /// otherwise. For tests and tools that compare whole sequences.
    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        self.forward(tokens)
    }

    /// Continuous batching: allocates up to `n` slots, each a KV cache of its own that
    /// [`Backend::decode_slots`] advances together, one token per slot per graph run. Returns
    /// how many slots there are: 0 when this backend (or this package) runs one sequence at a
    /// time, with the reason.
    fn enable_slots(&mut self, _n: usize) -> Result<usize, String> {
        Err(format!(
            "the {} backend runs one sequence at a time",
            self.name()
        ))
    }

    /// Copies the sequence the single cache holds (prefilled through [`Backend::forward`]) into
    /// slot `slot`, which then continues from it.
    fn store_slot(&mut self, _slot: usize) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("no slots".into()))
    }

    /// One graph run over every slot: `tokens[i]` is appended to slot `i` (`None`: an idle
    /// slot, whose cache is left meaningless). Returns `[slots, vocab]` logits, row `i` for
    /// slot `i`.
    fn decode_slots(&mut self, _tokens: &[Option<u32>]) -> Result<&[f32], BackendError> {
        Err(BackendError::Unsupported("no slots".into()))
    }
}
