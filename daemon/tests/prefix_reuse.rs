//! Prefix reuse on real backends: a request that shares a prefix with what the engine's KV
//! cache holds computes only the rest, reports the reused count as `usage.cached_tokens`, and
//! gets exactly the tokens a cold start gets. fp32 packages of the fixtures with full attention
//! (llama), sliding windows (mistral: every layer, window 16) and gpt-oss (sinks, alternating
//! windows of 16, MoE), on both backends. The prompts run past the window, so the windowed
//! layers have dropped rows: rewinding behind them must fall back to a cold start, not reuse a
//! torn cache, and a prefix kept on purpose (`Engine::keep_prefix`, `[model] system_prompts`)
//! must resume from its copy.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use edgellm::api::{Completion, Input, Request};
use edgellm::engine::Engine;

const GEN: usize = 8;

fn run(engine: &mut Engine, prompt: &[u32]) -> Completion {
    let mut req = Request::new(Input::Prompt {
        text: String::new(),
        raw: true,
    });
    req.max_tokens = Some(GEN);
    req.ignore_eos = true;
    req.sampling.temperature = 0.0;
    engine
        .generate_from_ids(&req, prompt.to_vec(), &mut |_| ControlFlow::Continue(()))
        .unwrap()
}

/// Deterministic ids in the fixtures' normal range (6..512).
fn ids(n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (6 + (i * 37 + seed * 101) % 500) as u32)
        .collect()
}

fn check(fixture: &str, backend: &str, pkg: &Path) {
    let a = ids(40, 1);
    let mut warm = common::small_step_engine(pkg, backend);
    let mut cold = common::small_step_engine(pkg, backend);
    let mut cold_run = |prompt: &[u32]| {
        cold.forget_cache();
        run(&mut cold, prompt)
    };

    // 1. A cold first request.
    let first = run(&mut warm, &a);
    assert_eq!(first.usage.cached_tokens, 0, "{fixture}/{backend}: first");
    assert_eq!(first.token_ids.len(), GEN);

    // 2. The conversation goes on: the prompt is the first one, its answer and more. The
    //    cache holds the prompt and the answer's tokens that were fed back (all but the last).
    let mut b = a.clone();
    b.extend(&first.token_ids);
    b.extend(ids(12, 2));
    let second = run(&mut warm, &b);
    assert_eq!(
        second.usage.cached_tokens,
        a.len() + GEN - 1,
        "{fixture}/{backend}: continuation"
    );
    assert_eq!(
        second.token_ids,
        cold_run(&b).token_ids,
        "{fixture}/{backend}: continuation differs from a cold start"
    );

    // 3. The same prompt again: all but its last token come from the cache, where the cache
    //    can go back there. 4. A prompt that shares only its first 10 tokens. Full-attention
    //    layers always can; windowed layers cannot once they dropped rows the new position
    //    needs (ONNX Runtime's window + slack buffer has shifted; tract trimmed its rows), and
    //    the request starts cold. Either way the tokens are a cold start's. 5. Nothing shared.
    let windowed = fixture != "llama";
    let mut c = a[..10].to_vec();
    c.extend(ids(20, 3));
    for (prompt, shared, what) in [
        (&b, b.len() - 1, "the same prompt"),
        (&c, 10, "a short shared prefix"),
        (&ids(25, 4), 0, "nothing shared"),
    ] {
        let got = run(&mut warm, prompt);
        let cached = got.usage.cached_tokens;
        eprintln!("{fixture}/{backend}, {what}: {cached} of {shared} shared tokens reused");
        assert!(
            cached == shared || (windowed && cached == 0),
            "{fixture}/{backend}, {what}: cached {cached}, shared {shared}"
        );
        if !windowed || backend == "ort" {
            // ONNX Runtime's windowed buffers have shifted by now (the sequences outgrew
            // window + slack): only full attention rewinds.
            assert_eq!(
                cached,
                if windowed { 0 } else { shared },
                "{fixture}/{backend}, {what}"
            );
        }
        assert_eq!(
            got.token_ids,
            cold_run(prompt).token_ids,
            "{fixture}/{backend}, {what}: differs from a cold start"
        );
    }

    // 6. A prefix kept on purpose (a system prompt), longer than ONNX Runtime's window + slack
    //    buffer (32): every prompt that starts with it resumes there, also after the cache
    //    has moved on past it, windowed layers included.
    let system = ids(36, 6);
    warm.keep_prefix(&system).unwrap();
    for seed in [7, 8, 9] {
        let mut prompt = system.clone();
        prompt.extend(ids(10 + seed, seed));
        let got = run(&mut warm, &prompt);
        assert_eq!(
            got.usage.cached_tokens,
            system.len(),
            "{fixture}/{backend}: kept prefix, seed {seed}"
        );
        assert_eq!(
            got.token_ids,
            cold_run(&prompt).token_ids,
            "{fixture}/{backend}: kept prefix, seed {seed}: differs from a cold start"
        );
    }
}

