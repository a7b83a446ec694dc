//! Read-only view of a Hugging Face safetensors checkpoint (`model.safetensors`, or shards listed
//! by `model.safetensors.index.json`). Files are memory-mapped; a tensor is converted to f32 only
//! when the exporter asks for it, a row range at a time, so peak memory follows the largest
//! tensor (or row chunk), never the model. Every read copies out of the map and then drops the
//! pages it read from the process (`MADV_DONTNEED`; they stay in the page cache), so the
//! checkpoint does not accumulate in the exporter's resident set either.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{ExportError, Result};
use crate::gguf::Gguf;
use crate::gguf::blocks::{self, GgmlType};
use crate::gguf::model::{GgufModel, gguf_row};

/// Element types found in HF checkpoints that we can read, and GGUF's block types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    U8,
    Ggml(GgmlType),
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "U8" => Dtype::U8,
            _ => return None,
        })
    }

    /// Bytes per element of a safetensors dtype (GGUF types are sized per row).
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U8 => 1,
            Dtype::Ggml(t) => t.block().1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range inside the mapped file (header already skipped).
    bytes: Range<usize>,
    /// GGUF only: rows stored in llama.cpp's RoPE order, `Some(head_dim)`
    /// ([`crate::gguf::model::gguf_row`]).
    permuted: Option<usize>,
}

