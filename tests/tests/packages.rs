//! edgellm-export packages run through both backends (ONNX Runtime and tract, one test body
//! each) against goldens computed by Hugging Face transformers, for every supported
//! architecture.
//!
//! * fp32 packages: teacher-forced logits within 1e-4 (max abs) of transformers at every
//!   position — a prefill step, a multi-token step against that cache, then one-token decode
//!   steps, crossing every sliding window — and the 24-token greedy continuation identical.
//! * int4 packages: top-1 agreement with the fp32 package and mean KL divergence, and the KL
//!   of every single position, against the thresholds justified in
//!   `int4_agrees_with_references`; on tract also agreement with ONNX Runtime's logits
//!   (`int4_tract_agrees_with_ort`).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use edgellm::backend::{Backend, BackendChoice, BackendOptions};
use edgellm::package::Package;
use edgellm_export::Precision;
use edgellm_tests::*;

/// Positions run as one prefill step before switching to one-token decode steps. Larger than
/// the fixtures' sliding window (16), so both the prefill and the decode path cross it.
const PREFILL: usize = 20;

fn backend(pkg: &std::path::Path, choice: BackendChoice) -> Box<dyn Backend> {
    let pkg = Package::open(&pkg.join("pkg")).expect("package opens");
    let opts = BackendOptions {
        threads: 1,
        max_length: 256,
        prefill_chunk: 256,
        ..BackendOptions::default()
    };
    let loaded = edgellm::backend::load(&pkg, choice, &opts)
        .unwrap_or_else(|e| panic!("{choice:?} backend loads: {e}"));
    assert_eq!(loaded.reason, edgellm::backend::Reason::Configured);
    loaded.backend
}

/// Tokens of the one multi-token step against a non-empty cache (chunked prefill) that follows
/// the prefill, before the one-token steps: positions 20..26, across the sliding window too.
const CHUNK: usize = 6;

/// Teacher-forced logits of `ids`: one prefill step over `ids[..PREFILL]`, one step of `CHUNK`
/// tokens against that cache, then one token at a time. Returns `[len, vocab]` rows.
fn teacher_forced(be: &mut dyn Backend, ids: &[u32]) -> Vec<f32> {
    be.reset();
    let mut rows = be.forward_all(&ids[..PREFILL]).expect("prefill").to_vec();
    rows.extend_from_slice(
        be.forward_all(&ids[PREFILL..PREFILL + CHUNK])
            .expect("chunk against the cache"),
    );
    for &t in &ids[PREFILL + CHUNK..] {
        rows.extend_from_slice(be.forward_all(&[t]).expect("decode step"));
    }
    rows
}

fn fp32_matches_transformers(name: &str, choice: BackendChoice) {
    let golden = Golden::load(name);
    let pkg = export_fixture(name, Precision::Fp32, true);
    let mut be = backend(pkg.path(), choice);
    let rows = teacher_forced(be.as_mut(), &golden.teacher_forced_ids);
    let v = golden.vocab();
    let mut worst = (0.0f32, 0);
    for i in 0..golden.teacher_forced_ids.len() {
        let d = max_abs_diff(&rows[i * v..(i + 1) * v], golden.row(i));
        if d > worst.0 {
            worst = (d, i);
        }
    }
    eprintln!(
        "{name} on {choice:?}: fp32 max |logit - transformers| = {:.2e} (position {})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "{name} on {choice:?}: fp32 logits differ from transformers by {} at position {}",
        worst.0,
        worst.1
    );
    let tokens = greedy(be.as_mut(), &golden.prompt_ids, golden.greedy_ids.len());
    assert_eq!(
        tokens, golden.greedy_ids,
        "{name} on {choice:?}: greedy continuation differs from transformers"
    );
}

