//! Weight encodings.
//!
//! * int4 blockwise, exactly as ONNX Runtime's `MatMulNBitsQuantizer` writes it by default
//!   (symmetric, no zero points): per block of `block` values along K, `scale = v / -8` where `v`
//!   is the value of largest magnitude (sign kept, so it maps exactly to code 0), then
//!   `q = clamp(round_half_even(w / scale) + 8, 0, 15)`, dequantized as `(q - 8) * scale`.
//!   Two codes per byte, low nibble first. One row of `[N, K]` becomes `ceil(K/block)` blobs of
//!   `block/2` bytes and `ceil(K/block)` f32 scales: the `B [N, k_blocks, block/2]` and
//!   `scales [N, k_blocks]` inputs of `MatMulNBits`, `QMoE` and `GatherBlockQuantized`.
//! * MXFP4 decoding (gpt-oss experts as released): `blocks [.., 16]` bytes holding 32 e2m1 codes
//!   (low nibble = even element) and one e8m0 scale byte per 32 values.

/// Quantizes `rows` (row-major `[n, k]`) to int4; appends packed bytes and scales. Large inputs
/// are split by rows over the machine's cores; the output order is the row order either way.
pub fn quantize_rows(
    rows: &[f32],
    k: usize,
    block: usize,
    packed: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    let n = rows.len() / k;
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n);
    if threads <= 1 || rows.len() < 1 << 18 {
        return quantize_serial(rows, k, block, packed, scales);
    }
    let per_thread = n.div_ceil(threads) * k;
    let parts: Vec<(Vec<u8>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(per_thread)
            .map(|part| {
                s.spawn(move || {
                    let (mut p, mut sc) = (Vec::new(), Vec::new());
                    quantize_serial(part, k, block, &mut p, &mut sc);
                    (p, sc)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("quantization threads do not panic"))
            .collect()
    });
    for (p, sc) in parts {
        packed.extend_from_slice(&p);
        scales.extend_from_slice(&sc);
    }
}

/// Round half to even for |x| <= 2^22 without a libm call: adding 1.5 * 2^23 pushes the
/// fraction out of the mantissa under the default round-to-nearest-even mode.
#[inline]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

fn quantize_serial(
    rows: &[f32],
    k: usize,
    block: usize,
    packed: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    let k_blocks = k.div_ceil(block);
    packed.reserve(rows.len() / 2 + block);
    scales.reserve(rows.len() / block + 1);
    let mut padded = vec![0.0f32; block];
    for row in rows.chunks_exact(k) {
        for b in 0..k_blocks {
            let vals = &row[b * block..((b + 1) * block).min(k)];
            let vals = if vals.len() == block {
                vals
            } else {
                // A partial last block is zero-padded (code 8), as ORT's quantizer does.
                padded.fill(0.0);
                padded[..vals.len()].copy_from_slice(vals);
                &padded
            };
            let scale = extreme(vals) / -8.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            packed.extend(
                vals.chunks_exact(2)
                    .map(|p| code(p[0], inv) | (code(p[1], inv) << 4)),
            );
            scales.push(scale);
        }
    }
}

/// The value of largest magnitude, sign kept; on a tie between `+a` and `-a`, the first one
/// (numpy's `argmax(abs)`, which ORT's quantizer uses). Max and min reduce to SIMD; the scan
/// runs only on exact ties.
#[inline]
fn extreme(vals: &[f32]) -> f32 {
    let max = vals.iter().copied().fold(f32::MIN, f32::max);
    let min = vals.iter().copied().fold(f32::MAX, f32::min);
    if max > -min {
        max
    } else if -min > max {
        min
    } else {
        vals.iter().copied().find(|v| v.abs() == max).unwrap_or(0.0)
    }
}

#[inline]
fn code(v: f32, inv: f32) -> u8 {
    (round_half_even(v * inv) + 8.0).clamp(0.0, 15.0) as u8
}

/// Inverse of [`quantize_rows`] for one row (used by tests and parity checks).
pub fn dequantize_row(packed: &[u8], scales: &[f32], k: usize, block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(k);
    for (b, &scale) in scales.iter().enumerate() {
        let blob = &packed[b * block / 2..(b + 1) * block / 2];
        for &byte in blob {
            for code in [byte & 0x0f, byte >> 4] {
                if out.len() < k {
                    out.push((code as f32 - 8.0) * scale);
                }
            }
        }
    }
    out
}

/// How float weights become blocks (`--quant`). All three write `MatMulNBits` /
/// `GatherBlockQuantized` blocks with one f32 scale per block; they differ in how codes and
/// scales are chosen, and `asym` adds one uint8 zero point per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheme {
    /// Round to nearest, the block's extreme value as scale (ONNX Runtime's
    /// `MatMulNBitsQuantizer` and onnxruntime-genai's builder, byte for byte).
    Rtn,
    /// Symmetric: per block, a search over candidate scales; the codes of each candidate are
    /// refitted with their least-squares scale and the candidate with the least squared error
    /// is kept. Never worse than `rtn` (its codes are one of the candidates).
    Mse,
    /// Asymmetric: codes 0..15 with a uint8 zero point per block (pre-packed by ONNX Runtime,
    /// so the fast int8 kernel stays), scale and zero point searched like `mse`, which is also
    /// a candidate (zero point 8), so never worse than `mse`.
    Asym,
    /// Asymmetric with a float minimum per block, `value = scale·q + min` (llama.cpp's Q4_1
    /// grid): written as symmetric codes plus the offset term `Σ_b offset[b]·Σ_{i∈b} x[i]`
    /// (a small f32 MatMul of the activations' block sums), the form the GGUF importer uses
    /// for Q4_1/Q4_K, because ONNX Runtime's float zero points disable its fast kernel. Scale
    /// and minimum are searched and refitted by least squares per block. One more f32 per
    /// block than `mse`.
    #[default]
    Offset,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "rtn" => Scheme::Rtn,
            "mse" => Scheme::Mse,
            "asym" => Scheme::Asym,
            "offset" => Scheme::Offset,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Rtn => "rtn",
            Scheme::Mse => "mse",
            Scheme::Asym => "asym",
            Scheme::Offset => "offset",
        }
    }
}

