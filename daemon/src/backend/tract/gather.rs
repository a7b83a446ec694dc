//! com.microsoft `GatherBlockQuantized` for tract's missing layouts: the embedding lookup
//! (`input_ids` -> hidden states) of packages whose table is stored in blocks of 8-bit codes,
//! or of 4-bit codes with explicit zero points.
//!
//! Layout (ONNX Runtime's, for uint8 `data`): `data` `[V, H*bits/8]` (4 bits: two codes per
//! byte, low nibble first; 8 bits: one per byte), quantized along the last axis in blocks of
//! `block_size` (a power of two from 16; a last block may be partial); `scales` `[V,
//! ceil(H/block)]` (f32 or f16; the output takes their type); optional uint8 `zero_points`
//! `[V, ceil(blocks*bits/8)]`, packed like `data`. Absent, the zero point is `2^(bits-1)`: 128
//! for 8 bits, 8 for 4 bits (ONNX Runtime's CPU kernel; its int4/uint4 `data` types default to
//! 0, but those are not uint8). `gather_axis` 0 and `quantize_axis` the last, which ONNX
//! Runtime requires of uint8 data. Output `[indices.., H]`: `(code - zero_point) as f32 *
//! scale`, the same f32 arithmetic as ONNX Runtime, so the rows are bit-identical. Indices may
//! be negative (counted from the end); out of range, the row is zeros, as in ONNX Runtime.
//!
//! Only the gathered rows are dequantized; the table stays as the package stores it, shared
//! with the graph's constant. Everything else (4-bit tables without zero points, which tract
//! lowers to Q4_0 for block 32 or to a graph over the packed bytes) goes to tract-onnx's own
//! importer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

use super::common::{konst, konst_f32, output};

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract-onnx's own GatherBlockQuantized parser, for the layouts it covers.
pub(super) static BUILTIN: OnceLock<Builder> = OnceLock::new();

pub fn gather_block_quantized(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if !ours(node)? {
        let builtin = BUILTIN
            .get()
            .context("GatherBlockQuantized: tract's importer is not registered")?;
        return builtin(ctx, node);
    }
    Ok((
        expand(GatherBlockQuantized {
            bits: node.get_attr_opt("bits")?.unwrap_or(4),
            block: node.get_attr_opt("block_size")?.unwrap_or(128),
            zero_points: has_zero_points(node),
        }),
        vec![],
    ))
}

fn has_zero_points(node: &NodeProto) -> bool {
    node.input.get(3).is_some_and(|i| !i.is_empty())
}

/// Whether this op runs the node (else tract's importer does).
fn ours(node: &NodeProto) -> TractResult<bool> {
    let bits: usize = node.get_attr_opt("bits")?.unwrap_or(4);
    let block: usize = node.get_attr_opt("block_size")?.unwrap_or(128);
    let gather_axis: i64 = node.get_attr_opt("gather_axis")?.unwrap_or(0);
    let quantize_axis: i64 = node.get_attr_opt("quantize_axis")?.unwrap_or(1);
    // A rank-2 table (checked when wired): gather axis 0 (or -2), quantize axis 1 (or -1).
    Ok((bits == 8 || (bits == 4 && has_zero_points(node)))
        && matches!(gather_axis, 0 | -2)
        && matches!(quantize_axis, 1 | -1)
        && block >= 16
        && block.is_power_of_two())
}

/// Points the tables this op runs at the initializer itself when the graph reshapes one
/// `[V, ...]` into `[V, packed]` for it, and drops the Reshape when nothing else reads it.
///
/// The exporter stores an embedding table as MatMulNBits weights `[V, blocks, blob]` (with tied
/// embeddings, the lm_head's own) and reshapes them for GatherBlockQuantized; tract would fold
/// that Reshape into a second copy of the table at load. Reading the initializer directly keeps
/// one table, shared with the lm_head's constant.
pub(super) fn read_tables_in_place(graph: &mut GraphProto) {
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut source: HashMap<String, String> = HashMap::new();
    for node in &graph.node {
        if node.op_type != "Reshape" || node.input.len() != 2 || node.output.len() != 1 {
            continue;
        }
        let (Some(data), Some(shape)) = (
            inits.get(node.input[0].as_str()),
            inits.get(node.input[1].as_str()),
        ) else {
            continue;
        };
        let target = int64_values(shape);
        let rest: i64 = data.dims.iter().skip(1).product();
        if data.dims.len() >= 2
            && target.len() == 2
            && target[0] == data.dims[0]
            && (target[1] == rest || target[1] == -1)
        {
            source.insert(node.output[0].clone(), node.input[0].clone());
        }
    }
    let mut rewired = false;
    for node in &mut graph.node {
        if node.op_type == "GatherBlockQuantized"
            && ours(node).unwrap_or(false)
            && let Some(init) = node.input.first().and_then(|i| source.get(i))
        {
            node.input[0] = init.clone();
            rewired = true;
        }
    }
    if rewired {
        let mut read: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for node in &graph.node {
            read.extend(node.input.iter().cloned());
        }
        graph.node.retain(|n| {
            let unread = |o: &String| source.contains_key(o) && !read.contains(o);
            !(n.op_type == "Reshape" && n.output.first().is_some_and(unread))
        });
    }
}