/// Agreement of two `[n, v]` logit matrices: the share of rows whose argmax agrees, the mean
/// KL(a || b) over rows, and the largest single row's KL (a mean can hide one broken
/// position, e.g. a wrong cache row at one offset; a non-finite KL is infinite, so fails).
struct Agreement {
    top1: f64,
    mean_kl: f64,
    max_kl: f64,
}

fn agreement(a: &[f32], b: &[f32], v: usize) -> Agreement {
    assert_eq!(a.len(), b.len(), "logit matrices of different sizes");
    let n = a.len() / v;
    let rows = |m: &[f32], i: usize| m[i * v..(i + 1) * v].to_vec();
    let top1 = (0..n)
        .filter(|&i| argmax(&rows(a, i)) == argmax(&rows(b, i)))
        .count() as f64
        / n as f64;
    let kls: Vec<f64> = (0..n)
        .map(|i| kl_divergence(&rows(a, i), &rows(b, i)))
        .map(|kl| if kl.is_finite() { kl } else { f64::INFINITY })
        .collect();
    Agreement {
        top1,
        mean_kl: kls.iter().sum::<f64>() / n as f64,
        max_kl: kls.iter().copied().fold(0.0, f64::max),
    }
}

/// The int4 package against two references, both computed by transformers:
///
/// 1. The same model with its weights replaced by their round-to-nearest int4 values
///    (`make_int4_reference.py`): the package must reproduce it. The only expected difference
///    is the int8 quantization of activations (both backends) (`accuracy_level=4`, about 0.4% per
///    dot product). Measured: mean KL 0.0006-0.0025 nats, top-1 90-100% (the misses are
///    near-ties). We require KL <= 0.01 (4x the worst measured, so other CPUs' int8 kernels
///    fit) and top-1 >= 85%. A wrong nibble order, scale sign, block or expert layout gives
///    agreement near 1/vocab and KL above 1 nat.
/// 2. The fp32 model. These tiny random-weight fixtures are harsh on int4 (logit std ~4, many
///    near-ties among 512 tokens): RTN int4 itself only reaches 52-85% top-1 agreement and
///    0.12-0.59 nats (per fixture, in golden_int4_rtn.json). The package may not be worse than
///    that by more than 10 points of agreement or 25% (+0.01) of KL, the headroom the int8
///    activations need.
fn int4_agrees_with_references(name: &str, choice: BackendChoice) {
    let golden = Golden::load(name);
    let reference = golden
        .int4_rtn
        .clone()
        .expect("golden_int4_rtn.json exists for every fixture");
    let ids = &golden.teacher_forced_ids;
    let int4 = teacher_forced(
        backend(export_fixture(name, Precision::Int4, true).path(), choice).as_mut(),
        ids,
    );
    let v = golden.vocab();

    let rtn = agreement(&golden.int4_rtn_logits, &int4, v);
    let (agree_rtn, kl_rtn) = (rtn.top1, rtn.mean_kl);
    eprintln!(
        "{name} on {choice:?}: int4 package vs transformers RTN-int4: top-1 {:.1}%, mean KL {kl_rtn:.4}, max KL {:.4}",
        agree_rtn * 100.0,
        rtn.max_kl
    );
    assert!(
        agree_rtn >= 0.85,
        "{name}: int4 package disagrees with RTN-int4 transformers: top-1 {agree_rtn}"
    );
    assert!(
        kl_rtn <= 0.01,
        "{name}: int4 package vs RTN-int4 transformers: KL {kl_rtn}"
    );
    // Every position, not only the mean: measured at most 0.0143 nats (qwen2); a position
    // computed from a wrong cache row or mask is off by > 0.1.
    assert!(
        rtn.max_kl <= 0.05,
        "{name}: int4 package vs RTN-int4 transformers: one position's KL is {}",
        rtn.max_kl
    );

    let fp32 = agreement(&golden.logits, &int4, v);
    let (agree, kl) = (fp32.top1, fp32.mean_kl);
    eprintln!(
        "{name} on {choice:?}: int4 package vs fp32 transformers: top-1 {:.1}% (RTN {:.1}%), mean KL {kl:.4} (RTN {:.4})",
        agree * 100.0,
        reference.top1_agreement_vs_fp32 * 100.0,
        reference.mean_kl_vs_fp32
    );
    assert!(
        agree >= reference.top1_agreement_vs_fp32 - 0.10,
        "{name}: int4 top-1 agreement {agree}"
    );
    assert!(
        kl <= reference.mean_kl_vs_fp32 * 1.25 + 0.01,
        "{name}: int4 mean KL {kl}"
    );
}

