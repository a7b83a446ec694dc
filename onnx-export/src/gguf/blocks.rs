//! GGML block formats: sizes of every type a GGUF file may hold, dequantization of the ones we
//! read, and the exact `MatMulNBits` form of the ones ONNX Runtime can run without loss.
//!
//! Every supported quantized type is first decoded into one common form, per row of K values:
//! integer codes `s`, one scale per 16 values and an additive constant per 32 values, with
//! `value = scale * s + offset`, evaluated in exactly the order llama.cpp (and the `gguf` Python
//! package) dequantize, so [`dequantize_row`] is bit-exact. From that form a row is packed for
//! `MatMulNBits`:
//!
//! | type | value | bits | block | code | offset term |
//! |---|---|---|---|---|---|
//! | Q4_0 | d·(q−8) | 4 | 32 | q | none |
//! | Q4_1 | d·q + m | 4 | 32 | q | m + 8d |
//! | Q4_K | d·sc·q − dmin·m | 4 | 32 | q | 8·d·sc − dmin·m |
//! | Q5_0 | d·(q−16) | 8 | 32 | q + 112 | none |
//! | Q5_1, Q5_K | d·q + m (K: d·sc, −dmin·m) | 8 | 32 | q + 128 | m |
//! | Q8_0 | d·q | 8 | 32 | q + 128 | none |
//! | Q6_K | d·sc·(q−32) | 8 | 16 | q + 96 | none |
//!
//! `MatMulNBits` computes `scale·(code − 8)` (4 bits) or `scale·(code − 128)` (8 bits) with its
//! default zero points, so no zero-point input is written; the per-32 constants become the
//! offset term `Σ_b offset[n, b] · Σ_{i∈b} x[i]`, a small f32 MatMul of the activations' block
//! sums (see `decoder::linear`). Float zero points, which would also express Q4_1, are avoided:
//! ONNX Runtime's CPU kernel does not pre-pack them and dequantizes the whole weight on every
//! call. A stacked linear layer (q/k/v) whose parts have different types (Q4_K_M's q/k as
//! Q4_K and v as Q6_K) is multiplied part by part, each in its own layout, and concatenated
//! (`decoder::linear`); [`NBitsLayout::for_types`] can also widen several types into one
//! layout (a 4-bit code fits 8 bits, a 32-block splits into two 16-blocks with the same scale).

use half::f16;

/// GGML tensor types (ids from ggml.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    IQ1_M,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 | IQ4_NL => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            MXFP4 => (32, 17),
            Q2_K => (256, 84),
            Q3_K | IQ3_S => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS | TQ2_0 => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
        }
    }

    /// Bytes of one row of `k` values (`k` a multiple of the block size).
    pub fn row_bytes(self, k: usize) -> usize {
        let (b, bytes) = self.block();
        k / b * bytes
    }

    pub fn is_float(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// Whether [`dequantize_row`] reads this type.
    pub fn can_dequantize(self) -> bool {
        self.is_float() || self.nbits().is_some() || self == GgmlType::MXFP4
    }

    /// The exact `MatMulNBits` form of this type: (bits, block), `None` when there is none.
    pub fn nbits(self) -> Option<(u8, usize)> {
        use GgmlType::*;
        Some(match self {
            Q4_0 | Q4_1 | Q4_K => (4, 32),
            Q5_0 | Q5_1 | Q5_K | Q8_0 => (8, 32),
            Q6_K => (8, 16),
            _ => return None,
        })
    }

    /// Whether the type adds a per-32 constant (so its linear layers need the offset term).
    pub fn has_offset(self) -> bool {
        matches!(
            self,
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_1 | GgmlType::Q5_K
        )
    }

    /// Types listed when a tensor cannot be mapped.
    pub const EXACT: &'static str =
        "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";
}

/// One row in the common form: `value[i] = scale[i / 16] * s[i] + offset[i / 32]`.
#[derive(Debug, Default, Clone)]
pub struct Decoded {
    pub s: Vec<i16>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one row of a quantized type (`ty.nbits()` is `Some`) into `out`.
pub fn decode_row(ty: GgmlType, row: &[u8], out: &mut Decoded) {
    out.s.clear();
    out.scale.clear();
    out.offset.clear();
    let (_, bytes) = ty.block();
    for b in row.chunks_exact(bytes) {
        decode_block(ty, b, out);
    }
}

fn push32(out: &mut Decoded, scale: f32, offset: f32) {
    out.scale.extend([scale, scale]);
    out.offset.push(offset);
}

fn decode_block(ty: GgmlType, b: &[u8], out: &mut Decoded) {
    use GgmlType::*;
    match ty {
        Q4_0 | Q4_1 => {
            let d = h(b, 0);
            let (m, qs) = if ty == Q4_1 {
                (h(b, 2), &b[4..20])
            } else {
                (0.0, &b[2..18])
            };
            let shift = if ty == Q4_0 { 8 } else { 0 };
            out.s.extend(qs.iter().map(|&q| (q & 0xf) as i16 - shift));
            out.s.extend(qs.iter().map(|&q| (q >> 4) as i16 - shift));
            push32(out, d, m);
        }
        Q5_0 | Q5_1 => {
            let d = h(b, 0);
            let (m, rest) = if ty == Q5_1 {
                (h(b, 2), &b[4..])
            } else {
                (0.0, &b[2..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            let shift = if ty == Q5_0 { 16 } else { 0 };
            for (j, &q) in qs.iter().enumerate() {
                let hi = ((qh >> j) << 4) & 0x10;
                out.s.push(((q & 0xf) as u32 | hi) as i16 - shift);
            }
            for (j, &q) in qs.iter().enumerate() {
                let hi = (qh >> (j + 12)) & 0x10;
                out.s.push(((q >> 4) as u32 | hi) as i16 - shift);
            }
            push32(out, d, m);
        }
        Q8_0 => {
            out.s.extend(b[2..34].iter().map(|&q| q as i8 as i16));
            push32(out, h(b, 0), 0.0);
        }
        Q4_K | Q5_K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let sc = &b[4..16];
            let (qh, qs) = if ty == Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                let q = &qs[j * 32..(j + 1) * 32];
                for half in 0..2 {
                    let (s, m) = scale_min_k4(2 * j + half, sc);
                    let bit = 1u8 << (2 * j + half);
                    for (l, &byte) in q.iter().enumerate() {
                        let lo = if half == 0 { byte & 0xf } else { byte >> 4 };
                        let hi = qh.map_or(0, |qh| if qh[l] & bit != 0 { 16 } else { 0 });
                        out.s.push((lo + hi) as i16);
                    }
                    // llama.cpp: y = (d * sc) * q - dmin * m
                    push32(out, d * s as f32, -(dmin * m as f32));
                }
            }
        }
        Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..]);
                let mut s = [0i16; 128];
                for l in 0..32 {
                    s[l] = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i16 - 32;
                    s[l + 32] = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i16 - 32;
                    s[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i16 - 32;
                    s[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i16 - 32;
                }
                out.s.extend_from_slice(&s);
                out.scale
                    .extend(sc[..8].iter().map(|&c| d * c as i8 as f32));
                out.offset.extend([0.0; 4]);
            }
        }
        _ => unreachable!("decode_block is only called for types with nbits()"),
    }
}

