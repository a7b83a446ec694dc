//! Shared by the engine and scheduler tests: a backend whose logits are scripted, so the model
//! "says" exactly the tokens under test, and packages exported from the committed fixtures.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of this

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use edgellm::backend::{Backend, BackendError};

/// Emits `script` one token per forward (one-hot logits), then repeats its last token;
/// each forward takes `delay`.
pub struct Scripted {
    pub script: Vec<u32>,
    pub step: usize,
    pub logits: Vec<f32>,
    pub delay: Duration,
}

impl Scripted {
    pub fn new(script: Vec<u32>, vocab: usize, delay: Duration) -> Self {
        Scripted {
            script,
            step: 0,
            logits: vec![0.0; vocab],
            delay,
        }
    }
}

impl Backend for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn reset(&mut self) {
        self.step = 0;
    }
    /// No cache to keep: every request starts the script over.
    fn rewind(&mut self, _len: usize) -> bool {
        false
    }
    fn forward(&mut self, _tokens: &[u32]) -> Result<&[f32], BackendError> {
        std::thread::sleep(self.delay);
        let id = self.script[self.step.min(self.script.len() - 1)];
        self.step += 1;
        self.logits.fill(0.0);
        self.logits[id as usize] = 10.0;
        Ok(&self.logits)
    }
}

/// A model that "says" a text, whatever tokens it takes: after the prompt (the first
/// forward), each forward puts the highest logit on the longest token that continues the
/// script from what was fed so far (a shorter one next, and so on), so a grammar that masks
/// the longest one, or forces tokens of its own, still gets the script's text. Past the end
/// of the script, or once what was fed left it, it says `fallback`.
pub struct ScriptedText {
    pub script: Vec<u8>,
    /// Each id's text, special tokens as written.
    pub vocab: Vec<Vec<u8>>,
    pub fed: Vec<u8>,
    pub started: bool,
    pub fallback: u32,
    pub logits: Vec<f32>,
}

impl ScriptedText {
    pub fn new(model: &edgellm::model::Model, script: &str, fallback: u32) -> Self {
        let n = model.package.config.model.vocab_size;
        let vocab = (0..n as u32)
            .map(|id| model.tokenizer.decode(&[id], false).unwrap().into_bytes())
            .collect();
        ScriptedText {
            script: script.as_bytes().to_vec(),
            vocab,
            fed: Vec::new(),
            started: false,
            fallback,
            logits: vec![0.0; n],
        }
    }
}

impl Backend for ScriptedText {
    fn name(&self) -> &'static str {
        "scripted-text"
    }
    fn reset(&mut self) {
        self.started = false;
        self.fed.clear();
    }
    fn rewind(&mut self, _len: usize) -> bool {
        false
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        if self.started {
            for &t in tokens {
                self.fed.extend_from_slice(&self.vocab[t as usize]);
            }
        }
        self.started = true;
        self.logits.fill(0.0);
        self.logits[self.fallback as usize] = 0.5;
        if let Some(rest) = self.script.strip_prefix(self.fed.as_slice()) {
            for (id, bytes) in self.vocab.iter().enumerate() {
                if !bytes.is_empty() && rest.starts_with(bytes) {
                    self.logits[id] = 1.0 + bytes.len() as f32;
                }
            }
        }
        Ok(&self.logits)
    }
}

/// Runs `req` to its end: the completion, the streamed answer text and the streamed reasoning.
pub fn collect(
    engine: &mut edgellm::engine::Engine,
    req: &edgellm::api::Request,
) -> (edgellm::api::Completion, String, String) {
    use edgellm::api::Event;
    let (mut text, mut reasoning) = (String::new(), String::new());
    let c = engine
        .generate(req, &mut |e| {
            match e {
                Event::Delta(t) => text.push_str(t),
                Event::Reasoning(t) => reasoning.push_str(t),
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    (c, text, reasoning)
}

pub fn fixture_checkpoint(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .join("checkpoint")
}

/// Exports fixture `name` (int4, max_length 256) to `tmp/name`.
pub fn export(name: &str, tmp: &Path) -> PathBuf {
    let out = tmp.join(name);
    let opts = edgellm_export::ExportOptions {
        max_length: Some(256),
        ..Default::default()
    };
    edgellm_export::export(&fixture_checkpoint(name), &out, &opts).unwrap();
    out
}

/// Runs the `edgellm` binary of this build with `args`.
pub fn edgellm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgellm"))
        .args(args)
        .output()
        .unwrap()
}

/// The backends this build has: each end-to-end test body runs on all of them.
pub fn backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "ort") {
        v.push("ort");
    }
    if cfg!(feature = "tract") {
        v.push("tract");
    }
    v
}

/// An fp32 package of fixture `name` (max_length 256) in `tmp`.
pub fn export_fp32(name: &str, tmp: &Path) -> PathBuf {
    let out = tmp.join(name);
    let opts = edgellm_export::ExportOptions {
        max_length: Some(256),
        precision: edgellm_export::Precision::Fp32,
        ..Default::default()
    };
    edgellm_export::export(&fixture_checkpoint(name), &out, &opts).unwrap();
    out
}

/// An engine on `pkg` (one thread, 256 positions) whose prefill runs in steps of 16 tokens, so
/// the tests' prompts span several steps, as long prompts do.
pub fn small_step_engine(pkg: &Path, backend: &str) -> edgellm::engine::Engine {
    let choice = edgellm::backend::BackendChoice::parse(backend).unwrap();
    let opts = edgellm::backend::BackendOptions {
        threads: 1,
        max_length: 256,
        prefill_chunk: 16,
        ..edgellm::backend::BackendOptions::default()
    };
    let pkg_open = edgellm::package::Package::open(pkg).unwrap();
    let loaded = edgellm::backend::load(&pkg_open, choice, &opts).unwrap();
    edgellm::engine::Engine::new(
        edgellm::model::Model::load(pkg).unwrap(),
        loaded.backend,
        256,
    )
}

pub const HARMONY: &[&str] = &[
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
];
pub const VOCAB: usize = 520;

/// The gpt-oss fixture exported, with harmony's special tokens added to its tokenizer at ids
/// 512.. (the tiny vocabulary has none).
pub fn harmony_package(tmp: &Path) -> PathBuf {
    let out = export("gptoss", tmp);
    let tj = out.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    for (i, t) in HARMONY.iter().enumerate() {
        tok["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 512 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true
            }));
    }
    std::fs::write(&tj, tok.to_string()).unwrap();
    let gc = out.join("genai_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gc).unwrap()).unwrap();
    cfg["model"]["vocab_size"] = VOCAB.into();
    std::fs::write(&gc, cfg.to_string()).unwrap();
    std::fs::remove_file(out.join("SHA256SUMS")).unwrap();
    out
}
