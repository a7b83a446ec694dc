//! com.microsoft `MatMulNBits` (4 and 8 bits) for tract: `Y = A @ dequant(B)^T (+ bias)`.
//!
//! Replaces tract-onnx's importer, which repacks 4-bit block-32 weights into Q4_0 (a second copy
//! of all weights while the model loads) and inflates every other layout to f32. Here the weights
//! stay exactly as the package stores them and are shared with the graph's constant, not copied:
//!
//! * `B`: uint8 `[N, ceil(K/block), block*bits/8]`. 4 bits: two codes per byte, low nibble first
//!   (`k = 2i` low, `2i + 1` high); 8 bits: one code per byte. A last block past K is padding.
//! * `scales`: f32 (or f16, widened at load) `[N, ceil(K/block)]`.
//! * `zero_points` (optional): uint8 `[N, ceil(blocks*bits/8)]`, packed like `B` (4 bits: two
//!   per byte, low nibble first; 8 bits: one per byte). Absent, ONNX Runtime's default
//!   `2^(bits-1)`: 8 or 128. Value = `scale * (code - zero_point)`.
//! * `block_size`: any power of two from 16 (16..256 in practice); K need not be a multiple.
//!
//! The product quantizes each activation row to int8 in sub-blocks of 32 (one f32 scale per
//! sub-block, round to nearest), which the packages' `accuracy_level = 4` allows and ONNX Runtime
//! does as well (it uses one scale per weight block), and accumulates int8 x code dot products
//! in i32: AVX2 on x86-64 when the CPU has it; on aarch64 NEON, with `sdot` when the CPU has
//! the dot-product extension (chosen at run time: the `edgellm-kernels` crate, `kernels/`);
//! portable code otherwise. A node with `accuracy_level` 0 or absent (ONNX Runtime's default: f32
//! activations) is computed like ONNX Runtime does it then: each weight row dequantized to f32
//! and multiplied with the f32 activations (slower; reference comparisons use it). Output rows
//! are split across the backend's thread pool.
//!
//! How the codes meet the activations:
//! * 4 bits: the raw nibbles (0..15, unsigned) meet activations reordered per sub-block to
//!   `[even positions | odd positions]` (the low and high nibbles of 16 bytes). The zero points
//!   come out of the dot product through the activations' block sums:
//!   `sum_i a_i (q_i - z) = sum_i a_i q_i - z sum_i a_i`, per weight block.
//! * 8 bits: codes are recentred to signed `q - 128` (a sign flip of the top bit), so the i8 x i8
//!   product runs on `maddubs(|c|, sign(a, c))` without i16 overflow (|a| <= 127); the default
//!   zero point 128 then costs nothing, and an explicit one adds `(z - 128) sum_i a_i`.
//! * Block 16: a 32-value activation sub-block spans two weight blocks; its i32 partial sums are
//!   kept per 16 positions (lanes of the AVX2 accumulator) and scaled by their own weight scale.
//!   When the padded K ends half-way through a sub-block, that last half is done in scalar code.
//!
//! Float zero points (`[N, blocks]`, A's type; `scale * (code - zero_point)` as in ONNX
//! Runtime's 4-bit path, which tract's importer rejects) take the same correction term.
//! Configurations the kernel does not cover (2-bit weights, `g_idx`, a block size that is not a
//! power of two from 16) go to tract's own importer.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use tract_onnx::model::{ParsingContext, optional_inputs};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use edgellm_kernels::{Kernel, QuantRow, dot4, dot8, kernel, quantize, row_dot, rows_dot_2x2};

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
    let accuracy_level: i64 = node.get_attr_opt("accuracy_level")?.unwrap_or(0);
    let mut opt = optional_inputs(node).skip(3);
    let (zp, g_idx, bias) = (
        opt.next().flatten(),
        opt.next().flatten(),
        opt.next().flatten(),
    );
    let ours = matches!(bits, 4 | 8)
        && g_idx.is_none()
        && block >= 16
        && block.is_power_of_two()
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
            bits,
            block,
            zp,
            bias,
            f32_activations: accuracy_level == 0,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct MatMulNBits {
    k: usize,
    n: usize,
    bits: usize,
    block: usize,
    zp: Option<usize>,
    bias: Option<usize>,
    /// `accuracy_level` 0: f32 activations.
    f32_activations: bool,
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
        let (k, n, bits, block) = (self.k, self.n, self.bits, self.block);
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        let a = model.outlet_fact(inputs[0])?.clone();
        ensure!(
            a.datum_type == f32::datum_type(),
            "MatMulNBits {prefix}: the tract backend runs f32 activations, got {:?}",
            a.datum_type
        );
        let weights = konst(model, inputs[1], "MatMulNBits: B")?;
        ensure!(
            weights.datum_type() == u8::datum_type() && weights.len() == n * blocks * blob,
            "MatMulNBits {prefix}: B is {:?} {:?}, expected uint8 [{n}, {blocks}, {blob}]",
            weights.datum_type(),
            weights.shape(),
        );
        let scales = konst_f32_vec(model, inputs[2], "MatMulNBits: scales")?;
        ensure!(
            scales.len() == n * blocks,
            "MatMulNBits {prefix}: {} scales for {n} x {blocks} blocks",
            scales.len()
        );
        // Zero points, one per block: uint8 ones unpacked (4 bits: two per byte), float ones
        // (`[N, blocks]`, the type of A) as f32.
        let zero_points = match self.zp {
            Some(i) => {
                let zp = konst(model, inputs[i], "MatMulNBits: zero_points")?;
                if zp.datum_type() == u8::datum_type() {
                    let zp = zp.try_as_plain_ram()?;
                    let zp = zp.as_slice::<u8>()?;
                    let per_row = (blocks * bits).div_ceil(8);
                    ensure!(
                        zp.len() == n * per_row,
                        "MatMulNBits {prefix}: {} zero-point bytes for {n} x {blocks} blocks of {bits} bits",
                        zp.len()
                    );
                    let mut out = Vec::with_capacity(n * blocks);
                    for row in zp.chunks(per_row) {
                        if bits == 8 {
                            out.extend_from_slice(row);
                        } else {
                            out.extend((0..blocks).map(|b| (row[b / 2] >> (4 * (b % 2))) & 0x0f));
                        }
                    }
                    Some(ZeroPoints::Codes(out))
                } else {
                    let zp = konst_f32_vec(model, inputs[i], "MatMulNBits: zero_points")?;
                    ensure!(
                        zp.len() == n * blocks,
                        "MatMulNBits {prefix}: {} float zero points for {n} x {blocks} blocks",
                        zp.len()
                    );
                    Some(ZeroPoints::Float(zp))
                }
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
        let op = NBitsMatMul {
            k,
            n,
            bits,
            block,
            weights,
            scales: Arc::new(scales),
            zero_points: zero_points.map(Arc::new),
            bias: bias.map(Arc::new),
            f32_activations: self.f32_activations,
        };
        model.wire_node(prefix, op, &[inputs[0]])
    }
}

#[derive(Debug, Clone)]
pub struct NBitsMatMul {
    k: usize,
    n: usize,
    /// 4 or 8.
    bits: usize,
    /// A power of two, at least 16.
    block: usize,
    /// `[N, ceil(K/block), block*bits/8]`, the package's bytes.
    weights: Arc<Tensor>,
    /// `[N * ceil(K/block)]`.
    scales: Arc<Vec<f32>>,
    /// `[N * ceil(K/block)]`, one per block; `None`: `2^(bits-1)`.
    zero_points: Option<Arc<ZeroPoints>>,
    bias: Option<Arc<Vec<f32>>>,
    /// `accuracy_level` 0: f32 activations against dequantized weight rows.
    f32_activations: bool,
}

/// Per-block zero points, `[N * ceil(K/block)]`.
#[derive(Debug)]
enum ZeroPoints {
    /// uint8 ones, unpacked.
    Codes(Vec<u8>),
    /// Float ones (the graph's A type, widened).
    Float(Vec<f32>),
}

impl PartialEq for NBitsMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && Arc::ptr_eq(&self.scales, &other.scales)
    }
}
impl Eq for NBitsMatMul {}

