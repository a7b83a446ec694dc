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
