//! `edgellm-export` as a user runs it: success writes a complete, checksummed package; every
//! kind of bad input exits non-zero, names the file or tensor and why, and leaves no partial
//! package behind.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .join("checkpoint")
}

/// A writable copy of a fixture checkpoint.
fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    let dst = into.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn export(hf: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    run_export("--hf", hf, out, extra)
}

/// `edgellm-export SOURCE_FLAG SOURCE --out OUT --max-length 64 EXTRA..`: (success, stderr).
fn run_export(source_flag: &str, source: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_edgellm-export"))
        .arg(source_flag)
        .arg(source)
        .arg("--out")
        .arg(out)
        .args(["--max-length", "64"])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs a failing export and checks the message and that nothing was left behind.
fn assert_fails(hf: &Path, tmp: &Path, expected: &[&str]) {
    let out = tmp.join("pkg");
    let (ok, err) = export(hf, &out, &[]);
    assert!(!ok, "export should fail; stderr: {err}");
    for e in expected {
        assert!(err.contains(e), "stderr {err:?} should mention {e:?}");
    }
    assert!(!out.exists(), "a failed export left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging folders left behind: {leftovers:?}"
    );
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("config.json"), f);
}

/// Rewrites the JSON file `p` through `f`.
fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites the checkpoint's `model.safetensors.index.json` weight map through `f`.
fn edit_weight_map(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    edit_json(&dir.join("model.safetensors.index.json"), |idx| {
        f(idx["weight_map"].as_object_mut().unwrap())
    });
}

#[test]
fn export_writes_a_complete_checksummed_package() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let (ok, err) = export(&fixture("qwen2"), &out, &[]);
    assert!(ok, "{err}");
    for f in [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "SHA256SUMS",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    let sums = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(
        sums.status.success(),
        "sha256sum -c: {}",
        String::from_utf8_lossy(&sums.stdout)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model"]["type"], "qwen2");
    assert_eq!(cfg["model"]["context_length"], 64);
    assert_eq!(cfg["search"]["past_present_share_buffer"], true);
    // A second export to the same folder needs --force.
    let (ok, err) = export(&fixture("qwen2"), &out, &[]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, err) = export(&fixture("qwen2"), &out, &["--force"]);
    assert!(ok, "{err}");
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    edit_config(&hf, |v| {
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert_fails(
        &hf,
        tmp.path(),
        &["GPT2LMHeadModel", "LlamaForCausalLM", "GptOssForCausalLM"],
    );
}

#[test]
fn unsupported_rope_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // llama-linear keeps the pre-transformers-5 `rope_scaling` form.
    let hf = copy_fixture("llama-linear", tmp.path());
    edit_config(&hf, |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})
    });
    assert_fails(
        &hf,
        tmp.path(),
        &["dynamic", "linear, llama3, yarn, longrope"],
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    edit_config(&hf, |v| v["intermediate_size"] = serde_json::json!(192));
    assert_fails(
        &hf,
        tmp.path(),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[192, 128]",
            "[256, 128]",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("llama", tmp.path());
    // Drop the last shard from the index: its tensors disappear from the checkpoint.
    edit_weight_map(&hf, |map| {
        let last = map
            .values()
            .filter_map(|v| v.as_str())
            .max()
            .unwrap()
            .to_string();
        map.retain(|_, f| f.as_str() != Some(last.as_str()));
    });
    assert_fails(
        &hf,
        tmp.path(),
        &["is missing from the checkpoint", "model."],
    );
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..64]).unwrap();
    assert_fails(
        &hf,
        tmp.path(),
        &["model.safetensors", "corrupt safetensors header"],
    );
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    let header =
        br#"{"model.embed_tokens.weight":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 8]);
    std::fs::write(hf.join("model.safetensors"), file).unwrap();
    assert_fails(
        &hf,
        tmp.path(),
        &["model.embed_tokens.weight", "unsupported dtype I64"],
    );
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    assert_fails(&hf, tmp.path(), &["tokenizer.json", "missing"]);
    std::fs::remove_file(hf.join("config.json")).unwrap();
    assert_fails(&hf, tmp.path(), &["config.json", "missing"]);
}

