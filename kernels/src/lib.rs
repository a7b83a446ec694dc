//! The integer dot-product kernels behind edgellm's tract backend's `MatMulNBits`
//! (`daemon/src/backend/tract/matmul.rs`, which documents the weight layouts): an activation row
//! quantized to int8 in sub-blocks of 32 ([`quantize`]) meets a weight row of 4- or 8-bit codes
//! with f32 block scales ([`row_dot`]).
//!
//! Kernels ([`Kernel`], chosen once per process by [`kernel`]): AVX2 on x86-64 when the CPU has
//! AVX2 and FMA; NEON on aarch64, with `sdot` when the CPU has the dot-product extension
//! (Armv8.2+: a Pi 5's Cortex-A76, a Jetson Orin's A78AE; not a Pi 4's A72 or a Pi 3's A53);
//! portable Rust otherwise or with `EDGELLM_TRACT_PORTABLE` set. The NEON kernels compute the
//! same i32 sums per 16-position half as the portable code and then the same float arithmetic
//! in the same order, so their results are bit for bit the portable ones; AVX2 sums floats in
//! another order (equal within rounding).
//!
//! A crate of its own, with no dependencies, so the kernels cross-build for aarch64 and run
//! under qemu-user in seconds (CI: `scripts/test-aarch64-kernels.sh`, on CPU models with and
//! without dotprod), where the whole daemon takes a 15-minute cross-build.
//!
//! i8mm (`smmla`, Armv8.6: in qemu's `max` CPU, not in a Pi 5) is not used: it multiplies 2x8
//! by 8x2 blocks, which pays when two activation rows share the weights (prefill), while edge
//! decoding is one row per step; `sdot` already does the one-row product at full width.

use std::sync::OnceLock;

/// One activation row quantized to int8 in sub-blocks of 32, zero-padded to the weights' padded
/// K (rounded up to 32). For 4-bit weights each sub-block is reordered to
/// `[even positions | odd positions]` to meet the low and high nibbles of 16 weight bytes; for
/// 8-bit weights it keeps its order.
pub struct QuantRow {
    /// The int8 values, sub-block by sub-block (4 bits: reordered as above).
    pub q: Vec<i8>,
    /// Per sub-block: the scale.
    pub scale: Vec<f32>,
    /// Per weight block: sum of scale x int8 values, what the zero points multiply.
    pub block_sums: Vec<f32>,
}

/// Quantizes `x` (K values) for weights of `bits` in blocks of `block`, padded to `padded`
/// values (`ceil(K/block) * block`).
pub fn quantize(x: &[f32], bits: usize, block: usize, padded: usize) -> QuantRow {
    let subs = padded.div_ceil(32);
    let mut q = vec![0i8; subs * 32];
    let mut scale = Vec::with_capacity(subs);
    // Scaled sums per 16 values for block 16, else per sub-block.
    let mut sums = Vec::with_capacity(if block == 16 { 2 * subs } else { subs });
    let mut padded_tail = [0f32; 32];
    for j in 0..subs {
        let xs = &x[(32 * j).min(x.len())..(32 * j + 32).min(x.len())];
        let xs: &[f32] = if xs.len() == 32 {
            xs
        } else {
            padded_tail.fill(0.0);
            padded_tail[..xs.len()].copy_from_slice(xs);
            &padded_tail
        };
        let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = max / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let out = &mut q[j * 32..(j + 1) * 32];
        // Sums of the first and the last 16 positions.
        let (mut s0, mut s1) = (0i32, 0i32);
        if bits == 4 {
            for i in 0..16 {
                let (e, o) = (
                    (xs[2 * i] * inv).round() as i8,
                    (xs[2 * i + 1] * inv).round() as i8,
                );
                out[i] = e;
                out[16 + i] = o;
                if i < 8 {
                    s0 += e as i32 + o as i32;
                } else {
                    s1 += e as i32 + o as i32;
                }
            }
        } else {
            for i in 0..32 {
                let v = (xs[i] * inv).round() as i8;
                out[i] = v;
                if i < 16 {
                    s0 += v as i32;
                } else {
                    s1 += v as i32;
                }
            }
        }
        scale.push(s);
        if block == 16 {
            sums.push(s * s0 as f32);
            sums.push(s * s1 as f32);
        } else {
            sums.push(s * (s0 + s1) as f32);
        }
    }
    let per_block = if block == 16 { 1 } else { block / 32 };
    let blocks = padded / block;
    QuantRow {
        q,
        scale,
        block_sums: sums
            .chunks(per_block)
            .take(blocks)
            .map(|c| c.iter().sum())
            .collect(),
    }
}

