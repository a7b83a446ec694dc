//! The model package folder (DESIGN.md, "The model package"): `genai_config.json` in the
//! schema onnxruntime-genai parses (no extra keys: its parser rejects unknown ones), tokenizer
//! and config files copied from the checkpoint, `edgellm.json` (how the package was made), and
//! `SHA256SUMS` over every other file. Written into a temporary sibling folder and renamed into
//! place at the end, so a failed export leaves nothing behind.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::decoder::{BuildOptions, Precision};
use crate::error::{ExportError, Result};
use crate::spec::ModelSpec;

/// Files copied verbatim from the checkpoint when present. `tokenizer.json` is required.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
];

/// A temporary folder next to the destination; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    pub dir: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn new(dest: &Path, force: bool) -> Result<Self> {
        if dest.exists() {
            let empty = dest.is_dir()
                && fs::read_dir(dest)
                    .map_err(ExportError::io(dest))?
                    .next()
                    .is_none();
            if !empty && !force {
                return Err(ExportError::InvalidOption(format!(
                    "output {} already exists (pass --force to replace it)",
                    dest.display()
                )));
            }
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(ExportError::io(&parent))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "package".into());
        let dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(ExportError::io(&dir))?;
        }
        fs::create_dir(&dir).map_err(ExportError::io(&dir))?;
        Ok(Staging {
            dir,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest).map_err(ExportError::io(&self.dest))?;
        }
        fs::rename(&self.dir, &self.dest).map_err(ExportError::io(&self.dest))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn id_value(ids: &[u32]) -> Value {
    match ids {
        [one] => json!(one),
        many => json!(many),
    }
}

/// genai_config.json for a package built with `opts`.
pub fn genai_config(spec: &ModelSpec, opts: &BuildOptions, gen_cfg: Option<&Value>) -> Value {
    let mut decoder = json!({
        "session_options": { "log_id": "onnxruntime-genai", "provider_options": [] },
        "filename": "model.onnx",
        "head_size": spec.head_dim,
        "hidden_size": spec.hidden,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value"
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value"
        },
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads
    });
    if let Some(w) = spec.window() {
        let layers: Vec<usize> = (0..spec.layers)
            .filter(|&i| spec.windows[i].is_some())
            .collect();
        decoder["sliding_window"] = json!({
            "window_size": w,
            "slide_key_value_cache": false,
            "slide_inputs": false,
            "layers": layers,
            "cache_slack": 0
        });
    }
    let g = |k: &str| gen_cfg.and_then(|c| c.get(k)).cloned();
    let eos = if spec.eos.is_empty() {
        vec![0]
    } else {
        spec.eos.clone()
    };
    json!({
        "model": {
            "bos_token_id": spec.bos.unwrap_or(1),
            "context_length": opts.max_length,
            "decoder": decoder,
            "eos_token_id": id_value(&eos),
            "pad_token_id": spec.pad.unwrap_or(eos[0]),
            "type": spec.arch.genai_type(),
            "vocab_size": spec.vocab
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": g("do_sample").unwrap_or(json!(false)),
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": opts.max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": true,
            "repetition_penalty": g("repetition_penalty").unwrap_or(json!(1.0)),
            "temperature": g("temperature").unwrap_or(json!(1.0)),
            "top_k": g("top_k").unwrap_or(json!(50)),
            "top_p": g("top_p").unwrap_or(json!(1.0))
        }
    })
}

/// `edgellm.json`: provenance of the package (not read by onnxruntime-genai).
pub fn export_info(spec: &ModelSpec, opts: &BuildOptions, source: &str) -> Value {
    let p = |p: Precision| p.name();
    json!({
        "exporter": format!("edgellm-export {}", env!("CARGO_PKG_VERSION")),
        "source": source,
        "architecture": spec.arch.hf_name(),
        "precision": p(opts.precision),
        "embeddings": p(opts.embeddings),
        "block_size": opts.block,
        "quant": opts.quant.name(),
        "gguf_blocks_kept": opts.native,
        "accuracy_level": opts.accuracy_level,
        "logits": if opts.logits_all { "all" } else { "last" },
        "max_length": opts.max_length,
        "tied_embeddings": spec.tied(),
    })
}

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("a serde_json::Value always serializes");
    fs::write(path, text + "\n").map_err(ExportError::io(path))
}

/// Copies tokenizer and config files. `tokenizer.json` must exist.
pub fn copy_support_files(src: &Path, dest: &Path) -> Result<()> {
    let tok = src.join("tokenizer.json");
    if !tok.exists() {
        return Err(ExportError::MissingFile {
            path: tok,
            why: "Hugging Face tokenizers file; the package needs it to tokenize",
        });
    }
    for name in COPIED_FILES {
        let from = src.join(name);
        if from.exists() {
            let to = dest.join(name);
            fs::copy(&from, &to).map_err(|err| ExportError::Copy {
                from: from.clone(),
                to: to.clone(),
                err,
            })?;
        }
    }
    Ok(())
}

/// Writes `SHA256SUMS` (`sha256sum` format, sorted by name) over every other file in `dir`.
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(ExportError::io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "SHA256SUMS")
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let path = dir.join(&name);
        let mut f = fs::File::open(&path).map_err(ExportError::io(&path))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(ExportError::io(&path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!("{digest}  {name}\n"));
    }
    let path = dir.join("SHA256SUMS");
    fs::write(&path, out).map_err(ExportError::io(&path))
}