/// A tokenizer file that cannot be copied: the error names both ends of the copy, and the
/// operating system's reason appears once (it used to be printed twice, as the message's end
/// and again as its cause).
#[test]
fn a_failed_copy_names_source_and_destination_and_its_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = copy_fixture("qwen2", tmp.path());
    let cfg = hf.join("tokenizer_config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    let out = tmp.path().join("pkg");
    let (ok, err) = export(&hf, &out, &[]);
    assert!(!ok, "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains(&format!("copying {}", cfg.display())) && line.contains(" to "),
        "{line}"
    );
    let reason = line.rsplit(": ").next().unwrap();
    assert_eq!(
        line.matches(reason).count(),
        1,
        "the cause is repeated: {line}"
    );
    assert!(!out.exists());
}

#[test]
fn bad_block_size_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let (ok, err) = export(&fixture("qwen2"), &out, &["--block-size", "48"]);
    assert!(!ok && err.contains("--block-size 48"), "{err}");
    assert!(!out.exists());
}

fn genai_config(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json")).unwrap()).unwrap()
}

#[test]
fn absent_tie_flag_is_decided_by_the_presence_of_lm_head() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, tied) in [("qwen2", true), ("mistral", false)] {
        let hf = copy_fixture(name, tmp.path());
        edit_config(&hf, |v| {
            v.as_object_mut().unwrap().remove("tie_word_embeddings");
        });
        let out = tmp.path().join(format!("{name}-pkg"));
        let (ok, err) = export(&hf, &out, &[]);
        assert!(ok, "{name}: {err}");
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("edgellm.json")).unwrap())
                .unwrap();
        assert_eq!(info["tied_embeddings"], tied, "{name}");
    }
}

#[test]
fn a_window_longer_than_max_length_becomes_full_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    // mistral's window is 16: with --max-length 64 it slides, with 16 it cannot.
    let (ok, err) = export(&fixture("mistral"), &out, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        genai_config(&out)["model"]["decoder"]["sliding_window"]["window_size"],
        16
    );
    let o = Command::new(env!("CARGO_BIN_EXE_edgellm-export"))
        .args(["--max-length", "16", "--force", "--hf"])
        .arg(fixture("mistral"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        genai_config(&out)["model"]["decoder"]
            .get("sliding_window")
            .is_none()
    );
}

fn export_gguf(file: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    run_export("--gguf", file, out, extra)
}

fn gguf_fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf")
            .join(name)
            .join("model.gguf"),
    )
    .unwrap()
}

#[test]
fn a_gguf_file_imports_into_a_complete_package() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.gguf");
    std::fs::write(&file, gguf_fixture("q4_1")).unwrap();
    let out = tmp.path().join("pkg");
    let (ok, err) = export_gguf(&file, &out, &[]);
    assert!(ok, "{err}");
    for f in [
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
        "SHA256SUMS",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 64);
}

/// Corrupt, truncated and hostile GGUF files: each refused with its reason, nothing written.
#[test]
fn hostile_gguf_files_are_refused_with_the_reason() {
    let good = gguf_fixture("q4_0");
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "empty",
            Vec::new(),
            &["not a usable GGUF file", "needs 4 bytes"],
        ),
        (
            "bad magic",
            [b"GGML".as_slice(), &good[4..]].concat(),
            &["bad magic"],
        ),
        (
            "version 7",
            [&good[..4], &7u32.to_le_bytes(), &good[8..]].concat(),
            &["GGUF version 7 is not supported"],
        ),
        (
            "truncated data",
            good[..good.len() - 1000].to_vec(),
            &["runs past the end of the file", "truncated"],
        ),
        (
            "truncated header",
            good[..200].to_vec(),
            &["tensor count 20", "hold at most"],
        ),
        (
            "tensor count 2^40",
            [&good[..8], &(1u64 << 40).to_le_bytes(), &good[16..]].concat(),
            &["tensor count 1099511627776"],
        ),
        (
            "metadata count 2^60",
            [&good[..16], &(1u64 << 60).to_le_bytes(), &good[24..]].concat(),
            &["metadata count"],
        ),
        (
            "first key 2^62 bytes long",
            [&good[..24], &(1u64 << 62).to_le_bytes(), &good[32..]].concat(),
            &["metadata key length"],
        ),
    ];
    for (what, bytes, expected) in cases {
        let file = tmp.path().join("bad.gguf");
        std::fs::write(&file, &bytes).unwrap();
        let out = tmp.path().join("pkg");
        let (ok, err) = export_gguf(&file, &out, &[]);
        assert!(!ok, "{what}: accepted");
        assert!(!err.contains("panicked"), "{what}: panicked: {err}");
        for e in expected {
            assert!(
                err.contains(e),
                "{what}: stderr {err:?} should mention {e:?}"
            );
        }
        assert!(!out.exists(), "{what}: left a package behind");
        assert!(
            std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial")),
            "{what}: left a partial folder"
        );
    }
}