/// The values of an int64 initializer stored inline (raw little-endian bytes or `int64_data`).
fn int64_values(t: &TensorProto) -> Vec<i64> {
    if t.data_type != DataType::Int64 as i32 {
        return Vec::new();
    }
    if !t.raw_data.is_empty() {
        return t
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
    }
    t.int64_data.clone()
}

#[derive(Debug, Clone)]
struct GatherBlockQuantized {
    bits: usize,
    block: usize,
    zero_points: bool,
}

impl Expansion for GatherBlockQuantized {
    fn name(&self) -> StaticName {
        "GatherBlockQuantized".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, if self.zero_points { 4 } else { 3 })?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[2].datum_type, &outputs[0].datum_type)?;
        let per_byte = 8 / self.bits;
        s.given_2(
            &inputs[0].shape,
            &inputs[1].shape,
            move |s, data, indices| {
                let mut shape: TVec<TDim> = indices;
                let packed = data.iter().skip(1).fold(1.to_dim(), |p, d| p * d);
                shape.push(packed * per_byte);
                s.equals(&outputs[0].shape, ShapeFactoid::from(shape))
            },
        )
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (bits, block) = (self.bits, self.block);
        let data = konst(model, inputs[0], "GatherBlockQuantized: data")?;
        // [rows, packed columns], or the [rows, blocks, blob] bytes [`read_tables_in_place`]
        // points at.
        ensure!(
            data.datum_type() == u8::datum_type() && data.rank() >= 2 && data.shape()[0] > 0,
            "GatherBlockQuantized {prefix}: data is {:?} {:?}, expected a uint8 table [rows, packed columns]",
            data.datum_type(),
            data.shape()
        );
        let rows = data.shape()[0];
        let cols = data.len() / rows * 8 / bits;
        let blocks = cols.div_ceil(block);
        let scales = konst_f32(model, inputs[2], "GatherBlockQuantized: scales")?;
        ensure!(
            scales.len() == rows * blocks,
            "GatherBlockQuantized {prefix}: scales {:?} for {rows} rows of {blocks} blocks",
            scales.shape()
        );
        let zero_points = if self.zero_points {
            let zp = konst(model, inputs[3], "GatherBlockQuantized: zero_points")?;
            let per_row = (blocks * bits).div_ceil(8);
            ensure!(
                zp.datum_type() == u8::datum_type() && zp.len() == rows * per_row,
                "GatherBlockQuantized {prefix}: zero points are {:?} {:?}, expected uint8 [{rows}, {per_row}]",
                zp.datum_type(),
                zp.shape()
            );
            Some(zp)
        } else {
            None
        };
        let indices = model.outlet_fact(inputs[1])?.datum_type;
        ensure!(
            indices == i64::datum_type() || indices == i32::datum_type(),
            "GatherBlockQuantized {prefix}: indices are {indices:?}"
        );
        let op = BlockQuantGather {
            bits,
            block,
            rows,
            cols,
            data,
            scales,
            zero_points,
        };
        let dt = model.outlet_fact(inputs[2])?.datum_type;
        if dt == f32::datum_type() {
            return model.wire_node(prefix, op, &[inputs[1]]);
        }
        let rows = model.wire_node(format!("{prefix}.rows"), op, &[inputs[1]])?;
        model.wire_node(prefix, cast(dt), &rows)
    }
}

/// The typed op: gathers and dequantizes rows of a constant table.
#[derive(Debug, Clone)]
pub struct BlockQuantGather {
    /// 4 or 8.
    bits: usize,
    block: usize,
    rows: usize,
    /// Values per row (H).
    cols: usize,
    /// `[rows, cols*bits/8]` uint8 (or `[rows, blocks, blob]`, the same bytes), the package's.
    data: Arc<Tensor>,
    /// `[rows, ceil(cols/block)]` f32.
    scales: Arc<Tensor>,
    /// `[rows, ceil(blocks*bits/8)]` uint8, packed like `data`; `None`: `2^(bits-1)`.
    zero_points: Option<Arc<Tensor>>,
}