/// Quantized rows: `codes` in `MatMulNBits`' layout (`[n, k/block, block*bits/8]`), `scales`
/// `[n, k/block]`, and for `asym` `zero_points` `[n, ceil(k_blocks*bits/8)]` packed like the
/// codes (empty otherwise: the default zero point 2^(bits-1) applies), and for `offset` one
/// f32 constant per block added to each of its values (`[n, k/block]`, empty otherwise).
#[derive(Debug, Default, Clone)]
pub struct Blocks {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<u8>,
    pub offsets: Vec<f32>,
}

/// Quantizes row-major `[n, k]` `rows` to `bits` (4 or 8) with `scheme`, appending to `out`.
/// `k` must be a multiple of `block` (except for `rtn`, whose last block is zero-padded). Rows
/// are split over the machine's cores; the result does not depend on the split.
pub fn quantize(rows: &[f32], k: usize, block: usize, bits: u8, scheme: Scheme, out: &mut Blocks) {
    if scheme == Scheme::Rtn && bits == 4 {
        return quantize_rows(rows, k, block, &mut out.codes, &mut out.scales);
    }
    let n = rows.len() / k;
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let per = n.div_ceil(threads).max(1) * k;
    let parts: Vec<Blocks> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    let mut b = Blocks::default();
                    for row in part.chunks_exact(k) {
                        quantize_row(row, block, bits, scheme, &mut b);
                    }
                    b
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("quantization threads do not panic"))
            .collect()
    });
    for p in parts {
        out.codes.extend_from_slice(&p.codes);
        out.scales.extend_from_slice(&p.scales);
        out.zero_points.extend_from_slice(&p.zero_points);
        out.offsets.extend_from_slice(&p.offsets);
    }
}

fn quantize_row(row: &[f32], block: usize, bits: u8, scheme: Scheme, out: &mut Blocks) {
    let nmax = 1i32 << (bits - 1);
    let mut q = vec![0i32; block];
    let mut zps = Vec::with_capacity(row.len().div_ceil(block));
    // A partial last block is zero-padded (MatMulNBits reads only K values of it).
    let mut last = vec![0f32; block];
    let full = row.len() / block * block;
    last[..row.len() - full].copy_from_slice(&row[full..]);
    let tail = (full < row.len()).then_some(last.as_slice());
    for vals in row[..full].chunks_exact(block).chain(tail) {
        let (scale, zp) = match scheme {
            Scheme::Asym if bits == 4 => asym_block(vals, &mut q),
            Scheme::Offset => {
                let (scale, min) = min_block(vals, nmax, &mut q);
                // value = scale·q + min = scale·(q − nmax) + (min + nmax·scale)
                out.offsets.push(min + nmax as f32 * scale);
                (scale, nmax)
            }
            _ => (
                symmetric_block(vals, nmax, scheme == Scheme::Rtn, &mut q),
                nmax,
            ),
        };
        out.scales.push(scale);
        zps.push(zp as u8);
        match bits {
            4 => out.codes.extend(
                q.chunks_exact(2)
                    .map(|p| (p[0] as u8 & 0xf) | ((p[1] as u8 & 0xf) << 4)),
            ),
            _ => out.codes.extend(q.iter().map(|&c| c as u8)),
        }
    }
    if scheme == Scheme::Asym && bits == 4 {
        out.zero_points.extend(
            zps.chunks(2)
                .map(|p| (p[0] & 0xf) | (p.get(1).copied().unwrap_or(8) << 4)),
        );
    }
}