#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    maps: Vec<Mmap>,
    tensors: HashMap<String, TensorInfo>,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl Checkpoint {
    /// Opens `model.safetensors` or the shards named by `model.safetensors.index.json` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(ExportError::io(&index))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ExportError::config(&index, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ExportError::config(&index, "no \"weight_map\" object"))?;
            let unique: std::collections::BTreeSet<&str> =
                map.values().filter_map(|f| f.as_str()).collect();
            // Shards are files of this folder: an index is downloaded, untrusted input, and
            // must not make the exporter read `/etc/...` or `../...` (the `safetensors` fuzz
            // target checks it).
            unique
                .into_iter()
                .map(|f| {
                    let plain = !f.is_empty()
                        && Path::new(f)
                            .components()
                            .all(|c| matches!(c, std::path::Component::Normal(_)));
                    plain.then(|| dir.join(f)).ok_or_else(|| {
                        ExportError::config(
                            &index,
                            format!("weight_map names {f:?}, not a file inside the checkpoint"),
                        )
                    })
                })
                .collect::<Result<_>>()?
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            maps: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in files {
            if !path.exists() {
                return Err(ExportError::MissingFile {
                    path,
                    why: "safetensors weights (model.safetensors or the shards of model.safetensors.index.json)",
                });
            }
            ck.add_file(&path)?;
        }
        Ok(ck)
    }

    /// A GGUF file seen through Hugging Face tensor names (`model`'s mapping).
    pub fn from_gguf(g: Gguf, model: &GgufModel) -> Self {
        let mut tensors = HashMap::new();
        for (name, src) in &model.tensors {
            tensors.insert(
                name.clone(),
                TensorInfo {
                    dtype: match src.info.ty {
                        GgmlType::F32 => Dtype::F32,
                        GgmlType::F16 => Dtype::F16,
                        GgmlType::BF16 => Dtype::BF16,
                        t => Dtype::Ggml(t),
                    },
                    shape: src.info.shape(),
                    file: 0,
                    bytes: src.info.bytes.clone(),
                    permuted: src.permuted,
                },
            );
        }
        Checkpoint {
            dir: g.path.clone(),
            maps: vec![g.map],
            tensors,
        }
    }

    /// The GGUF block type of a tensor (`None` for float tensors and safetensors).
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        match self.tensors.get(name)?.dtype {
            Dtype::Ggml(t) => Some(t),
            _ => None,
        }
    }

    /// Rows `rows` of a GGUF block tensor, raw, in Hugging Face row order.
    pub fn raw_rows(&self, name: &str, rows: Range<usize>) -> Result<(GgmlType, Vec<u8>)> {
        let info = self.info(name)?;
        let Dtype::Ggml(ty) = info.dtype else {
            return Err(ExportError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
                expected: "a GGUF block type",
            });
        };
        let [nrows, k] = info.shape[..] else {
            return Err(ExportError::BadTensor {
                name: name.to_string(),
                msg: format!("shape {:?} is not a matrix", info.shape),
            });
        };
        if rows.end > nrows {
            return Err(ExportError::BadTensor {
                name: name.to_string(),
                msg: format!("row range {rows:?} outside {nrows} rows"),
            });
        }
        let row_bytes = ty.row_bytes(k);
        let mut out = Vec::with_capacity(rows.len() * row_bytes);
        for r in rows.clone() {
            let src = gguf_row(r, info.permuted);
            let start = info.bytes.start + src * row_bytes;
            out.extend_from_slice(&self.maps[info.file][start..start + row_bytes]);
        }
        if info.permuted.is_none() {
            let start = info.bytes.start + rows.start * row_bytes;
            self.release(info.file, start..start + rows.len() * row_bytes);
        }
        Ok((ty, out))
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(ExportError::io(path))?;
        // SAFETY: the checkpoint is opened read-only and is not expected to change while the
        // export runs; a concurrent writer could only corrupt the output, not memory safety of
        // our own data structures (we copy out of the map before use).
        let map = unsafe { Mmap::map(&file) }.map_err(ExportError::io(path))?;
        // Read-ahead helps the mostly front-to-back order of an export; failure is harmless.
        let _ = map.advise(Advice::Sequential);
        let corrupt = |msg: String| ExportError::CorruptHeader {
            path: path.to_path_buf(),
            msg,
        };
        if map.len() < 8 {
            return Err(corrupt(format!("file is {} bytes long", map.len())));
        }
        let n = u64::from_le_bytes(map[..8].try_into().expect("8-byte slice")) as usize;
        if n > map.len() - 8 || n > 100 << 20 {
            return Err(corrupt(format!(
                "header length {n} exceeds the file size {}",
                map.len()
            )));
        }
        let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&map[8..8 + n])
            .map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
        let data_start = 8 + n;
        let file_idx = self.maps.len();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry: HeaderEntry = serde_json::from_value(value)
                .map_err(|e| corrupt(format!("entry {name:?}: {e}")))?;
            let dtype =
                Dtype::parse(&entry.dtype).ok_or_else(|| ExportError::UnsupportedDtype {
                    name: name.clone(),
                    dtype: entry.dtype.clone(),
                    expected: "F32, F16, BF16 (or U8 for MXFP4 blocks/scales)",
                })?;
            let [start, end] = entry.data_offsets;
            let numel: usize = entry.shape.iter().product();
            if end < start || end - start != numel * dtype.size() || data_start + end > map.len() {
                return Err(corrupt(format!(
                    "entry {name:?}: offsets {start}..{end} do not match shape {:?} x {} bytes within a {}-byte file",
                    entry.shape,
                    dtype.size(),
                    map.len()
                )));
            }
            self.tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: entry.shape,
                    file: file_idx,
                    bytes: data_start + start..data_start + end,
                    permuted: None,
                },
            );
        }
        self.maps.push(map);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor's name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| ExportError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Looks a tensor up and checks its shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.info(name)?;
        if info.shape != shape {
            return Err(ExportError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(info)
    }

    /// Bytes `range` of a U8 tensor (MXFP4 blocks and scales), copied out of the map.
    pub fn bytes(&self, name: &str, range: Range<usize>) -> Result<Vec<u8>> {
        let info = self.info(name)?;
        if info.dtype != Dtype::U8 {
            return Err(ExportError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
                expected: "U8",
            });
        }
        if range.end > info.bytes.len() {
            return Err(ExportError::BadTensor {
                name: name.to_string(),
                msg: format!("byte range {range:?} outside {} bytes", info.bytes.len()),
            });
        }
        let abs = info.bytes.start + range.start..info.bytes.start + range.end;
        let out = self.maps[info.file][abs.clone()].to_vec();
        self.release(info.file, abs);
        Ok(out)
    }

    /// Drops the whole pages inside `range` of file `file` from our resident set.
    fn release(&self, file: usize, range: Range<usize>) {
        const PAGE: usize = 4096;
        let start = range.start.div_ceil(PAGE) * PAGE;
        let end = range.end / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is a private read-only file mapping that we only read; dropping
            // its pages makes a later read fetch the same bytes from the file again. No
            // reference into the range outlives this call (callers copy out first).
            let _ = unsafe {
                self.maps[file].unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// The whole tensor as f32 (exact for F32/F16/BF16).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let rows = info.shape.first().copied().unwrap_or(1);
        self.f32_rows(name, 0..rows)
    }

    /// Rows `rows` of the tensor (split along its first dimension) as f32.
    pub fn f32_rows(&self, name: &str, rows: Range<usize>) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let row_len: usize = info.shape.iter().skip(1).product();
        let nrows = info.shape.first().copied().unwrap_or(1);
        if rows.end > nrows {
            return Err(ExportError::BadTensor {
                name: name.to_string(),
                msg: format!("row range {rows:?} outside {nrows} rows"),
            });
        }
        if info.permuted.is_some() || matches!(info.dtype, Dtype::Ggml(_)) {
            return self.gguf_f32_rows(name, info, rows, row_len);
        }
        let sz = info.dtype.size();
        let start = info.bytes.start + rows.start * row_len * sz;
        let end = info.bytes.start + rows.end * row_len * sz;
        let raw = &self.maps[info.file][start..end];
        let out = match info.dtype {
            Dtype::F32 => convert(raw, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => convert(raw, 2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            // bf16 is the top half of an f32: exact, and a shift instead of a library call.
            Dtype::BF16 => convert(raw, 2, |b| {
                f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
            }),
            Dtype::U8 | Dtype::Ggml(_) => {
                return Err(ExportError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: "U8".into(),
                    expected: "F32, F16 or BF16",
                });
            }
        };
        self.release(info.file, start..end);
        Ok(out)
    }
}