#[test]
fn unsupported_gguf_architectures_and_types_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // "llama" -> "gemma": same length, so the file stays valid.
    let mut bytes = gguf_fixture("q4_0");
    let at = bytes
        .windows(5)
        .position(|w| w == b"llama")
        .expect("the architecture string");
    bytes[at..at + 5].copy_from_slice(b"gemma");
    let file = tmp.path().join("gemma.gguf");
    std::fs::write(&file, &bytes).unwrap();
    let (ok, err) = export_gguf(&file, &tmp.path().join("pkg"), &[]);
    assert!(!ok);
    assert!(
        err.contains(
            "architecture \"gemma\" is not supported; supported: llama, qwen2, qwen3, phi3"
        ),
        "{err}"
    );
}

/// A downloaded index is untrusted: a shard named outside the checkpoint's folder (an absolute
/// path, `..`) is refused, naming it, instead of read.
#[test]
fn index_shards_outside_the_checkpoint_are_refused() {
    for outside in ["/etc/hostname", "../model-00001-of-00003.safetensors"] {
        let tmp = tempfile::tempdir().unwrap();
        let hf = copy_fixture("llama", tmp.path());
        edit_weight_map(&hf, |map| {
            let first = map.keys().next().unwrap().clone();
            map[&first] = outside.into();
        });
        assert_fails(
            &hf,
            tmp.path(),
            &[
                "weight_map names",
                outside,
                "not a file inside the checkpoint",
            ],
        );
    }
}

/// Disk full while exporting (issue 17 §3): `--force` over a package on a tmpfs too small for
/// the new one, mounted in a private mount namespace (it needs root: CI runs as root; elsewhere
/// `sudo -E scripts/test.sh`). The export fails with the cause named once, leaves nothing
/// behind, and the package it would have replaced is intact, byte for byte.
#[test]
fn disk_full_while_exporting_fails_cleanly_and_keeps_the_old_package() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test mounts a small tmpfs and needs root: run `sudo -E scripts/test.sh` (CI runs \
         as root)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (mnt, out) = (tmp.path().join("mnt"), tmp.path().join("out"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    // An int4 package of the qwen2 fixture takes ~0.9 MB, its fp32 one ~2.3 MB: 1600 KiB holds
    // the first and not the second beside it.
    let script = r#"set -e
mount -t tmpfs -o size=1600k edgellm-disk-full "$1"
"$2" --hf "$3" --out "$1/pkg" --precision int4 >/dev/null 2>&1
(cd "$1/pkg" && sha256sum -- *) > "$4/before"
set +e
"$2" --hf "$3" --out "$1/pkg" --precision fp32 --force > /dev/null 2> "$4/stderr"
echo $? > "$4/rc"
(cd "$1/pkg" && sha256sum -- *) > "$4/after"
ls -A "$1" > "$4/entries"
"#;
    let o = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&mnt)
        .arg(env!("CARGO_BIN_EXE_edgellm-export"))
        .arg(fixture("qwen2"))
        .arg(&out)
        .output()
        .expect("unshare (util-linux) runs");
    assert!(
        o.status.success(),
        "the namespace script failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let stderr = read("stderr");
    assert_eq!(read("rc").trim(), "1", "{stderr}");
    assert_eq!(
        stderr.matches("No space left on device").count(),
        1,
        "the cause, named once: {stderr}"
    );
    assert!(stderr.contains("edgellm-export: error:"), "{stderr}");
    assert!(read("before").lines().count() >= 8, "{}", read("before"));
    assert_eq!(read("before"), read("after"), "the old package changed");
    assert_eq!(read("entries").trim(), "pkg", "something was left behind");
    eprintln!("refused as: {stderr}");
}