/// One 4-bit sub-block's dot product over bytes `range` (of 16): raw nibbles x reordered int8.
#[inline(always)]
pub fn dot4(wb: &[u8], xb: &[i8], range: std::ops::Range<usize>) -> i32 {
    let mut d = 0i32;
    for i in range {
        d += (wb[i] & 0x0f) as i32 * xb[i] as i32 + (wb[i] >> 4) as i32 * xb[16 + i] as i32;
    }
    d
}

/// One 8-bit sub-block's dot product over positions `range` (of 32): `(code - 128)` x int8.
#[inline(always)]
pub fn dot8(wb: &[u8], xb: &[i8], range: std::ops::Range<usize>) -> i32 {
    let mut d = 0i32;
    for i in range {
        d += (wb[i] as i32 - 128) * xb[i] as i32;
    }
    d
}

/// One row's `sum over the first subs 32-value sub-blocks j` of weight scale x `xs[j]` x the
/// int dot product, on the codes as [`dot4`]/[`dot8`] see them (the zero points are applied by
/// the caller). `w`: the row's bytes; `ws`: its block scales; `xs`: x's sub-block scales;
/// `shift`: log2 of the sub-blocks per weight block (block >= 32). `B16`: block 16, two weight
/// blocks per sub-block.
#[inline]
fn row_dot_portable<const BITS: usize, const B16: bool>(
    w: &[u8],
    q: &[i8],
    ws: &[f32],
    xs: &[f32],
    shift: u32,
    subs: usize,
) -> f32 {
    let bytes = 4 * BITS;
    let mut acc = 0f32;
    for (j, (wb, xb)) in w
        .chunks_exact(bytes)
        .zip(q.chunks_exact(32))
        .take(subs)
        .enumerate()
    {
        if B16 {
            let (d0, d1) = if BITS == 4 {
                (dot4(wb, xb, 0..8), dot4(wb, xb, 8..16))
            } else {
                (dot8(wb, xb, 0..16), dot8(wb, xb, 16..32))
            };
            acc += xs[j] * (ws[2 * j] * d0 as f32 + ws[2 * j + 1] * d1 as f32);
        } else {
            let d = if BITS == 4 {
                dot4(wb, xb, 0..16)
            } else {
                dot8(wb, xb, 0..32)
            };
            acc += ws[j >> shift] * xs[j] * d as f32;
        }
    }
    acc
}

/// The bounds the SIMD kernels' unchecked loads rely on: `subs` sub-blocks of weights, int8
/// activations and their scales, and the weight scales they reach.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn check_bounds<const BITS: usize, const B16: bool>(
    w: &[u8],
    q: &[i8],
    ws: &[f32],
    xs: &[f32],
    shift: u32,
    subs: usize,
) {
    assert!(w.len() >= subs * 4 * BITS && q.len() >= subs * 32 && xs.len() >= subs);
    if B16 {
        assert!(ws.len() >= 2 * subs);
    } else {
        assert!(ws.len() << shift >= subs);
    }
}