impl PartialEq for BlockQuantGather {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.data, &other.data) && Arc::ptr_eq(&self.scales, &other.scales)
    }
}
impl Eq for BlockQuantGather {}

impl Op for BlockQuantGather {
    fn name(&self) -> StaticName {
        "EdgellmGatherBlockQuantized".into()
    }
    op_as_typed_op!();
}

impl TypedOp for BlockQuantGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(self.cols.to_dim());
        Ok(tvec![f32::fact(shape)])
    }
    as_op!();
}

impl BlockQuantGather {
    /// Row `r` of the table dequantized into `out` (`cols` values).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) -> TractResult<()> {
        let (bits, block, cols) = (self.bits, self.block, self.cols);
        let blocks = cols.div_ceil(block);
        let row_bytes = cols * bits / 8;
        let data = self.data.try_as_plain_ram()?;
        let data = &data.as_slice::<u8>()?[r * row_bytes..(r + 1) * row_bytes];
        let scales = self.scales.try_as_plain_ram()?;
        let scales = &scales.as_slice::<f32>()?[r * blocks..(r + 1) * blocks];
        let zero_points = self
            .zero_points
            .as_ref()
            .map(|z| z.try_as_plain_ram())
            .transpose()?;
        let zero_points = match &zero_points {
            Some(z) => {
                let per_row = (blocks * bits).div_ceil(8);
                Some(&z.as_slice::<u8>()?[r * per_row..(r + 1) * per_row])
            }
            None => None,
        };
        for (b, (out, &scale)) in out.chunks_mut(block).zip(scales).enumerate() {
            let zp = match zero_points {
                None => 1i32 << (bits - 1),
                Some(z) if bits == 8 => z[b] as i32,
                Some(z) => ((z[b / 2] >> (4 * (b % 2))) & 0x0f) as i32,
            };
            let first = b * block;
            if bits == 8 {
                for (o, &c) in out.iter_mut().zip(&data[first..]) {
                    *o = (c as i32 - zp) as f32 * scale;
                }
            } else {
                for (i, o) in out.iter_mut().enumerate() {
                    let h = first + i;
                    let c = (data[h / 2] >> (4 * (h % 2))) & 0x0f;
                    *o = (c as i32 - zp) as f32 * scale;
                }
            }
        }
        Ok(())
    }
}

impl EvalOp for BlockQuantGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let indices = inputs[0].cast_to::<i64>()?;
        let mut shape = indices.shape().to_vec();
        let indices = indices.try_as_plain_ram()?;
        let indices = indices.as_slice::<i64>()?;
        let (rows, cols) = (self.rows as i64, self.cols);
        let mut out = vec![0f32; indices.len() * cols];
        for (o, &i) in out.chunks_exact_mut(cols).zip(indices) {
            let r = if i < 0 { i + rows } else { i };
            if (0..rows).contains(&r) {
                self.dequantize_row(r as usize, o)?;
            }
        }
        shape.push(cols);
        Ok(tvec![output(&shape, out)?])
    }
}

#[cfg(test)]
mod tests {
    use edgellm_export::onnx::Attr;

    #[cfg(feature = "ort")]
    use super::super::test_graph::NO_ORT;
    use super::super::test_graph::{Arg, Init, Input, Model, Node, Rng, run_state};

    /// A quantized table and its random contents.
    struct Table {
        rows: usize,
        cols: usize,
        bits: usize,
        block: usize,
        /// `[rows, cols*bits/8]`.
        data: Vec<u8>,
        /// `[rows, ceil(cols/block)]`.
        scales: Vec<f32>,
        /// `[rows, ceil(blocks*bits/8)]`, packed like `data`.
        zero_points: Option<Vec<u8>>,
    }

    impl Table {
        fn new(seed: u64, rows: usize, cols: usize, bits: usize, block: usize) -> Table {
            let mut rng = Rng::new(seed);
            let blocks = cols.div_ceil(block);
            Table {
                rows,
                cols,
                bits,
                block,
                data: rng.u8s(rows * cols * bits / 8),
                scales: rng.f32s(rows * blocks).iter().map(|s| s * 0.05).collect(),
                zero_points: None,
            }
        }

        fn blocks(&self) -> usize {
            self.cols.div_ceil(self.block)
        }

        fn with_zero_points(mut self, seed: u64) -> Table {
            let per_row = (self.blocks() * self.bits).div_ceil(8);
            self.zero_points = Some(Rng::new(seed).u8s(self.rows * per_row));
            self
        }