#[test]
fn prefix_reuse_gives_cold_start_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture in ["llama", "mistral", "gptoss"] {
        let pkg = common::export_fp32(fixture, tmp.path());
        for backend in common::backends() {
            check(fixture, backend, &pkg);
        }
    }
}

/// `[model] prefix_cache_dir`: a kept prefix saved to a file and adopted by a fresh engine (a
/// restart) gives the tokens a cold start gives and counts as cached; a damaged, truncated or
/// foreign file is refused with its reason, never adopted.
fn saved_prefix(fixture: &str, backend: &str, pkg: &Path, dir: &Path) {
    use edgellm::prefix_cache::{self, Key};
    let system = ids(30, 7);
    let mut first = common::small_step_engine(pkg, backend);
    first.keep_prefix(&system).unwrap();
    let package = prefix_cache::package_digest(pkg).expect("the package has SHA256SUMS");
    let key = Key::new(&package, backend, 256, &system);
    let path = prefix_cache::save(dir, &key, first.kept(&system).unwrap()).unwrap();
    drop(first);

    let loaded = prefix_cache::load(dir, &key)
        .unwrap()
        .expect("the saved file");
    let mut restarted = common::small_step_engine(pkg, backend);
    assert!(
        restarted.adopt_prefix(&system, loaded.clone()),
        "{fixture}/{backend}"
    );
    let mut prompt = system.clone();
    prompt.extend(ids(12, 8));
    let got = run(&mut restarted, &prompt);
    assert_eq!(got.usage.cached_tokens, system.len(), "{fixture}/{backend}");
    let mut cold = common::small_step_engine(pkg, backend);
    assert_eq!(
        got.token_ids,
        run(&mut cold, &prompt).token_ids,
        "{fixture}/{backend}: a restored prefix differs from a cold start"
    );
    // Another backend's rows are refused by this one.
    let mut foreign = loaded.clone();
    foreign.backend = "other".into();
    assert!(!restarted.adopt_prefix(&system, foreign));
    // Shapes that are not this cache's are refused before anything is copied.
    let mut torn = loaded;
    torn.parts[0].shape[1] += 1;
    assert!(!restarted.adopt_prefix(&system, torn));

    // Damaged files: one flipped bit in the rows, a truncation, another prompt's key.
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let e = prefix_cache::load(dir, &key).unwrap_err();
    assert!(e.contains("SHA-256"), "{e}");
    std::fs::write(&path, &good[..good.len() - 5]).unwrap();
    let e = prefix_cache::load(dir, &key).unwrap_err();
    assert!(e.contains("bytes"), "{e}");
    let other = Key::new(&package, backend, 256, &ids(30, 9));
    std::fs::write(other.path(dir), &good).unwrap();
    let e = prefix_cache::load(dir, &other).unwrap_err();
    assert!(e.contains("another package"), "{e}");
    assert_eq!(prefix_cache::load(&dir.join("none"), &key), Ok(None));
}

#[test]
fn a_saved_prefix_restores_after_a_restart_and_damaged_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture in ["llama", "mistral"] {
        let pkg = common::export_fp32(fixture, tmp.path());
        for backend in common::backends() {
            let dir = tmp.path().join(format!("cache-{fixture}-{backend}"));
            saved_prefix(fixture, backend, &pkg, &dir);
        }
    }
}
