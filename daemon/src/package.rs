//! A model package (DESIGN.md, "The model package"): the folder `edgellm-export` or
//! onnxruntime-genai's builder writes. This module reads `genai_config.json`, verifies
//! `SHA256SUMS` when present, and derives the KV-cache layout every backend allocates.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: missing (a model package needs it)")]
    Missing { path: PathBuf },
    #[error("{path}: invalid genai_config.json: {msg}")]
    BadConfig { path: PathBuf, msg: String },
    #[error("{path}: unsupported model.type {found:?} (supported: {supported})")]
    UnsupportedType {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error(
        "{path}: checksum mismatch (SHA256SUMS says {expected}, file has {found}); the package is corrupt"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

pub const SUPPORTED_TYPES: &str = "llama, mistral, qwen2, qwen3, phi3, gptoss";

#[derive(Debug, Clone, Deserialize)]
pub struct GenaiConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub search: SearchSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSection {
    #[serde(rename = "type")]
    pub model_type: String,
    pub context_length: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub decoder: DecoderSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSection {
    pub filename: String,
    pub head_size: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_hidden_layers: usize,
    pub inputs: IoNames,
    pub outputs: IoNames,
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
}

/// Graph I/O names; `%d` in the KV names is the layer index.
#[derive(Debug, Clone, Deserialize)]
pub struct IoNames {
    #[serde(default)]
    pub input_ids: Option<String>,
    #[serde(default)]
    pub attention_mask: Option<String>,
    #[serde(default)]
    pub position_ids: Option<String>,
    #[serde(default)]
    pub past_key_names: Option<String>,
    #[serde(default)]
    pub past_value_names: Option<String>,
    #[serde(default)]
    pub logits: Option<String>,
    #[serde(default)]
    pub present_key_names: Option<String>,
    #[serde(default)]
    pub present_value_names: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SlidingWindow {
    pub window_size: usize,
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    #[serde(default)]
    pub cache_slack: usize,
}

/// Generation defaults (onnxruntime-genai's `search`); used when a request leaves them unset.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SearchSection {
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    })
}

/// Per-layer KV buffer capacity (positions): `max_length` for full-attention layers, window +
/// slack (16 when the package says 0, as onnxruntime-genai's CPU runtime does) for windowed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: Vec<usize>,
    pub max_length: usize,
}

impl KvLayout {
    /// Bytes of the whole KV cache (f32 keys and values of every layer at its capacity): what
    /// a backend allocates up front.
    pub fn total_bytes(&self) -> u64 {
        self.capacity
            .iter()
            .map(|&c| 2 * (self.kv_heads * self.head_dim * 4) as u64 * c as u64)
            .sum()
    }

    /// Bytes of KV cache per token position in full-attention layers (f32 K and V).
    pub fn bytes_per_token(&self) -> usize {
        let full = self
            .capacity
            .iter()
            .filter(|&&c| c == self.max_length)
            .count();
        full * 2 * self.kv_heads * self.head_dim * 4
    }
}

/// `name` as a path inside `dir`, if it is a relative path of plain components (no `..`, no
/// root): the files a package names (its graph, its checksum list's entries) must not reach
/// outside it (a downloaded package is untrusted input; the `package_config` fuzz target
/// checks it).
fn file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    plain.then(|| dir.join(rel))
}

#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub config: GenaiConfig,
}

