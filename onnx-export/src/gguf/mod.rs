//! GGUF files (llama.cpp's model format) as an export source.
//!
//! - this file: the container, read from a memory map and validated before anything is used.
//!   A GGUF file is untrusted input: every length, count, offset and shape is checked against
//!   the file's size with checked arithmetic, so a corrupt, truncated or hostile file is refused
//!   with an error naming the problem (never a panic, never an allocation larger than the file).
//! - [`blocks`]: the block formats (dequantization, and the exact `MatMulNBits` forms).
//! - [`model`]: metadata -> a Hugging Face `config.json`, llama.cpp tensor names -> HF names.
//! - [`vocab`]: tokenizer metadata -> `tokenizer.json` + `tokenizer_config.json`.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version u32, tensor count u64, metadata
//! count u64, the metadata (key string, value type u32, value), the tensor infos (name, rank
//! u32, dims u64 innermost first, type u32, offset u64 relative to the data section), padding
//! to `general.alignment` (default 32), the data section.

pub mod blocks;
pub mod model;
pub mod vocab;

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use blocks::GgmlType;

/// A GGUF file refused while reading its header.
#[derive(Debug, thiserror::Error)]
#[error("{path}: not a usable GGUF file: {msg}")]
pub struct GgufError {
    pub path: PathBuf,
    pub msg: String,
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) => u64::try_from(v).ok()?,
            Value::I16(v) => u64::try_from(v).ok()?,
            Value::I32(v) => u64::try_from(v).ok()?,
            Value::I64(v) => u64::try_from(v).ok()?,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::F32(v) => v as f64,
            Value::F64(v) => v,
            _ => self.as_u64()? as f64,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub ty: GgmlType,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension, i.e. K of a `[N, K]` weight.
    pub dims: Vec<usize>,
    /// Absolute byte range in the file.
    pub bytes: Range<usize>,
}

impl TensorInfo {
    /// The shape in row-major (Hugging Face / numpy) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file: the map, its metadata and its tensor table.
#[derive(Debug)]
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub map: Mmap,
}

/// Dimensions per tensor that GGUF allows (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Nesting of metadata arrays we accept (GGUF files in the wild use arrays of scalars/strings).
const MAX_ARRAY_DEPTH: usize = 2;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Res<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Res<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {} needs {n} bytes but the file ends at {}",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count of items of at least `min_size` bytes each: bounded by what the file can hold.
    fn count(&mut self, what: &str, min_size: usize) -> Res<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_size.max(1)) as u64;
        if n > fits {
            return Err(format!(
                "{what} {n} at byte {at}: the {} bytes left in the file hold at most {fits}",
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Res<String> {
        let len = self.count(&format!("{what} length"), 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{what} is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Res<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("metadata {key:?}: bool byte {b}")),
            },
            8 => Value::Str(self.string(&format!("metadata {key:?}"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "metadata {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("metadata {key:?}: unknown array element type {t}")),
                };
                let n = self.count(&format!("metadata {key:?} array length"), min)?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(format!("metadata {key:?}: unknown value type {t}")),
        })
    }
}

impl Gguf {
    /// Maps and validates `path`: header, metadata, tensor table, and that every tensor's data
    /// lies inside the file at its declared size.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let err = |msg: String| GgufError {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        // SAFETY: opened read-only; every read copies out of the map after bounds checks. A file
        // truncated by someone else while we run can raise SIGBUS, as with any mapped file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(e.to_string()))?;
        let (version, metadata, tensors) = Self::parse(&map).map_err(err)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(buf: &[u8]) -> Res<(u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>)> {
        let mut r = Reader { buf, pos: 0 };
        let magic = r.array::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(format!(
                "bad magic {magic:02x?} (a GGUF file starts with \"GGUF\")"
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            ));
        }
        // A tensor info is at least 8 (name length) + 4 (rank) + 4 (type) + 8 (offset) bytes; a
        // metadata entry at least 8 (key length) + 4 (type) + 1 bytes.
        let n_tensors = r.count("tensor count", 24)?;
        let n_kv = r.count("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(format!("metadata key {key:?} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(format!("general.alignment {v:?} is not a power of two")),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let rank = r.u32(&name)?;
            if rank == 0 || rank > MAX_DIMS {
                return Err(format!(
                    "tensor {name:?}: {rank} dimensions (1 to {MAX_DIMS} allowed)"
                ));
            }
            let mut dims = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                let d = r.u64(&name)?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(format!("tensor {name:?}: dimension {d}"));
                }
                dims.push(d as usize);
            }
            let ty_id = r.u32(&name)?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| format!("tensor {name:?}: unknown GGML type {ty_id}"))?;
            let offset = r.u64(&name)?;
            raw.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in raw {
            let numel = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("tensor {name:?}: shape {dims:?} overflows"))?;
            let (block, block_bytes) = ty.block();
            if dims[0] % block != 0 {
                return Err(format!(
                    "tensor {name:?}: {ty:?} needs rows of a multiple of {block} values, found {}",
                    dims[0]
                ));
            }
            let size = (numel / block)
                .checked_mul(block_bytes)
                .ok_or_else(|| format!("tensor {name:?}: size overflows"))?;
            if offset % alignment as u64 != 0 {
                return Err(format!(
                    "tensor {name:?}: data offset {offset} is not aligned to {alignment}"
                ));
            }
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(size));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(format!("tensor {name:?}: data offset {offset} overflows"));
            };
            if end > buf.len() {
                return Err(format!(
                    "tensor {name:?}: data {start}..{end} ({ty:?}, shape {:?}) runs past the end of the file ({} bytes); the file is truncated or corrupt",
                    dims.iter().rev().collect::<Vec<_>>(),
                    buf.len()
                ));
            }
            let info = TensorInfo {
                ty,
                dims,
                bytes: start..end,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format!("tensor {name:?} appears twice"));
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The raw bytes of a tensor.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.bytes.clone()]
    }
}

#[cfg(test)]
mod tests;