impl Op for NBitsMatMul {
    fn name(&self) -> StaticName {
        "EdgellmMatMulNBits".into()
    }
    op_as_typed_op!();
}

impl TypedOp for NBitsMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        let last = shape.len() - 1;
        shape[last] = self.n.to_dim();
        Ok(tvec![f32::fact(shape)])
    }
    as_op!();
}

impl NBitsMatMul {
    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// The weight bytes (tests check which constant they are).
    #[cfg(test)]
    pub(super) fn weights(&self) -> &Arc<Tensor> {
        &self.weights
    }

    /// Output rows `[n0, n0 + width)` for every activation row, into `out` laid out
    /// `[m, width]`.
    fn tile(&self, rows: &[QuantRow], n0: usize, width: usize, out: &mut [f32]) {
        match (self.bits, self.block == 16) {
            (4, false) => self.tile_with::<4, false>(rows, n0, width, out),
            (4, true) => self.tile_with::<4, true>(rows, n0, width, out),
            (_, false) => self.tile_with::<8, false>(rows, n0, width, out),
            (_, true) => self.tile_with::<8, true>(rows, n0, width, out),
        }
    }

    /// Weight row `n` dequantized to f32 (`scale * (code - zero_point)`), K values.
    fn dequantized_row(&self, n: usize, out: &mut Vec<f32>) {
        let blocks = self.blocks();
        let row_bytes = blocks * self.block * self.bits / 8;
        let weights = self
            .weights
            .try_as_plain_ram()
            .expect("constant weights are plain memory");
        let w = &weights.as_slice::<u8>().expect("uint8 weights")[n * row_bytes..][..row_bytes];
        let default_zp = (1u32 << (self.bits - 1)) as f32;
        out.clear();
        out.extend((0..self.k).map(|i| {
            let code = if self.bits == 4 {
                (w[i / 2] >> (4 * (i % 2))) & 0x0f
            } else {
                w[i]
            } as f32;
            let b = n * blocks + i / self.block;
            let zp = match self.zero_points.as_deref() {
                None => default_zp,
                Some(ZeroPoints::Codes(z)) => z[b] as f32,
                Some(ZeroPoints::Float(z)) => z[b],
            };
            self.scales[b] * (code - zp)
        }));
    }

