//! Linear layers: checkpoint rows stacked along N, encoded as int4 `MatMulNBits` blocks or a
//! transposed f32 `MatMul` weight, plus the optional bias `Add`.

use std::ops::Range;

use super::{DecoderBuilder, Precision};
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::gguf::GgmlType;
use crate::gguf::blocks::{self, Decoded, NBitsLayout};
use crate::onnx::Attr;
use crate::quant;

use super::MS;

/// Rows of one or more checkpoint tensors stacked along N (output features), each `[rows, K]`.
#[derive(Clone, Debug)]
pub(super) struct Linear {
    pub(super) parts: Vec<(String, Range<usize>)>,
    pub(super) k: usize,
}

impl Linear {
    pub(super) fn whole(ck: &Checkpoint, name: &str, n: usize, k: usize) -> Result<Self> {
        ck.expect(name, &[n, k])?;
        Ok(Linear {
            parts: vec![(name.to_string(), 0..n)],
            k,
        })
    }

    fn n(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }
}

/// Reads consecutive row chunks of a [`Linear`], at most ~16M values at a time.
pub(super) fn for_each_chunk(
    ck: &Checkpoint,
    lin: &Linear,
    mut f: impl FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let step = ((16 << 20) / lin.k).max(1);
    for (name, rows) in &lin.parts {
        let mut r = rows.start;
        while r < rows.end {
            let end = (r + step).min(rows.end);
            f(&ck.f32_rows(name, r..end)?)?;
            r = end;
        }
    }
    Ok(())
}

pub(super) fn transpose(rows: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0.0; n * k];
    for (i, row) in rows.chunks_exact(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * n + i] = v;
        }
    }
    t
}

pub(super) enum LinearWeights {
    /// `MatMulNBits` blocks: `q [n, k/block, block*bits/8]`, `scales [n, k/block]`, and for
    /// GGUF types with per-32 constants `offsets [k/32, n]` (see `gguf::blocks`).
    NBits {
        q: String,
        scales: String,
        n: usize,
        k: usize,
        bits: u8,
        block: usize,
        /// `asym` blocks: uint8 `[n, ceil(k/block/2)]`, packed like the codes.
        zero_points: Option<String>,
        /// Per-block constants `[k/offset_block, n]` (GGUF's Q4_1/Q4_K/Q5_K: per 32 values;
        /// `--quant offset`: per block).
        offsets: Option<String>,
        offset_block: usize,
    },
    Fp32 {
        w: String,
    },
}

/// How the checkpoint stores a linear layer's parts.
enum Stored {
    /// Float tensors (safetensors, or GGUF F32/F16/BF16).
    Float,
    /// GGUF blocks with an exact `MatMulNBits` form.
    Exact(NBitsLayout),
    /// GGUF blocks without one (or float and block tensors mixed): only re-quantization works.
    Inexact(Vec<String>),
}