/// `--embeddings int4` (GatherBlockQuantized): for a tied model the table reuses the lm_head's
/// int4 bytes through a Reshape, for an untied one it gets its own. The package must reproduce
/// transformers with the table (and everything else) RTN-int4, with the same bounds as
/// `int4_agrees_with_references` part 1.
fn int4_embeddings_stay_close(name: &str, choice: BackendChoice) {
    let golden = Golden::load(name);
    let pkg = export_fixture_with(
        name,
        edgellm_export::ExportOptions {
            embeddings: Precision::Int4,
            logits_all: true,
            quant: edgellm_export::quant::Scheme::Rtn,
            ..Default::default()
        },
    );
    let graph = std::fs::read(pkg.path().join("pkg/model.onnx")).unwrap();
    assert!(
        graph.windows(20).any(|w| w == b"GatherBlockQuantized"),
        "{name}: the graph should gather from an int4 table"
    );
    let int4 = teacher_forced(
        backend(pkg.path(), choice).as_mut(),
        &golden.teacher_forced_ids,
    );
    let emb = agreement(&golden.int4_rtn_embeddings_logits, &int4, golden.vocab());
    let (agree, kl) = (emb.top1, emb.mean_kl);
    eprintln!(
        "{name} on {choice:?}: int4 embeddings vs RTN-int4 transformers: top-1 {:.1}%, KL {kl:.4}, max KL {:.4}",
        agree * 100.0,
        emb.max_kl
    );
    assert!(
        agree >= 0.85 && kl <= 0.01 && emb.max_kl <= 0.05,
        "{name}: int4 embeddings: top-1 {agree}, KL {kl}, max KL {}",
        emb.max_kl
    );
}

/// On tract the int4 package must agree with ONNX Runtime running the same package. Both
/// quantize activations to int8 in blocks for the int4 products (what the packages'
/// `accuracy_level = 4` allows; tract: our `MatMulNBits`, blocks of 32, round to nearest) and
/// accumulate in integers, so they differ only in rounding details and summation order.
/// Measured: 97.5-100% top-1 agreement, mean KL <= 0.0013 and the worst position's KL <= 0.0046
/// per architecture. We require at least 90%, mean KL <= 0.01 (the bound part 1 of
/// `int4_agrees_with_references` puts on each against the reference) and every position's
/// KL <= 0.03; a wrong nibble order, scale or layout gives ~1/vocab.
#[cfg(all(feature = "ort", feature = "tract"))]
fn int4_tract_agrees_with_ort(name: &str) {
    // scripts/test.sh runs this file once more with EDGELLM_TRACT_PORTABLE=1: the portable
    // kernels (what a CPU without AVX2 or NEON runs) must then be the ones compared.
    let want = match std::env::var_os("EDGELLM_TRACT_PORTABLE") {
        Some(_) => "portable",
        #[cfg(target_arch = "x86_64")]
        None if std::is_x86_feature_detected!("avx2") => "avx2",
        #[cfg(target_arch = "aarch64")]
        None if std::arch::is_aarch64_feature_detected!("dotprod")
            && std::arch::is_aarch64_feature_detected!("i8mm") =>
        {
            "neon-i8mm"
        }
        #[cfg(target_arch = "aarch64")]
        None if std::arch::is_aarch64_feature_detected!("dotprod") => "neon-dotprod",
        #[cfg(target_arch = "aarch64")]
        None => "neon",
        #[cfg(not(target_arch = "aarch64"))]
        None => "portable",
    };
    assert_eq!(edgellm::backend::tract::int_kernels(), want);
    eprintln!("{name}: tract's integer kernels: {want}");
    let golden = Golden::load(name);
    let pkg = export_fixture(name, Precision::Int4, true);
    let ids = &golden.teacher_forced_ids;
    let ort = teacher_forced(backend(pkg.path(), BackendChoice::Ort).as_mut(), ids);
    let tract = teacher_forced(backend(pkg.path(), BackendChoice::Tract).as_mut(), ids);
    let a = agreement(&ort, &tract, golden.vocab());
    let (agree, kl) = (a.top1, a.mean_kl);
    eprintln!(
        "{name}: int4 tract vs ONNX Runtime: top-1 {:.1}% over {} positions, mean KL {kl:.4}, max KL {:.4}",
        agree * 100.0,
        ids.len(),
        a.max_kl
    );
    // Per position too: measured at most 0.0046 nats (gpt-oss).
    assert!(
        agree >= 0.90 && kl <= 0.01 && a.max_kl <= 0.03,
        "{name}: int4 on tract vs ONNX Runtime: top-1 {:.1}%, KL {kl}, max KL {}",
        agree * 100.0,
        a.max_kl
    );
}

