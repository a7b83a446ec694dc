//! Linear layers: checkpoint rows stacked along N, encoded as int4 `MatMulNBits` blocks or a
//! transposed f32 `MatMul` weight, plus the optional bias `Add`.

use std::ops::Range;

use super::{DecoderBuilder, Precision};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
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
    Int4 {
        q: String,
        scales: String,
        n: usize,
        k: usize,
    },
    Fp32 {
        w: String,
    },
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

    /// Writes a linear layer's weights (int4 blocks + scales, or a transposed f32 matrix).
    pub(super) fn linear_weights(&mut self, prefix: &str, lin: &Linear) -> Result<LinearWeights> {
        let (n, k, bs) = (lin.n(), lin.k, self.opts.block);
        match self.opts.precision {
            Precision::Int4 => {
                let k_blocks = k.div_ceil(bs);
                let mut scales = Vec::with_capacity(n * k_blocks);
                let q = self.g.tensor::<u8>(
                    &format!("{prefix}.MatMul.weight_Q4"),
                    &[n, k_blocks, bs / 2],
                    |sink| {
                        for_each_chunk(self.ck, lin, |rows| {
                            let mut packed = Vec::with_capacity(rows.len() / 2 + bs);
                            quant::quantize_rows(rows, k, bs, &mut packed, &mut scales);
                            sink.put(&packed)
                        })
                    },
                )?;
                let scales = self.g.tensor_from(
                    &format!("{prefix}.MatMul.weight_scales"),
                    &[n, k_blocks],
                    &scales,
                )?;
                Ok(LinearWeights::Int4 { q, scales, n, k })
            }
            Precision::Fp32 => {
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

    pub(super) fn apply_linear(
        &mut self,
        name: &str,
        x: &str,
        w: &LinearWeights,
        output: Option<String>,
    ) -> String {
        let bs = self.opts.block as i64;
        let (op, domain, inputs, attrs): (&str, &str, Vec<&str>, Vec<(&str, Attr)>) = match w {
            LinearWeights::Int4 { q, scales, n, k } => (
                "MatMulNBits",
                MS,
                vec![x, q, scales],
                vec![
                    ("K", Attr::I(*k as i64)),
                    ("N", Attr::I(*n as i64)),
                    ("bits", Attr::I(4)),
                    ("block_size", Attr::I(bs)),
                    ("accuracy_level", Attr::I(4)),
                ],
            ),
            LinearWeights::Fp32 { w } => ("MatMul", "", vec![x, w], vec![]),
        };
        let node = format!("{name}/{op}");
        match output {
            Some(out) => {
                self.g.node_named(
                    &node,
                    op,
                    domain,
                    &inputs,
                    std::slice::from_ref(&out),
                    &attrs,
                );
                out
            }
            None => self.g.node(&node, op, domain, &inputs, 1, &attrs)[0].clone(),
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
        let w = self.linear_weights(prefix, lin)?;
        let y = self.apply_linear(name, x, &w, None);
        Ok(match bias {
            Some(b) => self
                .g
                .node(&format!("{name}/Add"), "Add", "", &[&y, &b], 1, &[])[0]
                .clone(),
            None => y,
        })
    }
}