/// MXFP4's e2m1 code points, doubled (ggml's `kvalues_mxfp4`; the scale is halved to match).
const MXFP4_VALUES: [f32; 16] = [
    0., 1., 2., 3., 4., 6., 8., 12., 0., -1., -2., -3., -4., -6., -8., -12.,
];

/// ggml's `GGML_E8M0_TO_FP32_HALF`: `2^(e - 128)` (exact, subnormal for e < 2).
fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(((e as u32) - 1) << 23)
    }
}

/// Dequantizes one row of `k` values exactly as llama.cpp does. MXFP4 (gpt-oss experts):
/// 17-byte blocks of an e8m0 scale and 16 bytes whose low nibbles are values 0..16 and high
/// nibbles values 16..32.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut Vec<f32>) {
    use GgmlType::*;
    match ty {
        F32 => out.extend(
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        F16 => out.extend(row.chunks_exact(2).map(|b| h(b, 0))),
        BF16 => out.extend(
            row.chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        ),
        MXFP4 => {
            for b in row.chunks_exact(17) {
                let d = e8m0_half(b[0]);
                out.extend(b[1..].iter().map(|&q| MXFP4_VALUES[(q & 15) as usize] * d));
                out.extend(b[1..].iter().map(|&q| MXFP4_VALUES[(q >> 4) as usize] * d));
            }
        }
        _ => {
            let mut d = Decoded::default();
            decode_row(ty, row, &mut d);
            out.extend(d.s.iter().enumerate().map(|(i, &s)| {
                let v = d.scale[i / 16] * s as f32;
                let c = d.offset[i / 32];
                if c == 0.0 { v } else { v + c }
            }));
        }
    }
}

/// The `MatMulNBits` layout a stacked linear layer is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NBitsLayout {
    pub bits: u8,
    pub block: usize,
    /// Whether the offset term is needed (some part has per-32 constants).
    pub offset: bool,
}

impl NBitsLayout {
    /// The widest bits and finest block over `types` (all must have an exact form).
    pub fn for_types(types: &[GgmlType]) -> Option<Self> {
        let mut out = NBitsLayout {
            bits: 4,
            block: 32,
            offset: false,
        };
        for t in types {
            let (bits, block) = t.nbits()?;
            out.bits = out.bits.max(bits);
            out.block = out.block.min(block);
            out.offset |= t.has_offset();
        }
        Some(out)
    }

    /// Packed bytes per row of `k` values.
    pub fn row_bytes(&self, k: usize) -> usize {
        k * self.bits as usize / 8
    }
}

/// Packs one decoded row into `layout`: codes (appended to `codes`), one scale per block
/// (`scales`) and, when `layout.offset`, one constant per 32 values (`offsets`).
pub fn pack_row(
    d: &Decoded,
    layout: NBitsLayout,
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
    offsets: &mut Vec<f32>,
) {
    let k = d.s.len();
    // 4-bit codes are q with an implied zero point of 8: a row whose codes are unsigned 0..15
    // (an offset type) is shifted by -8, the 8 * scale moved into the offset.
    let shift4 = layout.bits == 4 && d.s.iter().any(|&s| s > 7);
    match layout.bits {
        4 => {
            for pair in d.s.chunks_exact(2) {
                let c = |s: i16| (s - if shift4 { 8 } else { 0 } + 8) as u8 & 0xf;
                codes.push(c(pair[0]) | (c(pair[1]) << 4));
            }
        }
        _ => codes.extend(d.s.iter().map(|&s| (s + 128) as u8)),
    }
    let per = layout.block / 16;
    scales.extend(d.scale.iter().step_by(per));
    if layout.offset {
        for (b, &c) in d.offset.iter().enumerate() {
            offsets.push(if shift4 { c + 8.0 * d.scale[2 * b] } else { c });
        }
    }
    debug_assert_eq!(d.scale.len() * 16, k);
}