/// Least-squares scale of codes `c` (already minus the zero point) for values `x`, and the
/// squared error it leaves (`Σx² − (Σxc)²/Σc²`, up to the constant Σx²).
#[inline]
fn fit(x: &[f32], c: impl Iterator<Item = f32>) -> (f32, f32) {
    let (mut xc, mut cc) = (0f32, 0f32);
    for (&x, c) in x.iter().zip(c) {
        xc += x * c;
        cc += c * c;
    }
    if cc == 0.0 {
        (0.0, 0.0)
    } else {
        (xc / cc, -(xc * xc) / cc)
    }
}

/// Symmetric block: stored codes `q + nmax` in `q_out`; returns the scale. `rtn`: the extreme
/// value maps to `-nmax` exactly; otherwise candidates around it are refitted.
fn symmetric_block(vals: &[f32], nmax: i32, rtn: bool, q_out: &mut [i32]) -> f32 {
    let v = extreme(vals);
    if v == 0.0 {
        q_out.fill(nmax);
        return 0.0;
    }
    let lo = -(nmax as f32);
    let hi = nmax as f32 - 1.0;
    let code = |x: f32, inv: f32| round_half_even(x * inv).clamp(lo, hi);
    if rtn {
        let scale = v / lo;
        let inv = 1.0 / scale;
        for (q, &x) in q_out.iter_mut().zip(vals) {
            *q = code(x, inv) as i32 + nmax;
        }
        return scale;
    }
    let mut best = (f32::INFINITY, 0.0f32, 0.0f32);
    let steps = if nmax > 8 { 2 } else { 8 };
    for t in -steps..=steps {
        let inv = -(nmax as f32 + 0.1 * t as f32) / v;
        let (s, err) = fit(vals, vals.iter().map(|&x| code(x, inv)));
        if err < best.0 && s != 0.0 {
            best = (err, s, inv);
        }
    }
    let (_, scale, inv) = best;
    for (q, &x) in q_out.iter_mut().zip(vals) {
        *q = code(x, inv) as i32 + nmax;
    }
    scale
}

/// Asymmetric 4-bit block: codes 0..15 in `q_out`; returns (scale, zero point).
fn asym_block(vals: &[f32], q_out: &mut [i32]) -> (f32, i32) {
    let min = vals.iter().copied().fold(f32::MAX, f32::min);
    let max = vals.iter().copied().fold(f32::MIN, f32::max);
    // The symmetric search is one candidate (zero point 8).
    let mut sym = vec![0i32; vals.len()];
    let s_sym = symmetric_block(vals, 8, false, &mut sym);
    let (_, err_sym) = fit(vals, sym.iter().map(|&q| (q - 8) as f32));
    let mut best = (err_sym, s_sym, 8, f32::NAN);
    if max > min {
        for t in -6..=10 {
            let step = (max - min) / (15.0 + 0.1 * t as f32);
            let inv = 1.0 / step;
            let z = round_half_even(-min * inv).clamp(0.0, 15.0);
            let c = |x: f32| (round_half_even(x * inv) + z).clamp(0.0, 15.0) - z;
            let (s, err) = fit(vals, vals.iter().map(|&x| c(x)));
            if err < best.0 && s != 0.0 {
                best = (err, s, z as i32, inv);
            }
        }
    }
    let (_, scale, zp, inv) = best;
    if inv.is_nan() {
        q_out.copy_from_slice(&sym);
    } else {
        for (q, &x) in q_out.iter_mut().zip(vals) {
            *q = (round_half_even(x * inv) + zp as f32).clamp(0.0, 15.0) as i32;
        }
    }
    (scale, zp)
}