/// [`row_dot_portable`] with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2<const BITS: usize, const B16: bool>(
    w: &[u8],
    q: &[i8],
    ws: &[f32],
    xs: &[f32],
    shift: u32,
    subs: usize,
) -> f32 {
    use std::arch::x86_64::*;
    check_bounds::<BITS, B16>(w, q, ws, xs, shift, subs);
    let low = _mm_set1_epi8(0x0f);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for j in 0..subs {
        // SAFETY: j < subs, so the 32 values at q[j * 32] are in bounds (asserted above).
        let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(j * 32) as *const __m256i) };
        // i32 lanes: 4 bits, lanes 0-1 and 4-5 hold positions 0..16 (low and high nibbles of
        // bytes 0..8), lanes 2-3 and 6-7 positions 16..32; 8 bits, lanes 0-3 positions 0..16.
        let p = if BITS == 4 {
            // SAFETY: the 16 bytes at w[j * 16] are in bounds (asserted above).
            let v = unsafe { _mm_loadu_si128(w.as_ptr().add(j * 16) as *const __m128i) };
            let lo = _mm_and_si128(v, low);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
            let wv = _mm256_set_m128i(hi, lo);
            // u8 (0..15) x i8 pairs summed to i16 (|sum| <= 2 * 15 * 128), then to i32.
            _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones)
        } else {
            // SAFETY: the 32 bytes at w[j * 32] are in bounds (asserted above).
            let v = unsafe { _mm256_loadu_si256(w.as_ptr().add(j * 32) as *const __m256i) };
            // code - 128 as i8; |c| (u8, <= 128) x sign-adjusted x (|x| <= 127) pairs fit i16.
            let c = _mm256_xor_si256(v, flip);
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c));
            _mm256_madd_epi16(p, ones)
        };
        let scale = if B16 {
            // SAFETY: 2 * j + 1 < ws.len() (asserted above); an unaligned 8-byte load.
            let pair = unsafe { _mm_castpd_ps(_mm_load_sd(ws.as_ptr().add(2 * j) as *const f64)) };
            let s = _mm_mul_ps(pair, _mm_set1_ps(xs[j]));
            if BITS == 4 {
                let s = _mm_unpacklo_ps(s, s);
                _mm256_set_m128(s, s)
            } else {
                _mm256_set_m128(_mm_shuffle_ps(s, s, 0x55), _mm_shuffle_ps(s, s, 0))
            }
        } else {
            _mm256_set1_ps(ws[j >> shift] * xs[j])
        };
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc);
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// One sub-block's integer dot products on NEON, from two 16-byte halves of codes already
/// signed (4 bits: the low and high nibbles, 0..15; 8 bits: `code - 128`) and the two 16-value
/// halves of x they meet: the i32 sums over positions of the first and second 16 bytes of `c0`
/// (4 bits: bytes 0..8 and 8..16 of the weights, with their halves of `c1`), i.e. what
/// [`dot4`]/[`dot8`] give for the sub-block's two 16-position halves. `DOT`: with `sdot`.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn halves_neon<const BITS: usize, const DOT: bool>(
    c0: std::arch::aarch64::int8x16_t,
    c1: std::arch::aarch64::int8x16_t,
    x0: std::arch::aarch64::int8x16_t,
    x1: std::arch::aarch64::int8x16_t,
) -> (i32, i32) {
    use std::arch::aarch64::*;
    // SAFETY (all intrinsics): NEON is part of aarch64; sdot only when DOT, whose callers run
    // only on CPUs with dotprod.
    unsafe {
        if BITS == 4 {
            // Byte i of the weights: low nibble (c0) x x0[i], high nibble (c1) x x1[i].
            // Halves: bytes 0..8 and 8..16.
            if DOT {
                let z = vdupq_n_s32(0);
                let v = sdot(sdot(z, c0, x0), c1, x1);
                (
                    vgetq_lane_s32(v, 0) + vgetq_lane_s32(v, 1),
                    vgetq_lane_s32(v, 2) + vgetq_lane_s32(v, 3),
                )
            } else {
                // |nibble x x| <= 15 x 128: the sum of two fits i16.
                let lo = vmlal_s8(
                    vmull_s8(vget_low_s8(c0), vget_low_s8(x0)),
                    vget_low_s8(c1),
                    vget_low_s8(x1),
                );
                let hi = vmlal_high_s8(vmull_high_s8(c0, x0), c1, x1);
                (vaddlvq_s16(lo), vaddlvq_s16(hi))
            }
        } else {
            // Positions 0..16 (c0 x x0) and 16..32 (c1 x x1).
            if DOT {
                let z = vdupq_n_s32(0);
                (vaddvq_s32(sdot(z, c0, x0)), vaddvq_s32(sdot(z, c1, x1)))
            } else {
                // |(code - 128) x x| <= 128 x 127 fits i16; pairs are widened before adding.
                let a = vpaddlq_s16(vmull_s8(vget_low_s8(c0), vget_low_s8(x0)));
                let a = vpadalq_s16(a, vmull_high_s8(c0, x0));
                let b = vpaddlq_s16(vmull_s8(vget_low_s8(c1), vget_low_s8(x1)));
                let b = vpadalq_s16(b, vmull_high_s8(c1, x1));
                (vaddvq_s32(a), vaddvq_s32(b))
            }
        }
    }
}