impl DecoderBuilder<'_> {
    /// Optional bias: the concatenation of `names` (each `[len]`), present all or none.
    pub(super) fn bias(&mut self, onnx: &str, names: &[(String, usize)]) -> Result<Option<String>> {
        if !self.ck.contains(&names[0].0) {
            return Ok(None);
        }
        let mut all = Vec::new();
        for (name, len) in names {
            self.ck.expect(name, &[*len])?;
            all.extend(self.ck.f32(name)?);
        }
        Ok(Some(self.g.tensor_from(onnx, &[all.len()], &all)?))
    }

    /// A checkpoint tensor copied as f32 with its shape checked.
    pub(super) fn matrix_f32(&mut self, hf: &str, onnx: &str, dims: &[usize]) -> Result<String> {
        self.ck.expect(hf, dims)?;
        let w = self.ck.f32(hf)?;
        self.g.tensor_from(onnx, dims, &w)
    }

    /// Writes a linear layer's weights at the package's precision and `--quant` scheme.
    pub(super) fn linear_weights(&mut self, prefix: &str, lin: &Linear) -> Result<LinearWeights> {
        let bits = self.opts.precision.bits().unwrap_or(4);
        self.linear_weights_as(prefix, lin, bits, self.opts.quant)
    }

    /// Writes a linear layer's weights: GGUF blocks in their exact `MatMulNBits` form, float
    /// weights as `bits`-bit blocks quantized with `scheme`, or (fp32 packages) a transposed
    /// f32 matrix.
    pub(super) fn linear_weights_as(
        &mut self,
        prefix: &str,
        lin: &Linear,
        bits: u8,
        scheme: quant::Scheme,
    ) -> Result<LinearWeights> {
        let (n, k, bs) = (lin.n(), lin.k, self.opts.block);
        let blocks = self.opts.precision != Precision::Fp32;
        match (blocks, self.stored(lin)) {
            (true, Stored::Exact(layout)) => self.exact_weights(prefix, lin, layout),
            (true, Stored::Inexact(why)) if !self.opts.allow_requantize => {
                Err(ExportError::InvalidOption(format!(
                    "{prefix}: {} cannot be kept exactly (types kept exactly: {}); pass \
                     --allow-requantize to dequantize and re-quantize it, or --precision fp32",
                    why.join(", "),
                    GgmlType::EXACT
                )))
            }
            (true, _) => {
                if scheme == quant::Scheme::Offset && !k.is_multiple_of(bs) {
                    return Err(ExportError::InvalidOption(format!(
                        "{prefix}: K = {k} is not a multiple of the block size {bs}, which \
                         --quant offset needs (its block sums); choose a smaller --block-size \
                         or another --quant"
                    )));
                }
                let k_blocks = k.div_ceil(bs);
                let mut out = quant::Blocks::default();
                let q = self.g.tensor::<u8>(
                    &format!("{prefix}.MatMul.weight_Q{bits}"),
                    &[n, k_blocks, bs * bits as usize / 8],
                    |sink| {
                        for_each_chunk(self.ck, lin, |rows| {
                            out.codes.clear();
                            quant::quantize(rows, k, bs, bits, scheme, &mut out);
                            sink.put(&out.codes)
                        })
                    },
                )?;
                let scales = self.g.tensor_from(
                    &format!("{prefix}.MatMul.weight_scales"),
                    &[n, k_blocks],
                    &out.scales,
                )?;
                let zero_points = if out.zero_points.is_empty() {
                    None
                } else {
                    Some(self.g.tensor_from(
                        &format!("{prefix}.MatMul.weight_zp"),
                        &[n, k_blocks.div_ceil(2)],
                        &out.zero_points,
                    )?)
                };
                let offsets = if out.offsets.is_empty() {
                    None
                } else {
                    Some(self.g.tensor_from(
                        &format!("{prefix}.MatMul.weight_offsets"),
                        &[k_blocks, n],
                        &transpose(&out.offsets, n, k_blocks),
                    )?)
                };
                Ok(LinearWeights::NBits {
                    q,
                    scales,
                    n,
                    k,
                    bits,
                    block: bs,
                    zero_points,
                    offsets,
                    offset_block: bs,
                })
            }
            (false, _) => {
                let mut rows = Vec::with_capacity(n * k);
                for_each_chunk(self.ck, lin, |r| {
                    rows.extend_from_slice(r);
                    Ok(())
                })?;
                let w = self.g.tensor_from(
                    &format!("{prefix}.MatMul.weight"),
                    &[k, n],
                    &transpose(&rows, n, k),
                )?;
                Ok(LinearWeights::Fp32 { w })
            }
        }
    }

    /// Whether a stacked linear's parts are GGUF blocks of different types, each with an
    /// exact form (kept exactly, they are better multiplied separately).
    fn mixed_parts(&self, lin: &Linear) -> bool {
        if lin.parts.len() < 2 || !self.opts.native || self.opts.precision == Precision::Fp32 {
            return false;
        }
        let types: Vec<Option<GgmlType>> = lin
            .parts
            .iter()
            .map(|(name, _)| self.ck.ggml_type(name))
            .collect();
        types.iter().all(|t| t.is_some_and(|t| t.nbits().is_some()))
            && types.windows(2).any(|w| w[0] != w[1])
    }

    fn stored(&self, lin: &Linear) -> Stored {
        let types: Vec<Option<GgmlType>> = lin
            .parts
            .iter()
            .map(|(name, _)| self.ck.ggml_type(name))
            .collect();
        if types.iter().all(Option::is_none) {
            return Stored::Float;
        }
        let why: Vec<String> = lin
            .parts
            .iter()
            .zip(&types)
            .map(|((name, _), t)| match t {
                Some(t) => format!("{name} ({t:?})"),
                None => format!("{name} (float)"),
            })
            .collect();
        if types.iter().any(Option::is_none) || !self.opts.native {
            return Stored::Inexact(why);
        }
        let types: Vec<GgmlType> = types.into_iter().flatten().collect();
        match NBitsLayout::for_types(&types) {
            Some(layout) => Stored::Exact(layout),
            None => Stored::Inexact(why),
        }
    }

    /// GGUF blocks repacked into `layout` without changing a value (see `gguf::blocks`).
    fn exact_weights(
        &mut self,
        prefix: &str,
        lin: &Linear,
        layout: NBitsLayout,
    ) -> Result<LinearWeights> {
        let (n, k) = (lin.n(), lin.k);
        let (bits, block) = (layout.bits, layout.block);
        if !k.is_multiple_of(32) || !k.is_multiple_of(block) {
            return Err(ExportError::InvalidOption(format!(
                "{prefix}: K = {k} is not a multiple of the block size {block}"
            )));
        }
        let mut scales = Vec::with_capacity(n * k / block);
        let mut offsets = Vec::with_capacity(if layout.offset { n * k / 32 } else { 0 });
        let step = ((16 << 20) / k).max(1);
        let q = self.g.tensor::<u8>(
            &format!("{prefix}.MatMul.weight_Q{bits}"),
            &[n, k / block, block * bits as usize / 8],
            |sink| {
                let mut decoded = Decoded::default();
                let mut codes = Vec::new();
                for (name, rows) in &lin.parts {
                    let mut r = rows.start;
                    while r < rows.end {
                        let end = (r + step).min(rows.end);
                        let (ty, raw) = self.ck.raw_rows(name, r..end)?;
                        codes.clear();
                        for row in raw.chunks_exact(ty.row_bytes(k)) {
                            blocks::decode_row(ty, row, &mut decoded);
                            blocks::pack_row(
                                &decoded,
                                layout,
                                &mut codes,
                                &mut scales,
                                &mut offsets,
                            );
                        }
                        sink.put(&codes)?;
                        r = end;
                    }
                }
                Ok(())
            },
        )?;
        let scales = self.g.tensor_from(
            &format!("{prefix}.MatMul.weight_scales"),
            &[n, k / block],
            &scales,
        )?;
        let offsets = if layout.offset {
            Some(self.g.tensor_from(
                &format!("{prefix}.MatMul.weight_offsets"),
                &[k / 32, n],
                &transpose(&offsets, n, k / 32),
            )?)
        } else {
            None
        };
        Ok(LinearWeights::NBits {
            q,
            scales,
            n,
            k,
            bits,
            block,
            zero_points: None,
            offsets,
            offset_block: 32,
        })
    }

    /// `Σ_{i∈b} x[i]` for each block b of `block` features: `[.., k] -> [.., k/block]`,
    /// computed once per activation tensor (q/k/v and gate/up share theirs).
    fn block_sums(&mut self, x: &str, k: usize, block: usize) -> String {
        let key = format!("{x}#{block}");
        if let Some(s) = self.block_sums.get(&key) {
            return s.clone();
        }
        let name = format!("{}/BlockSum{block}", x.trim_end_matches("/output_0"));
        let shape = self.g.constant_i64(
            &format!("{name}/shape"),
            &[4],
            &[0, 0, (k / block) as i64, block as i64],
        );
        let r = self.g.node(
            &format!("{name}/Reshape"),
            "Reshape",
            "",
            &[x, &shape],
            1,
            &[],
        );
        let axes = self.g.constant_i64(&format!("{name}/axes"), &[1], &[-1]);
        let sum = self.g.node(
            &format!("{name}/ReduceSum"),
            "ReduceSum",
            "",
            &[&r[0], &axes],
            1,
            &[("keepdims", Attr::I(0))],
        )[0]
        .clone();
        self.block_sums.insert(key, sum.clone());
        sum
    }

    pub(super) fn apply_linear(
        &mut self,
        name: &str,
        x: &str,
        w: &LinearWeights,
        output: Option<String>,
    ) -> String {
        let (op, domain, inputs, attrs): (&str, &str, Vec<&str>, Vec<(&str, Attr)>) = match w {
            LinearWeights::NBits {
                q,
                scales,
                n,
                k,
                bits,
                block,
                zero_points,
                ..
            } => (
                "MatMulNBits",
                MS,
                match zero_points {
                    Some(z) => vec![x, q, scales, z],
                    None => vec![x, q, scales],
                },
                vec![
                    ("K", Attr::I(*k as i64)),
                    ("N", Attr::I(*n as i64)),
                    ("bits", Attr::I(*bits as i64)),
                    ("block_size", Attr::I(*block as i64)),
                    ("accuracy_level", Attr::I(self.opts.accuracy_level)),
                ],
            ),
            LinearWeights::Fp32 { w } => ("MatMul", "", vec![x, w], vec![]),
        };
        let node = format!("{name}/{op}");
        let offset = match w {
            LinearWeights::NBits {
                offsets: Some(o),
                k,
                offset_block,
                ..
            } => Some((o.clone(), *k, *offset_block)),
            _ => None,
        };
        let y = match (&output, &offset) {
            (Some(out), None) => {
                self.g.node_named(
                    &node,
                    op,
                    domain,
                    &inputs,
                    std::slice::from_ref(out),
                    &attrs,
                );
                return out.clone();
            }
            _ => self.g.node(&node, op, domain, &inputs, 1, &attrs)[0].clone(),
        };
        let Some((offsets, k, ob)) = offset else {
            return y;
        };
        // Per-block constants (GGUF Q4_1/Q4_K/Q5_K, --quant offset): y += blocksums(x) @ offsets.
        let sums = self.block_sums(x, k, ob);
        let o = self.g.node(
            &format!("{name}/Offset/MatMul"),
            "MatMul",
            "",
            &[&sums, &offsets],
            1,
            &[],
        )[0]
        .clone();
        let add = format!("{name}/Offset/Add");
        match output {
            Some(out) => {
                self.g
                    .node_named(&add, "Add", "", &[&y, &o], std::slice::from_ref(&out), &[]);
                out
            }
            None => self.g.node(&add, "Add", "", &[&y, &o], 1, &[])[0].clone(),
        }
    }

    /// A linear layer with an optional bias: `x @ W^T (+ b)`.
    pub(super) fn linear(
        &mut self,
        name: &str,
        prefix: &str,
        x: &str,
        lin: &Linear,
        bias: Option<String>,
    ) -> Result<String> {
        let y = match self.mixed_parts(lin) {
            // GGUF parts of different types (Q4_K_M's q/k as Q4_K, v as Q6_K): one product per
            // part, each in its own exact layout, concatenated, rather than all of them widened
            // to the finest layout.
            true => {
                let mut outs = Vec::with_capacity(lin.parts.len());
                for (j, part) in lin.parts.iter().enumerate() {
                    let one = Linear {
                        parts: vec![part.clone()],
                        k: lin.k,
                    };
                    let w = self.linear_weights(&format!("{prefix}.part{j}"), &one)?;
                    outs.push(self.apply_linear(&format!("{name}/part{j}"), x, &w, None));
                }
                let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
                self.g.node(
                    &format!("{name}/Concat"),
                    "Concat",
                    "",
                    &refs,
                    1,
                    &[("axis", Attr::I(-1))],
                )[0]
                .clone()
            }
            false => {
                let w = self.linear_weights(prefix, lin)?;
                self.apply_linear(name, x, &w, None)
            }
        };
        Ok(match bias {
            Some(b) => self
                .g
                .node(&format!("{name}/Add"), "Add", "", &[&y, &b], 1, &[])[0]
                .clone(),
            None => y,
        })
    }
}