/// Block with a float minimum: codes `0..2·nmax` in `q_out`, returns (scale, min) with
/// `value = scale·q + min`. Candidate steps over the block's range; for each, the codes are
/// refitted with the least-squares (scale, min) pair, and the least squared error wins.
fn min_block(vals: &[f32], nmax: i32, q_out: &mut [i32]) -> (f32, f32) {
    let min = vals.iter().copied().fold(f32::MAX, f32::min);
    let max = vals.iter().copied().fold(f32::MIN, f32::max);
    let top = (2 * nmax - 1) as f32;
    if max <= min {
        q_out.fill(0);
        return (0.0, min);
    }
    let n = vals.len() as f32;
    let sx: f32 = vals.iter().sum();
    let mut best = (f32::INFINITY, (max - min) / top, min);
    for t in -6..=10 {
        let step = (max - min) / (top + 0.1 * t as f32);
        let inv = 1.0 / step;
        let code = |x: f32| round_half_even((x - min) * inv).clamp(0.0, top);
        let (mut sq, mut sqq, mut sxq) = (0f32, 0f32, 0f32);
        for &x in vals {
            let q = code(x);
            sq += q;
            sqq += q * q;
            sxq += x * q;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            continue;
        }
        let s = (n * sxq - sx * sq) / det;
        let m = (sx - s * sq) / n;
        // Squared error of the refit, evaluated directly (robust against cancellation).
        let err: f32 = vals
            .iter()
            .map(|&x| {
                let e = x - (s * code(x) + m);
                e * e
            })
            .sum();
        if err < best.0 {
            best = (err, s, m);
        }
    }
    // Codes for the winning pair (they may differ from the candidate's after the refit).
    let (_, s, m) = best;
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    for (q, &x) in q_out.iter_mut().zip(vals) {
        *q = round_half_even((x - m) * inv).clamp(0.0, top) as i32;
    }
    (s, m)
}

/// Inverse of [`quantize`] for one row (tests and reports).
pub fn dequantize_blocks_row(b: &Blocks, row: usize, k: usize, block: usize, bits: u8) -> Vec<f32> {
    let kb = k / block;
    let row_bytes = k * bits as usize / 8;
    let codes = &b.codes[row * row_bytes..(row + 1) * row_bytes];
    let zp_row = kb.div_ceil(2);
    (0..k)
        .map(|i| {
            let (c, z) = match bits {
                4 => {
                    let c = (codes[i / 2] >> (4 * (i % 2))) & 0xf;
                    let blk = i / block;
                    let z = if b.zero_points.is_empty() {
                        8
                    } else {
                        (b.zero_points[row * zp_row + blk / 2] >> (4 * (blk % 2))) & 0xf
                    };
                    (c as f32, z as f32)
                }
                _ => (codes[i] as f32, 128.0),
            };
            let v = b.scales[row * kb + i / block] * (c - z);
            match b.offsets.get(row * kb + i / block) {
                Some(o) => v + o,
                None => v,
            }
        })
        .collect()
}