/// `acc + INSN(a, b)` for an int8 multiply-accumulate instruction of an extension the Rust we
/// support has no stable intrinsic for (`vdotq_s32`, `vmmlaq_s32`: stabilized upstream in 2026):
/// inline assembly, registers only. Safety: only reached on CPUs with the extension.
#[cfg(target_arch = "aarch64")]
macro_rules! int8_mla {
    ($(#[$doc:meta])* $name:ident, $ext:literal, $insn:literal) => {
        $(#[$doc])*
        #[inline(always)]
        unsafe fn $name(
            acc: std::arch::aarch64::int32x4_t,
            a: std::arch::aarch64::int8x16_t,
            b: std::arch::aarch64::int8x16_t,
        ) -> std::arch::aarch64::int32x4_t {
            let mut acc = acc;
            // SAFETY: the caller runs on a CPU with the extension; registers only.
            unsafe {
                std::arch::asm!(
                    concat!(".arch_extension ", $ext),
                    concat!($insn, " {acc:v}.4s, {a:v}.16b, {b:v}.16b"),
                    acc = inout(vreg) acc,
                    a = in(vreg) a,
                    b = in(vreg) b,
                    options(pure, nomem, nostack, preserves_flags),
                );
            }
            acc
        }
    };
}

#[cfg(target_arch = "aarch64")]
int8_mla!(
    /// `acc + sdot(a, b)`: per i32 lane, the sum of its four i8 x i8 products (dotprod; only
    /// reached on such CPUs, see `Kernel::NeonDot`).
    sdot,
    "dotprod",
    "sdot"
);

/// Sub-block `j`'s 32 int8 activations as two registers (positions 0..16 and 16..32 of the
/// row's order, see [`QuantRow`]). Safety: `q` holds `32 * (j + 1)` values.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn activations_neon(
    q: &[i8],
    j: usize,
) -> (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) {
    use std::arch::aarch64::*;
    // SAFETY: the caller keeps j within q (see above).
    unsafe {
        (
            vld1q_s8(q.as_ptr().add(j * 32)),
            vld1q_s8(q.as_ptr().add(j * 32 + 16)),
        )
    }
}

/// Sub-block `j`'s weight codes as signed bytes, in the two registers the activations of
/// [`activations_neon`] meet: 4 bits, the low and the high nibbles of its 16 bytes; 8 bits,
/// `code - 128` of its first and last 16 bytes. Safety: `w` holds `4 * BITS * (j + 1)` bytes.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn codes_neon<const BITS: usize>(
    w: &[u8],
    j: usize,
) -> (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) {
    use std::arch::aarch64::*;
    // SAFETY: the caller keeps j within w (see above).
    unsafe {
        if BITS == 4 {
            let v = vld1q_u8(w.as_ptr().add(j * 16));
            (
                vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)),
            )
        } else {
            let flip = vdupq_n_u8(0x80);
            (
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w.as_ptr().add(j * 32)), flip)),
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w.as_ptr().add(j * 32 + 16)), flip)),
            )
        }
    }
}

#[cfg(target_arch = "aarch64")]
int8_mla!(
    /// `acc + smmla(a, b)`: `a` and `b` hold two 8-byte rows each; the i32 lanes get the 2 x 2
    /// products `[a0.b0, a0.b1, a1.b0, a1.b1]` (i8mm; only reached on such CPUs, see
    /// `Kernel::NeonI8mm`).
    smmla,
    "i8mm",
    "smmla"
);

/// Two registers' 8-byte halves paired for [`smmla`]: (`[a.lo, b.lo]`, `[a.hi, b.hi]`).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn pair_halves(
    a: std::arch::aarch64::int8x16_t,
    b: std::arch::aarch64::int8x16_t,
) -> (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) {
    use std::arch::aarch64::*;
    // SAFETY: NEON is part of aarch64; register moves only.
    unsafe {
        let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
        (
            vreinterpretq_s8_s64(vzip1q_s64(a, b)),
            vreinterpretq_s8_s64(vzip2q_s64(a, b)),
        )
    }
}

