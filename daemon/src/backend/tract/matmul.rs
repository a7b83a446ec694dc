//! com.microsoft `MatMulNBits` (4 bits) for tract: `Y = A @ dequant(B)^T (+ bias)`.
//!
//! Replaces tract-onnx's importer, which repacks every weight into Q4_0 (a second copy of all
//! weights while the model loads) and multiplies with f32 activations through a generic packer.
//! Here the weights stay exactly as the package stores them (`[N, blocks, block/2]` bytes, two
//! weights per byte, low nibble first; f32/f16 scales; optional packed zero points, default 8)
//! and are shared with the graph's constant, not copied. The product quantizes each activation
//! row to int8 in blocks of 32 (one f32 scale per block, round to nearest), which the packages'
//! `accuracy_level = 4` allows and ONNX Runtime does as well, and accumulates int8 x int4 dot
//! products in i32: AVX2 on x86-64 when the CPU has it, portable code (auto-vectorized, NEON on
//! aarch64) otherwise. Output rows are split across the backend's thread pool.
//!
//! Configurations the kernel does not cover (2-bit weights, `g_idx`, K or the block size not a
//! multiple of 32) go to tract's own importer.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use tract_onnx::model::{ParsingContext, optional_inputs};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::common::{POOL, konst, konst_f32_vec, output};

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract-onnx's own MatMulNBits parser, for what this kernel does not cover.
pub(super) static BUILTIN: OnceLock<Builder> = OnceLock::new();