macro_rules! on_both_backends {
    ($($test:ident => $body:expr;)*) => {
        #[cfg(feature = "ort")]
        mod ort {
            use edgellm::backend::BackendChoice::Ort as B;
            $(#[test] fn $test() { let f: fn(edgellm::backend::BackendChoice) = $body; f(B) })*
        }
        #[cfg(feature = "tract")]
        mod tract {
            use edgellm::backend::BackendChoice::Tract as B;
            $(#[test] fn $test() { let f: fn(edgellm::backend::BackendChoice) = $body; f(B) })*
        }
    };
}

on_both_backends! {
    int4_embeddings_shared_with_tied_lm_head => |b| super::int4_embeddings_stay_close("llama", b);
    int4_embeddings_untied => |b| super::int4_embeddings_stay_close("mistral", b);
}

macro_rules! architecture {
    ($module:ident, $name:literal) => {
        mod $module {
            use edgellm::backend::BackendChoice;
            #[cfg(feature = "ort")]
            #[test]
            fn fp32_logits_and_greedy_match_transformers_on_ort() {
                super::fp32_matches_transformers($name, BackendChoice::Ort);
            }
            #[cfg(feature = "tract")]
            #[test]
            fn fp32_logits_and_greedy_match_transformers_on_tract() {
                super::fp32_matches_transformers($name, BackendChoice::Tract);
            }
            #[cfg(feature = "ort")]
            #[test]
            fn int4_matches_rtn_reference_and_fp32_within_rtn_error_on_ort() {
                super::int4_agrees_with_references($name, BackendChoice::Ort);
            }
            #[cfg(feature = "tract")]
            #[test]
            fn int4_matches_rtn_reference_and_fp32_within_rtn_error_on_tract() {
                super::int4_agrees_with_references($name, BackendChoice::Tract);
            }
            #[cfg(all(feature = "ort", feature = "tract"))]
            #[test]
            fn int4_tract_agrees_with_ort() {
                super::int4_tract_agrees_with_ort($name);
            }
        }
    };
}

architecture!(llama_llama3_rope_tied_sharded, "llama");
architecture!(llama_linear_rope_untied_f16, "llama-linear");
architecture!(mistral_sliding_window, "mistral");
architecture!(qwen2_qkv_bias, "qwen2");
architecture!(qwen3_qk_norm, "qwen3");
architecture!(phi3_fused, "phi3");
architecture!(phi3_longrope, "phi3-longrope");
architecture!(gptoss_mxfp4, "gptoss");
architecture!(gptoss_dense, "gptoss-dense");