    /// [`NBitsMatMul::tile`] with f32 activations (`accuracy_level` 0).
    fn tile_f32(&self, a: &[f32], n0: usize, width: usize, out: &mut [f32]) {
        let k = self.k;
        let mut w = Vec::with_capacity(k);
        for r in 0..width {
            let n = n0 + r;
            self.dequantized_row(n, &mut w);
            let bias = self.bias.as_ref().map_or(0.0, |b| b[n]);
            for (m, x) in a.chunks_exact(k).enumerate() {
                let dot: f32 = x.iter().zip(&w).map(|(x, w)| x * w).sum();
                out[m * width + r] = dot + bias;
            }
        }
    }

    /// [`NBitsMatMul::tile`] for `BITS` (= `self.bits`) and block 16 or not (`B16`).
    fn tile_with<const BITS: usize, const B16: bool>(
        &self,
        rows: &[QuantRow],
        n0: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let blocks = self.blocks();
        let padded = blocks * self.block;
        let row_bytes = padded * BITS / 8;
        let shift = (self.block / 32).max(1).trailing_zeros();
        // Full 32-value sub-blocks, and whether a 16-value half follows (block 16 only).
        let (subs, half) = (padded / 32, !padded.is_multiple_of(32));
        // What the dot product's codes are measured from: raw nibbles (4 bits) or code - 128.
        let center = if BITS == 4 { 0.0 } else { 128.0 };
        let default_zp = (1u32 << (BITS - 1)) as f32 - center;
        let kernel = kernel();
        let weights = self
            .weights
            .try_as_plain_ram()
            .expect("constant weights are plain memory");
        let weights = weights.as_slice::<u8>().expect("uint8 weights");
        // Weight row r of the tile: its codes and scales.
        let row = |r: usize| {
            let n = n0 + r;
            (
                &weights[n * row_bytes..(n + 1) * row_bytes],
                &self.scales[n * blocks..(n + 1) * blocks],
            )
        };
        // Output (m, r) from the full sub-blocks' dot product of activation row x and weight
        // row r: plus the last half sub-block (block 16), minus the zero points, plus the bias.
        let value = |r: usize, x: &QuantRow, mut dot: f32| -> f32 {
            let n = n0 + r;
            let (w, ws) = row(r);
            // The zero points: sum over blocks of scale x (zp - center) x sum(x).
            let sums = &x.block_sums;
            let correction: f32 = match &self.zero_points {
                None if default_zp == 0.0 => 0.0,
                None => default_zp * ws.iter().zip(sums).map(|(s, x)| s * x).sum::<f32>(),
                Some(z) => {
                    let range = n * blocks..(n + 1) * blocks;
                    let scaled = ws.iter().zip(sums);
                    match &**z {
                        ZeroPoints::Codes(z) => scaled
                            .zip(&z[range])
                            .map(|((s, x), &z)| s * x * (z as f32 - center))
                            .sum(),
                        ZeroPoints::Float(z) => scaled
                            .zip(&z[range])
                            .map(|((s, x), &z)| s * x * (z - center))
                            .sum(),
                    }
                }
            };
            if half {
                // The last weight block fills only the first half of the last sub-block.
                let xb = &x.q[subs * 32..subs * 32 + 32];
                let wb = &w[subs * BITS * 4..];
                let d = if BITS == 4 {
                    dot4(wb, xb, 0..8)
                } else {
                    dot8(wb, xb, 0..16)
                };
                dot += ws[blocks - 1] * x.scale[subs] * d as f32;
            }
            let bias = self.bias.as_ref().map_or(0.0, |b| b[n]);
            dot - correction + bias
        };
        // With i8mm, two activation rows (prefill) meet two weight rows at once; the products
        // are bit for bit the single-row ones.
        let pairs = kernel == Kernel::NeonI8mm && rows.len() > 1;
        let mut r = 0;
        while r < width {
            let (w, ws) = row(r);
            let mut m = 0;
            if pairs && r + 1 < width {
                let (w1, ws1) = row(r + 1);
                while m + 1 < rows.len() {
                    let (x0, x1) = (&rows[m], &rows[m + 1]);
                    let d = rows_dot_2x2::<BITS, B16>(
                        kernel,
                        [w, w1],
                        [x0, x1],
                        [ws, ws1],
                        shift,
                        subs,
                    );
                    out[m * width + r] = value(r, x0, d[0]);
                    out[m * width + r + 1] = value(r + 1, x0, d[1]);
                    out[(m + 1) * width + r] = value(r, x1, d[2]);
                    out[(m + 1) * width + r + 1] = value(r + 1, x1, d[3]);
                    m += 2;
                }
                // An odd last activation row meets both weight rows singly.
                if let Some(x) = rows.get(m) {
                    out[m * width + r] =
                        value(r, x, row_dot::<BITS, B16>(kernel, w, x, ws, shift, subs));
                    out[m * width + r + 1] = value(
                        r + 1,
                        x,
                        row_dot::<BITS, B16>(kernel, w1, x, ws1, shift, subs),
                    );
                }
                r += 2;
                continue;
            }
            for (m, x) in rows.iter().enumerate() {
                out[m * width + r] =
                    value(r, x, row_dot::<BITS, B16>(kernel, w, x, ws, shift, subs));
            }
            r += 1;
        }
    }
}

impl EvalOp for NBitsMatMul {
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
        let padded = self.blocks() * self.block;
        let rows: Vec<QuantRow> = if self.f32_activations {
            Vec::new()
        } else {
            a.chunks_exact(k)
                .map(|x| quantize(x, self.bits, self.block, padded))
                .collect()
        };
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
            if self.f32_activations {
                self.tile_f32(a, n0, width, &mut buf);
            } else {
                self.tile(&rows, n0, width, &mut buf);
            }
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

#[cfg(test)]
mod tests;