/// Two activation rows by two weight rows with `smmla` (i8mm): the 2 x 2 integer sums per
/// sub-block half as [`row_dot_portable`] gets them, then its float arithmetic per product in
/// the same order (four lanes of one vector, multiplies and adds kept apart: no fused
/// multiply-add), so each product is bit for bit the portable one. Returns
/// `[x0.w0, x0.w1, x1.w0, x1.w1]`.
#[cfg(target_arch = "aarch64")]
#[cfg_attr(not(test), inline)]
unsafe fn rows_dot_i8mm<const BITS: usize, const B16: bool>(
    w: [&[u8]; 2],
    q: [&[i8]; 2],
    ws: [&[f32]; 2],
    xs: [&[f32]; 2],
    shift: u32,
    subs: usize,
) -> [f32; 4] {
    use std::arch::aarch64::*;
    for i in 0..2 {
        check_bounds::<BITS, B16>(w[i], q[i], ws[i], xs[i], shift, subs);
    }
    // SAFETY (the block): loads within the bounds checked above; smmla only on i8mm CPUs.
    unsafe {
        let mut acc = vdupq_n_f32(0.0);
        for j in 0..subs {
            let (xa0, xa1) = activations_neon(q[0], j);
            let (xb0, xb1) = activations_neon(q[1], j);
            let (ca0, ca1) = codes_neon::<BITS>(w[0], j);
            let (cb0, cb1) = codes_neon::<BITS>(w[1], j);
            let (x0l, x0h) = pair_halves(xa0, xb0);
            let (x1l, x1h) = pair_halves(xa1, xb1);
            let (c0l, c0h) = pair_halves(ca0, cb0);
            let (c1l, c1h) = pair_halves(ca1, cb1);
            let z = vdupq_n_s32(0);
            // The sums over the sub-block's two 16-position halves (see `halves_neon`), 2 x 2
            // each: 4 bits, bytes 0..8 (low nibbles x x0, high x x1) and bytes 8..16;
            // 8 bits, positions 0..16 (c0 x x0) and 16..32 (c1 x x1).
            let (d0, d1) = if BITS == 4 {
                (
                    smmla(smmla(z, x0l, c0l), x1l, c1l),
                    smmla(smmla(z, x0h, c0h), x1h, c1h),
                )
            } else {
                (
                    smmla(smmla(z, x0l, c0l), x0h, c0h),
                    smmla(smmla(z, x1l, c1l), x1h, c1h),
                )
            };
            // Lanes: [x0.w0, x0.w1, x1.w0, x1.w1].
            let xv = [xs[0][j], xs[0][j], xs[1][j], xs[1][j]];
            let xv = vld1q_f32(xv.as_ptr());
            if B16 {
                let w0 = [ws[0][2 * j], ws[1][2 * j], ws[0][2 * j], ws[1][2 * j]];
                let w1 = [
                    ws[0][2 * j + 1],
                    ws[1][2 * j + 1],
                    ws[0][2 * j + 1],
                    ws[1][2 * j + 1],
                ];
                let t = vaddq_f32(
                    vmulq_f32(vld1q_f32(w0.as_ptr()), vcvtq_f32_s32(d0)),
                    vmulq_f32(vld1q_f32(w1.as_ptr()), vcvtq_f32_s32(d1)),
                );
                acc = vaddq_f32(acc, vmulq_f32(xv, t));
            } else {
                let k = j >> shift;
                let wv = [ws[0][k], ws[1][k], ws[0][k], ws[1][k]];
                let p = vmulq_f32(vld1q_f32(wv.as_ptr()), xv);
                acc = vaddq_f32(acc, vmulq_f32(p, vcvtq_f32_s32(vaddq_s32(d0, d1))));
            }
        }
        let mut out = [0f32; 4];
        vst1q_f32(out.as_mut_ptr(), acc);
        out
    }
}

/// [`row_dot_portable`] with NEON (`DOT`: and `sdot`): the same integer sums per sub-block half,
/// then the same float arithmetic in the same order, so the result is bit for bit the portable
/// one.
#[cfg(target_arch = "aarch64")]
#[cfg_attr(not(test), inline)]
unsafe fn row_dot_neon<const BITS: usize, const B16: bool, const DOT: bool>(
    w: &[u8],
    q: &[i8],
    ws: &[f32],
    xs: &[f32],
    shift: u32,
    subs: usize,
) -> f32 {
    check_bounds::<BITS, B16>(w, q, ws, xs, shift, subs);
    let mut acc = 0f32;
    for j in 0..subs {
        // SAFETY: j < subs: the 32 bytes of q and the `bytes` bytes of w at sub-block j are in
        // bounds (asserted above); NEON is part of aarch64.
        let (d0, d1) = unsafe {
            let (x0, x1) = activations_neon(q, j);
            let (c0, c1) = codes_neon::<BITS>(w, j);
            halves_neon::<BITS, DOT>(c0, c1, x0, x1)
        };
        if B16 {
            acc += xs[j] * (ws[2 * j] * d0 as f32 + ws[2 * j + 1] * d1 as f32);
        } else {
            acc += ws[j >> shift] * xs[j] * (d0 + d1) as f32;
        }
    }
    acc
}