const FP4_E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Decodes one MXFP4 matrix `[n, k]` from `blocks [n, k/32, 16]` and `scales [n, k/32]`.
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], n: usize, k: usize) -> Vec<f32> {
    let groups = k / 32;
    debug_assert_eq!(blocks.len(), n * groups * 16);
    debug_assert_eq!(scales.len(), n * groups);
    let mut out = Vec::with_capacity(n * k);
    for (g, &e) in scales.iter().enumerate() {
        let scale = 2f32.powi(e as i32 - 127);
        for &byte in &blocks[g * 16..(g + 1) * 16] {
            for code in [byte & 0x0f, byte >> 4] {
                let mag = FP4_E2M1[(code & 7) as usize] * scale;
                out.push(if code & 8 != 0 { -mag } else { mag });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_value_round_trips_exactly_and_error_is_bounded() {
        let row: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let (mut packed, mut scales) = (Vec::new(), Vec::new());
        quantize_rows(&row, 64, 32, &mut packed, &mut scales);
        assert_eq!(packed.len(), 32);
        assert_eq!(scales.len(), 2);
        let back = dequantize_row(&packed, &scales, 64, 32);
        for b in 0..2 {
            let blk = &row[b * 32..(b + 1) * 32];
            let ext = blk
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let i = blk.iter().position(|&v| v == ext).unwrap();
            assert_eq!(back[b * 32 + i], ext);
            for (x, y) in blk.iter().zip(&back[b * 32..(b + 1) * 32]) {
                assert!(
                    (x - y).abs() <= scales[b].abs() * 0.5 + 1e-6
                        || (x - y).abs() <= scales[b].abs()
                );
            }
        }
    }

    #[test]
    fn fast_rounding_is_round_half_even() {
        for i in -1700..=1700 {
            let x = i as f32 / 100.0;
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 7.5, -7.5, 8.5] {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn parallel_and_serial_quantization_agree() {
        let rows: Vec<f32> = (0..(1i64 << 19))
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let (mut p1, mut s1, mut p2, mut s2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        quantize_rows(&rows, 1024, 32, &mut p1, &mut s1);
        quantize_serial(&rows, 1024, 32, &mut p2, &mut s2);
        assert_eq!(p1, p2);
        assert_eq!(s1, s2);
    }

    #[test]
    fn zero_block_encodes_as_code_eight() {
        let (mut packed, mut scales) = (Vec::new(), Vec::new());
        quantize_rows(&[0.0; 32], 32, 32, &mut packed, &mut scales);
        assert!(packed.iter().all(|&b| b == 0x88));
        assert_eq!(scales, vec![-0.0]);
    }

    fn squared_error(row: &[f32], scheme: Scheme, bits: u8) -> f64 {
        let mut b = Blocks::default();
        quantize(row, row.len(), 32, bits, scheme, &mut b);
        let back = dequantize_blocks_row(&b, 0, row.len(), 32, bits);
        row.iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    }

    #[test]
    fn searched_schemes_are_never_worse_than_round_to_nearest() {
        // Gaussian-ish weights with an outlier per block, and a skewed block.
        let mut row: Vec<f32> = (0..4096)
            .map(|i| {
                let u = ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
                let w = ((i * 104729 % 997) as f32 / 997.0) - 0.5;
                (u + w) * 0.05 + if i % 32 == 5 { 0.2 } else { 0.0 }
            })
            .collect();
        for v in &mut row[..32] {
            *v = v.abs() + 0.1;
        }
        let rtn = squared_error(&row, Scheme::Rtn, 4);
        let mse = squared_error(&row, Scheme::Mse, 4);
        let asym = squared_error(&row, Scheme::Asym, 4);
        let offset = squared_error(&row, Scheme::Offset, 4);
        assert!(offset < asym, "offset {offset} >= asym {asym}");
        assert!(mse <= rtn * 1.0001, "mse {mse} > rtn {rtn}");
        assert!(asym <= mse * 1.0001, "asym {asym} > mse {mse}");
        assert!(
            asym < rtn * 0.9,
            "asym {asym} should clearly beat rtn {rtn}"
        );
        // 8 bits: far below 4 bits.
        assert!(squared_error(&row, Scheme::Mse, 8) < rtn / 100.0);
    }

    #[test]
    fn rtn_through_quantize_is_byte_identical_to_quantize_rows() {
        let rows: Vec<f32> = (0..2048)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        let mut b = Blocks::default();
        quantize(&rows, 256, 32, 4, Scheme::Rtn, &mut b);
        let (mut p, mut s) = (Vec::new(), Vec::new());
        quantize_rows(&rows, 256, 32, &mut p, &mut s);
        assert_eq!((b.codes, b.scales), (p, s));
        assert!(b.zero_points.is_empty());
    }

    #[test]
    fn asym_zero_points_are_packed_two_per_byte() {
        // Three blocks per row -> two zero-point bytes per row, the last high nibble padding.
        let rows: Vec<f32> = (0..192)
            .map(|i| (i % 32) as f32 * 0.1 + (i / 96) as f32)
            .collect();
        let mut b = Blocks::default();
        quantize(&rows, 96, 32, 4, Scheme::Asym, &mut b);
        assert_eq!(b.zero_points.len(), 4);
        assert_eq!(b.scales.len(), 6);
        for r in 0..2 {
            let back = dequantize_blocks_row(&b, r, 96, 32, 4);
            // Integer zero points keep 0 on the grid: row 1 (values 1..4.1) spends its 16
            // levels on 0..4.1, a step of ~0.27.
            let tol = if r == 0 { 0.11 } else { 0.28 };
            for (a, c) in rows[r * 96..(r + 1) * 96].iter().zip(&back) {
                assert!((a - c).abs() < tol, "{a} vs {c}");
            }
        }
    }

    #[test]
    fn mxfp4_decodes_sign_magnitude_and_scale() {
        // byte 0x9F: low nibble 0xF = -6, high nibble 0x9 = -0.5; scale 2^(128-127) = 2
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x9f;
        let out = decode_mxfp4(&blocks, &[128], 1, 32);
        assert_eq!(&out[..3], &[-12.0, -1.0, 0.0]);
    }
}