impl Checkpoint {
    /// GGUF rows (block types, or float rows stored permuted), dequantized exactly as llama.cpp
    /// does, in Hugging Face row order.
    fn gguf_f32_rows(
        &self,
        name: &str,
        info: &TensorInfo,
        rows: Range<usize>,
        row_len: usize,
    ) -> Result<Vec<f32>> {
        let ty = match info.dtype {
            Dtype::Ggml(t) => t,
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            Dtype::U8 => unreachable!("safetensors U8 tensors are never GGUF"),
        };
        if !ty.can_dequantize() {
            return Err(ExportError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("GGUF {ty:?}"),
                expected: GgmlType::EXACT,
            });
        }
        let map = &self.maps[info.file];
        if info.shape.len() == 1 {
            let mut out = Vec::new();
            blocks::dequantize_row(ty, &map[info.bytes.clone()], &mut out);
            return Ok(out[rows].to_vec());
        }
        let k = row_len;
        let row_bytes = ty.row_bytes(k);
        let mut out = Vec::with_capacity(rows.len() * k);
        for r in rows {
            let src = gguf_row(r, info.permuted);
            let start = info.bytes.start + src * row_bytes;
            blocks::dequantize_row(ty, &map[start..start + row_bytes], &mut out);
        }
        Ok(out)
    }
}

/// Converts little-endian elements of `size` bytes to f32, split over the cores when large.
fn convert(raw: &[u8], size: usize, f: impl Fn(&[u8]) -> f32 + Sync) -> Vec<f32> {
    let n = raw.len() / size;
    let mut out = vec![0.0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = if n < 1 << 18 {
        n.max(1)
    } else {
        n.div_ceil(threads)
    };
    std::thread::scope(|s| {
        for (dst, src) in out.chunks_mut(per).zip(raw.chunks(per * size)) {
            let f = &f;
            s.spawn(move || {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(size)) {
                    *d = f(b);
                }
            });
        }
    });
    out
}