/// The integer dot-product kernel `MatMulNBits` runs, chosen once per process ([`kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust (auto-vectorized): x86-64 without AVX2, other CPUs, or
    /// `EDGELLM_TRACT_PORTABLE` set.
    Portable,
    /// x86-64 with AVX2 and FMA.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// aarch64 without the dot-product extension (Cortex-A53/A55 as in a Pi 3/Zero 2, A72 as
    /// in a Pi 4): `smull`/`smlal` and pairwise widening adds.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon,
    /// aarch64 with dotprod (Armv8.2+: Cortex-A76 of a Pi 5, A78AE of a Jetson Orin): `sdot`.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    NeonDot,
    /// aarch64 with dotprod and i8mm (Armv8.6+: Cortex-A510/A710/X2 on, Neoverse V1/N2):
    /// `smmla` for two activation rows by two weight rows ([`rows_dot_2x2`], prefill), `sdot`
    /// for one row.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    NeonI8mm,
}

impl Kernel {
    /// Its name in logs and `edgellm info`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Neon => "neon",
            Kernel::NeonDot => "neon-dotprod",
            Kernel::NeonI8mm => "neon-i8mm",
        }
    }
}

/// The kernels this CPU can run, fastest last (tests compare each with the portable one).
pub fn kernels_here() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        k.push(Kernel::Avx2);
    }
    #[cfg(target_arch = "aarch64")]
    {
        k.push(Kernel::Neon);
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            k.push(Kernel::NeonDot);
            if std::arch::is_aarch64_feature_detected!("i8mm") {
                k.push(Kernel::NeonI8mm);
            }
        }
    }
    k
}

/// The kernel that runs: the fastest this CPU has, or the portable one when
/// `EDGELLM_TRACT_PORTABLE` is set (`scripts/test.sh` sets it for one pass of the package tests,
/// so x86 CI also runs the portable code).
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        if std::env::var_os("EDGELLM_TRACT_PORTABLE").is_some() {
            Kernel::Portable
        } else {
            *kernels_here()
                .last()
                .expect("the portable kernel is always there")
        }
    })
}

/// One row's dot product over `subs` full sub-blocks, on `kernel` (one the CPU has: from
/// [`kernels_here`]).
#[inline(always)]
pub fn row_dot<const BITS: usize, const B16: bool>(
    kernel: Kernel,
    w: &[u8],
    x: &QuantRow,
    ws: &[f32],
    shift: u32,
    subs: usize,
) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (Kernel::Avx2 is chosen only then).
        Kernel::Avx2 => unsafe { row_dot_avx2::<BITS, B16>(w, &x.q, ws, &x.scale, shift, subs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of aarch64.
        Kernel::Neon => unsafe {
            row_dot_neon::<BITS, B16, false>(w, &x.q, ws, &x.scale, shift, subs)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the CPU has dotprod (Kernel::NeonDot and NeonI8mm are chosen only then).
        Kernel::NeonDot | Kernel::NeonI8mm => unsafe {
            row_dot_neon::<BITS, B16, true>(w, &x.q, ws, &x.scale, shift, subs)
        },
        _ => row_dot_portable::<BITS, B16>(w, &x.q, ws, &x.scale, shift, subs),
    }
}

/// Two activation rows by two weight rows: `[x0.w0, x0.w1, x1.w0, x1.w1]`, each what
/// [`row_dot`] gives on `kernel` (bit for bit on the NEON kernels). [`Kernel::NeonI8mm`] does
/// the four with `smmla`; the other kernels call [`row_dot`] four times.
#[inline(always)]
pub fn rows_dot_2x2<const BITS: usize, const B16: bool>(
    kernel: Kernel,
    w: [&[u8]; 2],
    x: [&QuantRow; 2],
    ws: [&[f32]; 2],
    shift: u32,
    subs: usize,
) -> [f32; 4] {
    #[cfg(target_arch = "aarch64")]
    if kernel == Kernel::NeonI8mm {
        // SAFETY: the CPU has i8mm (Kernel::NeonI8mm is chosen only then).
        return unsafe {
            rows_dot_i8mm::<BITS, B16>(
                w,
                [&x[0].q, &x[1].q],
                ws,
                [&x[0].scale, &x[1].scale],
                shift,
                subs,
            )
        };
    }
    let d = |m: usize, n: usize| row_dot::<BITS, B16>(kernel, w[n], x[m], ws[n], shift, subs);
    [d(0, 0), d(0, 1), d(1, 0), d(1, 1)]
}

#[cfg(test)]
mod tests;
