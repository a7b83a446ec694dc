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

    #[test]
    fn mxfp4_decodes_sign_magnitude_and_scale() {
        // byte 0x9F: low nibble 0xF = -6, high nibble 0x9 = -0.5; scale 2^(128-127) = 2
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x9f;
        let out = decode_mxfp4(&blocks, &[128], 1, 32);
        assert_eq!(&out[..3], &[-12.0, -1.0, 0.0]);
    }
}
