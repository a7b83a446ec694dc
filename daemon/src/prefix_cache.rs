//! Kept prefixes on disk (`[model] prefix_cache_dir`): the KV rows of each `[model]
//! system_prompts` entry, saved after start-up computed them and restored on the next start,
//! so even the first question after a reboot skips the system prompt's prefill.
//!
//! One file per prefix, named by a hash of what it depends on: the package (the SHA-256 of its
//! `SHA256SUMS`, which the daemon verified against the files at load), the backend, the KV
//! capacity and the prefix's token ids. A file is used only when all of them match its header
//! and the SHA-256 of its rows matches too; anything else (another package, a torn write, a
//! file edited by hand) is ignored with a warning and the prefix is computed as without the
//! cache, then saved again. Files are written to a temporary name and renamed into place.
//!
//! Layout: the line `edgellm-kv 1`, one line of JSON (the header: package, backend,
//! max_length, ids, pos, each part's shape, the rows' SHA-256), then the rows as little-endian
//! f32, part after part. A header over 16 MiB, or rows whose size is not what the shapes say,
//! are refused before anything is allocated for them.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{KvPart, KvSnapshot};

const MAGIC: &str = "edgellm-kv 1";
const MAX_HEADER: u64 = 16 << 20;

/// What a saved prefix must match to be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// SHA-256 of the package's `SHA256SUMS` (hex).
    pub package: String,
    pub backend: String,
    pub max_length: usize,
    pub ids: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    key: Key,
    pos: usize,
    shapes: Vec<Vec<usize>>,
    rows_sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies a package folder: the SHA-256 of its `SHA256SUMS` (hex); `None` when it has
/// none (nothing would tell a changed package from the one a file was made from).
pub fn package_digest(package_dir: &Path) -> Option<String> {
    let sums = std::fs::read(package_dir.join("SHA256SUMS")).ok()?;
    Some(hex(&Sha256::digest(&sums)))
}

impl Key {
    /// The key for `ids` on the package whose [`package_digest`] is `package`.
    pub fn new(package: &str, backend: &str, max_length: usize, ids: &[u32]) -> Key {
        Key {
            package: package.to_string(),
            backend: backend.to_string(),
            max_length,
            ids: ids.to_vec(),
        }
    }

    /// The file for this key in `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(self).unwrap_or_default());
        dir.join(format!("prefix-{}.kv", &hex(&h.finalize())[..32]))
    }
}

fn rows_digest(parts: &[KvPart]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        for v in &p.data {
            h.update(v.to_le_bytes());
        }
    }
    hex(&h.finalize())
}

/// Writes `snapshot` for `key` into `dir` (created if missing); returns the file.
pub fn save(dir: &Path, key: &Key, snapshot: &KvSnapshot) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = key.path(dir);
    let header = Header {
        key: key.clone(),
        pos: snapshot.pos,
        shapes: snapshot.parts.iter().map(|p| p.shape.clone()).collect(),
        rows_sha256: rows_digest(&snapshot.parts),
    };
    let tmp = path.with_extension(format!("kv.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(f, "{MAGIC}")?;
        serde_json::to_writer(&mut f, &header)?;
        writeln!(f)?;
        for p in &snapshot.parts {
            for v in &p.data {
                f.write_all(&v.to_le_bytes())?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    match result.and_then(|()| std::fs::rename(&tmp, &path)) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The snapshot saved for `key` in `dir`: `Ok(None)` when there is none, `Err` (the reason)
/// when the file is there but does not match or is damaged.
pub fn load(dir: &Path, key: &Key) -> Result<Option<KvSnapshot>, String> {
    let path = key.path(dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let bad = |why: String| format!("{}: {why}", path.display());
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut r = std::io::BufReader::new(file);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| bad(e.to_string()))?;
    if line.trim_end() != MAGIC {
        return Err(bad(format!(
            "not an edgellm prefix file (no {MAGIC:?} line)"
        )));
    }
    let mut raw = Vec::new();
    (&mut r)
        .take(MAX_HEADER)
        .read_until(b'\n', &mut raw)
        .map_err(|e| bad(e.to_string()))?;
    let header_len = (line.len() + raw.len()) as u64;
    let header: Header = serde_json::from_slice(&raw).map_err(|e| bad(format!("header: {e}")))?;
    if header.key != *key {
        return Err(bad(
            "made for another package, backend, max_length or prompt".into(),
        ));
    }
    let counts: Option<Vec<usize>> = header
        .shapes
        .iter()
        .map(|s| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)))
        .collect();
    let counts = counts.ok_or_else(|| bad("a shape overflows".into()))?;
    let total = counts
        .iter()
        .try_fold(0u64, |a, &n| a.checked_add(n as u64 * 4))
        .ok_or_else(|| bad("the shapes overflow".into()))?;
    if size.checked_sub(header_len) != Some(total) {
        return Err(bad(format!(
            "{size} bytes, but its header describes {total} bytes of rows after {header_len}"
        )));
    }
    let mut parts = Vec::with_capacity(counts.len());
    let mut buf = Vec::new();
    for (shape, n) in header.shapes.iter().zip(counts) {
        buf.resize(n * 4, 0);
        r.read_exact(&mut buf).map_err(|e| bad(e.to_string()))?;
        let data = buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        parts.push(KvPart {
            shape: shape.clone(),
            data,
        });
    }
    if rows_digest(&parts) != header.rows_sha256 {
        return Err(bad(
            "its rows do not match their SHA-256 (a damaged file)".into()
        ));
    }
    Ok(Some(KvSnapshot {
        backend: key.backend.clone(),
        pos: header.pos,
        parts,
    }))
}