        /// Scales rounded to f16 (tract's Q4_0 lowering stores them so).
        fn with_f16_scales(mut self) -> Table {
            for s in &mut self.scales {
                *s = half_round(*s);
            }
            self
        }

        /// The node reading the table; `reshaped`: `data` comes from `[rows, blocks, block *
        /// bits / 8]` through a Reshape, as the exporter writes a table shared with the lm_head.
        fn model(&self, input: &Input, reshaped: bool) -> Model {
            let (rows, blocks) = (self.rows, self.blocks());
            let packed = self.cols * self.bits / 8;
            let mut nodes = Vec::new();
            let data = if reshaped {
                nodes.push(Node {
                    op: "Reshape",
                    ms: false,
                    args: vec![
                        Arg::Init(Init::U8(
                            vec![rows, blocks, packed / blocks],
                            self.data.clone(),
                        )),
                        Arg::Init(Init::I64(vec![rows as i64, packed as i64])),
                    ],
                    attrs: vec![],
                });
                Arg::Node(0)
            } else {
                Arg::Init(Init::U8(vec![rows, packed], self.data.clone()))
            };
            let mut args = vec![
                data,
                Arg::X,
                Arg::Init(Init::F32(vec![rows, blocks], self.scales.clone())),
            ];
            if let Some(z) = &self.zero_points {
                args.push(Arg::Init(Init::U8(vec![rows, z.len() / rows], z.clone())));
            }
            nodes.push(Node {
                op: "GatherBlockQuantized",
                ms: true,
                args,
                attrs: vec![
                    ("bits", Attr::I(self.bits as i64)),
                    ("block_size", Attr::I(self.block as i64)),
                    ("gather_axis", Attr::I(0)),
                    ("quantize_axis", Attr::I(1)),
                ],
            });
            Model::new(input, &nodes, 3)
        }

        /// ONNX Runtime's CPU loop, element by element: `(code - zp) as f32 * scale`, zeros for
        /// an index out of range.
        fn reference(&self, indices: &[i64]) -> Vec<f32> {
            let (rows, cols, bits) = (self.rows as i64, self.cols, self.bits);
            let blocks = self.blocks();
            let mut out = Vec::new();
            for &i in indices {
                let r = if i < 0 { i + rows } else { i };
                if !(0..rows).contains(&r) {
                    out.extend(std::iter::repeat_n(0.0, cols));
                    continue;
                }
                let r = r as usize;
                for h in 0..cols {
                    let e = r * cols + h;
                    let code = match bits {
                        8 => self.data[e] as i32,
                        _ => ((self.data[e / 2] >> (4 * (e % 2))) & 0x0f) as i32,
                    };
                    let b = h / self.block;
                    let zp = match &self.zero_points {
                        None => 1 << (bits - 1),
                        Some(z) => {
                            let per_row = z.len() / self.rows;
                            match bits {
                                8 => z[r * per_row + b] as i32,
                                _ => ((z[r * per_row + b / 2] >> (4 * (b % 2))) & 0x0f) as i32,
                            }
                        }
                    };
                    out.push((code - zp) as f32 * self.scales[r * blocks + b]);
                }
            }
            out
        }

        /// Gathers `indices` through tract, `ours` or tract's importer, and (with a library)
        /// ONNX Runtime: both must give the reference's values exactly.
        fn check(&self, indices: &[i64], reshaped: bool, ours: bool) {
            let input = Input::I64(vec![1, indices.len()], indices.to_vec());
            let model = self.model(&input, reshaped);
            let mut state = model.tract_state(&input).unwrap();
            let ran_ours = state
                .model()
                .nodes()
                .iter()
                .any(|n| n.op().name() == "EdgellmGatherBlockQuantized");
            assert_eq!(ran_ours, ours, "our op runs the layout: {ours}");
            let expected = self.reference(indices);
            let y = run_state(&mut state, &input).unwrap();
            assert_eq!(y, expected, "tract");
            #[cfg(feature = "ort")]
            assert_eq!(
                model.run_ort(&input).expect(NO_ORT),
                expected,
                "ONNX Runtime"
            );
        }
    }

    fn half_round(x: f32) -> f32 {
        // f16 keeps 11 significant bits: round the f32 mantissa (23 bits) to 10 stored bits.
        let bits = x.to_bits();
        let rounded = (bits + (1 << 12)) & !((1 << 13) - 1);
        f32::from_bits(rounded)
    }

    #[test]
    fn int8_default_zero_point_block16_with_negative_and_out_of_range_indices() {
        Table::new(1, 10, 48, 8, 16).check(&[3, 0, 9, -1, 10, -11, 3], false, true);
    }

