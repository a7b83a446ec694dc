//! Unit tests: block formats (packing keeps every value) and hostile headers.

use super::blocks::{self, Decoded, GgmlType, NBitsLayout};
use super::*;

/// A deterministic byte stream (xorshift).
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Random blocks of `ty` with sane f16 scales (so values are finite).
fn random_row(ty: GgmlType, k: usize, seed: u64) -> Vec<u8> {
    let (blk, size) = ty.block();
    let mut row = bytes(k / blk * size, seed);
    let d = half::f16::from_f32(0.01).to_le_bytes();
    let m = half::f16::from_f32(-0.05).to_le_bytes();
    for b in row.chunks_exact_mut(size) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => b[..2].copy_from_slice(&d),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                b[..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&m);
            }
            GgmlType::Q6_K => b[208..210].copy_from_slice(&d),
            _ => unreachable!(),
        }
    }
    row
}

/// `MatMulNBits`' own dequantization of a packed row (default zero points) plus the offsets.
fn nbits_dequant(
    codes: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: NBitsLayout,
    k: usize,
) -> Vec<f32> {
    (0..k)
        .map(|i| {
            let q = match layout.bits {
                4 => ((codes[i / 2] >> (4 * (i % 2))) & 0xf) as f32 - 8.0,
                _ => codes[i] as f32 - 128.0,
            };
            let v = scales[i / layout.block] * q;
            if layout.offset {
                v + offsets[i / 32]
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn every_exact_type_packs_without_changing_a_value() {
    use GgmlType::*;
    let k = 512;
    for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K] {
        for (layout_types, name) in [(vec![ty], "alone"), (vec![ty, Q6_K], "with Q6_K")] {
            let layout = NBitsLayout::for_types(&layout_types).expect("exact types");
            let row = random_row(ty, k, 7 + ty as u64);
            let mut reference = Vec::new();
            blocks::dequantize_row(ty, &row, &mut reference);
            let mut d = Decoded::default();
            blocks::decode_row(ty, &row, &mut d);
            let (mut codes, mut scales, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
            blocks::pack_row(&d, layout, &mut codes, &mut scales, &mut offsets);
            assert_eq!(codes.len(), layout.row_bytes(k), "{ty:?} {name}");
            assert_eq!(scales.len(), k / layout.block, "{ty:?} {name}");
            let back = nbits_dequant(&codes, &scales, &offsets, layout, k);
            for (i, (a, b)) in reference.iter().zip(&back).enumerate() {
                // The 4-bit form of offset types moves 8 * scale into the offset: one f32
                // rounding of the offset, nothing else.
                let tol = if layout.offset {
                    1e-6 * (1.0 + a.abs())
                } else {
                    0.0
                };
                assert!((a - b).abs() <= tol, "{ty:?} {name} [{i}]: {a} vs {b}");
            }
        }
    }
}

#[test]
fn q4_0_and_q8_0_dequantize_as_llama_cpp() {
    // Q4_0: d = 0.5, byte j holds element j (low) and j + 16 (high).
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    b[2] = 0xf0; // element 0: 0 - 8 = -8, element 16: 15 - 8 = 7
    let mut out = Vec::new();
    blocks::dequantize_row(GgmlType::Q4_0, &b, &mut out);
    assert_eq!((out[0], out[16], out[1]), (-4.0, 3.5, -4.0));
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
    b[2] = 0x80; // -128
    b[33] = 5;
    out.clear();
    blocks::dequantize_row(GgmlType::Q8_0, &b, &mut out);
    assert_eq!((out[0], out[31], out[1]), (-32.0, 1.25, 0.0));
}

/// A GGUF v3 file, written by hand: metadata entries and tensors (name, dims innermost first,
/// type id, data).
struct Writer {
    meta: Vec<u8>,
    n_meta: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Writer {
    fn new() -> Self {
        Writer {
            meta: Vec::new(),
            n_meta: 0,
            tensors: Vec::new(),
        }
    }
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        Self::string(&mut self.meta, k);
        self.meta.extend(8u32.to_le_bytes());
        Self::string(&mut self.meta, v);
        self.n_meta += 1;
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        Self::string(&mut self.meta, k);
        self.meta.extend(4u32.to_le_bytes());
        self.meta.extend(v.to_le_bytes());
        self.n_meta += 1;
        self
    }
    /// An array of strings (type 8), f32 (6) or i32 (5) values.
    fn kv_array(&mut self, k: &str, elem: u32, items: &[Vec<u8>]) -> &mut Self {
        Self::string(&mut self.meta, k);
        self.meta.extend(9u32.to_le_bytes());
        self.meta.extend(elem.to_le_bytes());
        self.meta.extend((items.len() as u64).to_le_bytes());
        for it in items {
            self.meta.extend(it);
        }
        self.n_meta += 1;
        self
    }
    fn kv_strs(&mut self, k: &str, v: &[&str]) -> &mut Self {
        let items: Vec<Vec<u8>> = v
            .iter()
            .map(|s| {
                let mut b = Vec::new();
                Self::string(&mut b, s);
                b
            })
            .collect();
        self.kv_array(k, 8, &items)
    }
    fn kv_f32s(&mut self, k: &str, v: &[f32]) -> &mut Self {
        let items: Vec<Vec<u8>> = v.iter().map(|x| x.to_le_bytes().to_vec()).collect();
        self.kv_array(k, 6, &items)
    }
    fn kv_i32s(&mut self, k: &str, v: &[i32]) -> &mut Self {
        let items: Vec<Vec<u8>> = v.iter().map(|x| x.to_le_bytes().to_vec()).collect();
        self.kv_array(k, 5, &items)
    }
    fn raw_kv(&mut self, bytes: &[u8]) -> &mut Self {
        self.meta.extend(bytes);
        self.n_meta += 1;
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_meta.to_le_bytes());
        out.extend(&self.meta);
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            Self::string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

fn open_bytes(b: &[u8]) -> Result<Gguf, GgufError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b).expect("write");
    Gguf::open(&path)
}

fn refused(b: &[u8], needle: &str) {
    match open_bytes(b) {
        Ok(_) => panic!("accepted a file that should be refused ({needle})"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "error {:?} does not mention {needle:?}",
            e.to_string()
        ),
    }
}

fn valid() -> Writer {
    let mut w = Writer::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .tensor("a", &[32, 2], 0, vec![0u8; 256])
        .tensor("b", &[32], 8, vec![0u8; 34]);
    w
}

#[test]
fn a_valid_file_parses() {
    let g = open_bytes(&valid().bytes()).expect("valid file");
    assert_eq!(g.version, 3);
    assert_eq!(g.str("general.architecture"), Some("llama"));
    assert_eq!(g.tensors["a"].shape(), vec![2, 32]);
    assert_eq!(g.tensors["b"].ty, GgmlType::Q8_0);
}

#[test]
fn hostile_headers_are_refused_with_the_reason() {
    let good = valid().bytes();
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    refused(&bad_magic, "bad magic");
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    refused(&v1, "version 1 is not supported");
    let mut v9 = good.clone();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    refused(&v9, "version 9");
    refused(&good[..3], "needs 4 bytes");
    // Truncated inside the data section: the last tensor runs past the end.
    refused(&good[..good.len() - 40], "runs past the end of the file");
    // A tensor count the file cannot hold.
    let mut many = good.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&many, "tensor count");
    // A metadata string claiming 2^62 bytes.
    let mut w = valid();
    let mut kv = Vec::new();
    Writer::string(&mut kv, "huge");
    kv.extend(8u32.to_le_bytes());
    kv.extend((1u64 << 62).to_le_bytes());
    w.raw_kv(&kv);
    refused(&w.bytes(), "length");
    // An array of 2^40 u32.
    let mut w = valid();
    let mut kv = Vec::new();
    Writer::string(&mut kv, "arr");
    kv.extend(9u32.to_le_bytes());
    kv.extend(4u32.to_le_bytes());
    kv.extend((1u64 << 40).to_le_bytes());
    w.raw_kv(&kv);
    refused(&w.bytes(), "array length");
    // Unknown value type.
    let mut w = valid();
    let mut kv = Vec::new();
    Writer::string(&mut kv, "odd");
    kv.extend(77u32.to_le_bytes());
    w.raw_kv(&kv);
    refused(&w.bytes(), "unknown value type 77");
    // Unknown tensor type.
    let mut w = valid();
    w.tensor("c", &[32], 99, vec![0u8; 32]);
    refused(&w.bytes(), "unknown GGML type 99");
    // Shapes whose product overflows.
    let mut w = valid();
    w.tensor("c", &[1 << 32, 1 << 32, 1 << 32], 0, vec![]);
    refused(&w.bytes(), "overflows");
    // Five dimensions.
    let mut w = valid();
    w.tensor("c", &[1, 1, 1, 1, 1], 0, vec![0u8; 4]);
    refused(&w.bytes(), "5 dimensions");
    // A row that is not whole blocks.
    let mut w = valid();
    w.tensor("c", &[20], 2, vec![0u8; 32]);
    refused(&w.bytes(), "multiple of 32");
    // Duplicate tensor name and duplicate key.
    let mut w = valid();
    w.tensor("a", &[32], 0, vec![0u8; 128]);
    refused(&w.bytes(), "appears twice");
    let mut w = valid();
    w.kv_u32("llama.block_count", 2);
    refused(&w.bytes(), "appears twice");
    // Invalid UTF-8 in a key.
    let mut w = valid();
    let mut kv = Vec::new();
    kv.extend(2u64.to_le_bytes());
    kv.extend([0xff, 0xfe]);
    kv.extend(4u32.to_le_bytes());
    kv.extend(1u32.to_le_bytes());
    w.raw_kv(&kv);
    refused(&w.bytes(), "not UTF-8");
}

#[test]
fn llama_rows_are_unpermuted_per_head() {
    let src = model::Source {
        info: TensorInfo {
            ty: GgmlType::F32,
            dims: vec![1, 8],
            bytes: 0..32,
        },
        permuted: Some(4),
    };
    // HF rows 0,1 of a head are GGUF rows 0,2; HF rows 2,3 are GGUF rows 1,3.
    let rows: Vec<usize> = (0..8).map(|r| src.row(r)).collect();
    assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
}

/// A SentencePiece vocabulary: `<unk> <s> </s> <0x41> ▁ a b ab ▁a ▁ab` with scores.
fn spm_vocab(scores: &[f32]) -> Writer {
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x41>",
        "\u{2581}",
        "a",
        "b",
        "ab",
        "\u{2581}a",
        "\u{2581}ab",
    ];
    let mut w = valid();
    w.kv_str("tokenizer.ggml.model", "llama")
        .kv_strs("tokenizer.ggml.tokens", &tokens)
        .kv_i32s("tokenizer.ggml.token_type", &[2, 3, 3, 6, 1, 1, 1, 1, 1, 1])
        .kv_f32s("tokenizer.ggml.scores", scores)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv_u32("tokenizer.ggml.unknown_token_id", 0);
    w
}

#[test]
fn sentencepiece_merges_follow_the_scores() {
    // "ab" (-1) before "▁a" (-2) before "▁ab" (-3): the pair whose token scores highest first;
    // "▁ab" can be cut two ways, the longer left part first (transformers' order).
    let g =
        open_bytes(&spm_vocab(&[0., 0., 0., 0., -9., -9., -9., -1., -2., -3.]).bytes()).unwrap();
    let files = super::vocab::tokenizer_files(&g).unwrap();
    let t = &files.tokenizer_json;
    let merges: Vec<String> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    assert_eq!(merges, ["a b", "\u{2581} a", "\u{2581}a b", "\u{2581} ab"]);
    assert_eq!(t["model"]["byte_fallback"], true);
    assert_eq!(t["model"]["unk_token"], "<unk>");
    assert_eq!(t["normalizer"]["normalizers"][0]["type"], "Prepend");
    // control and unknown tokens are added (matched whole in text), byte tokens are not
    let added: Vec<&str> = t["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["content"].as_str().unwrap())
        .collect();
    assert_eq!(added, ["<unk>", "<s>", "</s>"]);
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    assert_eq!(files.tokenizer_config["add_bos_token"], true);
    assert_eq!(
        t["post_processor"]["single"][0]["SpecialToken"]["id"],
        "<s>"
    );
}

#[test]
fn bad_sentencepiece_vocabularies_are_refused_with_the_reason() {
    let err =
        |w: &Writer| super::vocab::tokenizer_files(&open_bytes(&w.bytes()).unwrap()).unwrap_err();
    let mut nan = [0f32; 10];
    nan[7] = f32::NAN;
    assert!(err(&spm_vocab(&nan)).contains("tokenizer.ggml.scores[7] is not a finite number"));
    assert!(
        err(&spm_vocab(&[0.; 9])).contains("tokenizer.ggml.scores has 9 entries for 10 tokens")
    );
    let mut w = valid();
    w.kv_str("tokenizer.ggml.model", "llama")
        .kv_strs("tokenizer.ggml.tokens", &["<unk>", "a"]);
    assert!(err(&w).contains("tokenizer.ggml.scores is missing"));
    let mut w = valid();
    w.kv_str("tokenizer.ggml.model", "bert")
        .kv_strs("tokenizer.ggml.tokens", &["a"]);
    let e = err(&w);
    assert!(
        e.contains("\"bert\" is not supported") && e.contains("\"llama\""),
        "{e}"
    );
}