impl Package {
    /// Opens a package folder: parses `genai_config.json`, checks the model type and that the
    /// graph file exists, and verifies `SHA256SUMS` when present.
    pub fn open(dir: &Path) -> Result<Self, PackageError> {
        let path = dir.join("genai_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PackageError::Missing { path: path.clone() }
            } else {
                PackageError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let config: GenaiConfig =
            serde_json::from_str(&text).map_err(|e| PackageError::BadConfig {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let known = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gptoss"];
        if !known.contains(&config.model.model_type.as_str()) {
            return Err(PackageError::UnsupportedType {
                path,
                found: config.model.model_type.clone(),
                supported: SUPPORTED_TYPES,
            });
        }
        let graph = file_in(dir, &config.model.decoder.filename).ok_or_else(|| {
            PackageError::BadConfig {
                path: path.clone(),
                msg: format!(
                    "model.decoder.filename {:?} is not a file name inside the package",
                    config.model.decoder.filename
                ),
            }
        })?;
        if !graph.exists() {
            return Err(PackageError::Missing { path: graph });
        }
        let pkg = Package {
            dir: dir.to_path_buf(),
            config,
        };
        pkg.verify_checksums()?;
        Ok(pkg)
    }

    pub fn graph_path(&self) -> PathBuf {
        self.dir.join(&self.config.model.decoder.filename)
    }

    /// Checks every file listed in `SHA256SUMS`, if the package has one.
    pub fn verify_checksums(&self) -> Result<(), PackageError> {
        let sums = self.dir.join("SHA256SUMS");
        let Ok(text) = std::fs::read_to_string(&sums) else {
            return Ok(());
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (expected, name) =
                line.split_once("  ")
                    .ok_or_else(|| PackageError::BadConfig {
                        path: sums.clone(),
                        msg: format!("malformed line {line:?}"),
                    })?;
            let name = name.trim_start_matches('*');
            let path = file_in(&self.dir, name).ok_or_else(|| PackageError::BadConfig {
                path: sums.clone(),
                msg: format!("{name:?} is not a file name inside the package"),
            })?;
            let found = sha256_file(&path)?;
            if found != expected {
                return Err(PackageError::Checksum {
                    path,
                    expected: expected.to_string(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// The KV layout for a session serving sequences up to `max_length` tokens (clamped to the
    /// package's context length; the model's 128k default is never used implicitly).
    pub fn kv_layout(&self, max_length: usize) -> KvLayout {
        let d = &self.config.model.decoder;
        let max_length = max_length.min(self.config.model.context_length).max(1);
        let capacity = (0..d.num_hidden_layers)
            .map(|i| match &d.sliding_window {
                Some(w) if w.layers.as_ref().is_none_or(|l| l.contains(&i)) => {
                    let slack = if w.cache_slack == 0 {
                        16
                    } else {
                        w.cache_slack
                    };
                    (w.window_size + slack).min(max_length.max(w.window_size))
                }
                _ => max_length,
            })
            .collect();
        KvLayout {
            kv_heads: d.num_key_value_heads,
            head_dim: d.head_size,
            capacity,
            max_length,
        }
    }
}

fn sha256_file(path: &Path) -> Result<String, PackageError> {
    let io = |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package whose genai_config.json names `graph` and whose SHA256SUMS lists `listed`.
    fn package(graph: &str, listed: &str) -> (tempfile::TempDir, Result<Package, PackageError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/genai-qwen2/package/genai_config.json"),
        )
        .expect("the fixture's genai_config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&cfg).expect("JSON");
        cfg["model"]["decoder"]["filename"] = graph.into();
        std::fs::write(dir.path().join("genai_config.json"), cfg.to_string()).expect("write");
        std::fs::write(dir.path().join("model.onnx"), b"graph").expect("write");
        let sum = sha256_file(&dir.path().join("model.onnx")).expect("hash");
        std::fs::write(dir.path().join("SHA256SUMS"), format!("{sum}  {listed}\n")).expect("write");
        let opened = Package::open(dir.path());
        (dir, opened)
    }

    #[test]
    fn files_a_package_names_stay_inside_it() {
        let (_d, ok) = package("model.onnx", "model.onnx");
        ok.expect("a plain package opens");
        for graph in ["/etc/hostname", "../model.onnx", "", "a/../../model.onnx"] {
            let e = package(graph, "model.onnx").1.expect_err(graph).to_string();
            assert!(
                e.contains("not a file name inside the package"),
                "{graph}: {e}"
            );
        }
        for listed in ["/etc/hostname", "../x", "*../x"] {
            let e = package("model.onnx", listed)
                .1
                .expect_err(listed)
                .to_string();
            assert!(
                e.contains("not a file name inside the package"),
                "{listed}: {e}"
            );
        }
    }
}