    #[test]
    fn int8_explicit_zero_points() {
        Table::new(2, 12, 96, 8, 32)
            .with_zero_points(3)
            .check(&[11, 2, 2, 5], false, true);
        Table::new(4, 5, 512, 8, 256)
            .with_zero_points(5)
            .check(&[4, 0], false, true);
    }

    #[test]
    fn int8_partial_last_block() {
        // 40 columns in blocks of 32: the second block holds 8.
        Table::new(6, 7, 40, 8, 32).check(&[6, 1], false, true);
        Table::new(7, 7, 40, 8, 32)
            .with_zero_points(8)
            .check(&[0, 6], false, true);
    }

    #[test]
    fn int8_table_behind_a_reshape_as_the_exporter_writes_it() {
        Table::new(9, 16, 64, 8, 32).check(&[15, 7, 0], true, true);
    }

    #[test]
    fn int4_with_zero_points() {
        // Odd block counts: the last zero-point byte holds one.
        Table::new(10, 9, 96, 4, 32)
            .with_zero_points(11)
            .check(&[8, 0, -2], false, true);
        Table::new(12, 9, 48, 4, 16)
            .with_zero_points(13)
            .check(&[1, 2], false, true);
        Table::new(14, 9, 64, 4, 16)
            .with_zero_points(15)
            .check(&[3], true, true);
    }

    #[test]
    fn int4_without_zero_points_stays_with_tracts_importer() {
        // Block 32 becomes tract's Q4_0 (scales rounded to f16), others a graph over the bytes.
        Table::new(16, 9, 96, 4, 32)
            .with_f16_scales()
            .check(&[8, 0, 4], false, false);
        Table::new(17, 9, 64, 4, 16).check(&[8, 0], false, false);
    }

    /// The exporter's tied embedding: the lm_head's MatMulNBits bytes `[V, blocks, blob]`, read
    /// by GatherBlockQuantized through a Reshape to `[V, H*bits/8]`. Both ops must read the
    /// same constant (a reshaped copy would hold the table twice).
    #[test]
    fn tied_table_is_the_lm_heads_bytes() {
        let (rows, cols, bits, block) = (40, 64, 8, 32);
        let t = Table::new(30, rows, cols, bits, block);
        let blocks = t.blocks();
        let indices = [3i64, 39, 0];
        let input = Input::I64(vec![1, 3], indices.to_vec());
        let attrs = |k: usize, n: usize| {
            vec![
                ("K", Attr::I(k as i64)),
                ("N", Attr::I(n as i64)),
                ("bits", Attr::I(bits as i64)),
                ("block_size", Attr::I(block as i64)),
                ("accuracy_level", Attr::I(4)),
            ]
        };
        let nodes = [
            Node {
                op: "Reshape",
                ms: false,
                args: vec![
                    Arg::Init(Init::U8(
                        vec![rows, blocks, block * bits / 8],
                        t.data.clone(),
                    )),
                    Arg::Init(Init::I64(vec![rows as i64, (cols * bits / 8) as i64])),
                ],
                attrs: vec![],
            },
            Node {
                op: "GatherBlockQuantized",
                ms: true,
                args: vec![
                    Arg::Node(0),
                    Arg::X,
                    Arg::Init(Init::F32(vec![rows, blocks], t.scales.clone())),
                ],
                attrs: vec![
                    ("bits", Attr::I(bits as i64)),
                    ("block_size", Attr::I(block as i64)),
                ],
            },
            Node {
                op: "MatMulNBits",
                ms: true,
                args: vec![Arg::Node(1), Arg::Same(0, 0), Arg::Same(1, 2)],
                attrs: attrs(cols, rows),
            },
        ];
        let model = Model::new(&input, &nodes, 3);
        let mut state = model.tract_state(&input).unwrap();
        let ops = state.model().nodes();
        let gather = ops
            .iter()
            .find_map(|n| n.op_as::<super::BlockQuantGather>())
            .expect("our gather runs the table");
        let matmul = ops
            .iter()
            .find_map(|n| n.op_as::<super::super::matmul::NBitsMatMul>())
            .expect("our MatMulNBits runs the lm_head");
        assert!(
            std::sync::Arc::ptr_eq(&gather.data, matmul.weights()),
            "the gather and the lm_head hold one table"
        );
        let y = run_state(&mut state, &input).unwrap();
        assert_eq!(y.len(), 3 * rows);
        #[cfg(feature = "ort")]
        {
            let o = model.run_ort(&input).expect(NO_ORT);
            let max = o.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = o
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 0.02 * max,
                "logits: tract vs ONNX Runtime {diff} (max {max})"
            );
        }
    }
}