pub fn mat_mul_nbits(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    let bits: usize = node.get_attr_opt("bits")?.unwrap_or(4);
    let block: usize = node.get_attr("block_size")?;
    let mut opt = optional_inputs(node).skip(3);
    let (zp, g_idx, bias) = (
        opt.next().flatten(),
        opt.next().flatten(),
        opt.next().flatten(),
    );
    let ours = bits == 4
        && g_idx.is_none()
        && block >= 32
        && block.is_multiple_of(32)
        && k.is_multiple_of(block)
        && k > 0
        && n > 0;
    if !ours {
        let builtin = BUILTIN
            .get()
            .context("MatMulNBits: tract's importer is not registered")?;
        return builtin(ctx, node);
    }
    Ok((
        expand(MatMulNBits {
            k,
            n,
            block,
            zp,
            bias,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct MatMulNBits {
    k: usize,
    n: usize,
    block: usize,
    zp: Option<usize>,
    bias: Option<usize>,
}

impl Expansion for MatMulNBits {
    fn name(&self) -> StaticName {
        "MatMulNBits".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        let n = self.n.to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (k, n, block) = (self.k, self.n, self.block);
        let blocks = k.div_ceil(block);
        let a = model.outlet_fact(inputs[0])?.clone();
        ensure!(
            a.datum_type == f32::datum_type(),
            "MatMulNBits {prefix}: the tract backend runs f32 activations, got {:?}",
            a.datum_type
        );
        let weights = konst(model, inputs[1], "MatMulNBits: B")?;
        ensure!(
            weights.datum_type() == u8::datum_type() && weights.len() == n * blocks * block / 2,
            "MatMulNBits {prefix}: B is {:?} {:?}, expected uint8 [{n}, {blocks}, {}]",
            weights.datum_type(),
            weights.shape(),
            block / 2
        );
        let scales = konst_f32_vec(model, inputs[2], "MatMulNBits: scales")?;
        ensure!(
            scales.len() == n * blocks,
            "MatMulNBits {prefix}: {} scales for {n} x {blocks} blocks",
            scales.len()
        );
        // Zero points, one byte per block (unpacked from two per byte); default 8.
        let zero_points = match self.zp {
            Some(i) => {
                let zp = konst(model, inputs[i], "MatMulNBits: zero_points")?;
                ensure!(
                    zp.datum_type() == u8::datum_type(),
                    "MatMulNBits {prefix}: only packed uint8 zero points are supported by the tract backend"
                );
                let zp = zp.try_as_plain_ram()?;
                let zp = zp.as_slice::<u8>()?;
                let per_row = blocks.div_ceil(2);
                ensure!(
                    zp.len() == n * per_row,
                    "MatMulNBits {prefix}: {} zero-point bytes for {n} x {blocks} blocks",
                    zp.len()
                );
                let mut out = Vec::with_capacity(n * blocks);
                for row in zp.chunks(per_row) {
                    for b in 0..blocks {
                        out.push((row[b / 2] >> (4 * (b % 2))) & 0x0f);
                    }
                }
                Some(out)
            }
            None => None,
        };
        let bias = match self.bias {
            Some(i) => {
                let b = konst_f32_vec(model, inputs[i], "MatMulNBits: bias")?;
                ensure!(
                    b.len() == n,
                    "MatMulNBits {prefix}: bias has {} values",
                    b.len()
                );
                Some(b)
            }
            None => None,
        };
        let op = Int4MatMul {
            k,
            n,
            block,
            weights,
            scales: Arc::new(scales),
            zero_points: zero_points.map(Arc::new),
            bias: bias.map(Arc::new),
        };
        model.wire_node(prefix, op, &[inputs[0]])
    }
}

#[derive(Debug, Clone)]
pub struct Int4MatMul {
    k: usize,
    n: usize,
    block: usize,
    /// `[N, K/block, block/2]`, the package's bytes.
    weights: Arc<Tensor>,
    /// `[N * K/block]`.
    scales: Arc<Vec<f32>>,
    /// `[N * K/block]`, one per block.
    zero_points: Option<Arc<Vec<u8>>>,
    bias: Option<Arc<Vec<f32>>>,
}

impl PartialEq for Int4MatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && Arc::ptr_eq(&self.scales, &other.scales)
    }
}
impl Eq for Int4MatMul {}

impl Op for Int4MatMul {
    fn name(&self) -> StaticName {
        "EdgellmMatMulNBits".into()
    }
    op_as_typed_op!();
}

impl TypedOp for Int4MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        let last = shape.len() - 1;
        shape[last] = self.n.to_dim();
        Ok(tvec![f32::fact(shape)])
    }
    as_op!();
}

/// One activation row quantized to int8, in sub-blocks of 32 whose values are reordered to
/// `[even positions | odd positions]` to meet the low and high nibbles of the weight bytes.
struct QuantRow {
    q: Vec<i8>,
    /// Per sub-block: the scale.
    scale: Vec<f32>,
    /// Per weight block (`block_subs` sub-blocks): sum of scale x int8 values, what the zero
    /// points multiply.
    block_sums: Vec<f32>,
}

fn quantize(x: &[f32], block_subs: usize) -> QuantRow {
    let subs = x.len() / 32;
    let mut q = vec![0i8; x.len()];
    let mut scale = Vec::with_capacity(subs);
    let mut scaled_sum = Vec::with_capacity(subs);
    for (b, xs) in x.chunks_exact(32).enumerate() {
        let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = max / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let out = &mut q[b * 32..(b + 1) * 32];
        let mut sum = 0i32;
        for i in 0..16 {
            let (e, o) = (
                (xs[2 * i] * inv).round() as i8,
                (xs[2 * i + 1] * inv).round() as i8,
            );
            out[i] = e;
            out[16 + i] = o;
            sum += e as i32 + o as i32;
        }
        scale.push(s);
        scaled_sum.push(s * sum as f32);
    }
    QuantRow {
        q,
        scale,
        block_sums: scaled_sum
            .chunks(block_subs)
            .map(|c| c.iter().sum())
            .collect(),
    }
}

/// One row's `sum over 32-value sub-blocks j of ws[j / per_block] * xs[j] * dot(nibbles, q_x)`
/// on the raw nibbles (the zero point is applied by the caller). `w`: the row's K/2 bytes;
/// `ws`: its block scales; `xs`: x's sub-block scales.
#[inline]
fn row_dot_portable(w: &[u8], q: &[i8], ws: &[f32], xs: &[f32], per_block: usize) -> f32 {
    let mut acc = 0f32;
    for (j, (wb, xb)) in w.chunks_exact(16).zip(q.chunks_exact(32)).enumerate() {
        let mut d = 0i32;
        for i in 0..16 {
            d += (wb[i] & 0x0f) as i32 * xb[i] as i32 + (wb[i] >> 4) as i32 * xb[16 + i] as i32;
        }
        acc += ws[j / per_block] * xs[j] * d as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(w: &[u8], q: &[i8], ws: &[f32], xs: &[f32], per_block: usize) -> f32 {
    use std::arch::x86_64::*;
    let subs = w.len() / 16;
    assert!(q.len() >= subs * 32 && xs.len() >= subs && ws.len() * per_block >= subs);
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for j in 0..subs {
        // SAFETY: j < subs, so the 16 bytes at w[j * 16] and the 32 values at q[j * 32] are in
        // bounds (asserted above).
        let (v, x) = unsafe {
            (
                _mm_loadu_si128(w.as_ptr().add(j * 16) as *const __m128i),
                _mm256_loadu_si256(q.as_ptr().add(j * 32) as *const __m256i),
            )
        };
        let lo = _mm_and_si128(v, low);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        let wv = _mm256_set_m128i(hi, lo);
        // u8 (0..15) x i8 pairs summed to i16 (|sum| <= 2 * 15 * 128), then to i32.
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones);
        let scale = _mm256_set1_ps(ws[j / per_block] * xs[j]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc);
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Int4MatMul {
    /// Output rows `[n0, n0 + out.len() / m)` for every activation row, into `out` laid out
    /// `[m, rows]`.
    fn tile(&self, rows: &[QuantRow], n0: usize, width: usize, out: &mut [f32]) {
        let (k, block) = (self.k, self.block);
        let blocks = k / block;
        let per_block = block / 32;
        let weights = self
            .weights
            .try_as_plain_ram()
            .expect("constant weights are plain memory");
        let weights = weights.as_slice::<u8>().expect("uint8 weights");
        let use_avx2 = avx2();
        for r in 0..width {
            let n = n0 + r;
            let w = &weights[n * k / 2..(n + 1) * k / 2];
            let ws = &self.scales[n * blocks..(n + 1) * blocks];
            for (m, x) in rows.iter().enumerate() {
                // The zero points: sum over blocks of scale x zp x sum(x).
                let sums = &x.block_sums;
                let correction: f32 = match &self.zero_points {
                    None => 8.0 * ws.iter().zip(sums).map(|(s, x)| s * x).sum::<f32>(),
                    Some(z) => {
                        let z = &z[n * blocks..(n + 1) * blocks];
                        ws.iter()
                            .zip(sums)
                            .zip(z)
                            .map(|((s, x), &z)| s * x * z as f32)
                            .sum()
                    }
                };
                let dot = if use_avx2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                    unsafe {
                        row_dot_avx2(w, &x.q, ws, &x.scale, per_block)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!()
                } else {
                    row_dot_portable(w, &x.q, ws, &x.scale, per_block)
                };
                let bias = self.bias.as_ref().map_or(0.0, |b| b[n]);
                out[m * width + r] = dot - correction + bias;
            }
        }
    }
}

impl EvalOp for Int4MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = inputs[0].try_as_plain_ram()?;
        let mut shape = a.shape().to_vec();
        let a = a.as_slice::<f32>()?;
        let (k, n) = (self.k, self.n);
        ensure!(
            shape.last() == Some(&k),
            "MatMulNBits: input {shape:?} does not end in K = {k}"
        );
        let m = a.len() / k;
        let rows: Vec<QuantRow> = a
            .chunks_exact(k)
            .map(|x| quantize(x, self.block / 32))
            .collect();
        // Tiles of output rows: enough for every thread, each at least 64 rows.
        let threads = POOL.get().map_or(1, |p| p.current_num_threads());
        let tile = n.div_ceil(threads * 4).max(64).min(n);
        let tiles: Vec<(usize, usize)> = (0..n)
            .step_by(tile)
            .map(|n0| (n0, tile.min(n - n0)))
            .collect();
        let mut out = vec![0f32; m * n];
        let compute = |&(n0, width): &(usize, usize)| {
            let mut buf = vec![0f32; m * width];
            self.tile(&rows, n0, width, &mut buf);
            (n0, width, buf)
        };
        let parts: Vec<(usize, usize, Vec<f32>)> = match POOL.get() {
            Some(pool) if tiles.len() > 1 => {
                pool.install(|| tiles.par_iter().map(compute).collect())
            }
            _ => tiles.iter().map(compute).collect(),
        };
        for (n0, width, buf) in parts {
            for r in 0..m {
                out[r * n + n0..r * n + n0 + width]
                    .copy_from_slice(&buf[r * width..(r + 1) * width]);
            }
        }
        *shape.last_mut().expect("rank >= 1") = n;
        Ok(tvec![output(&shape, out)?])
    }
}
