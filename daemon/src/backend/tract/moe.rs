//! com.microsoft `QMoE` (int4 experts) and `MoE` (f32 experts) for tract, which has no importer
//! for either.
//!
//! Per token: softmax over the router logits, the top `k` experts (ties to the lower index),
//! their probabilities renormalized to sum to one when `normalize_routing_weights`; each chosen
//! expert computes `fc2(act(fc1(x) + b1)) + b2` and the results are mixed by those weights.
//! Expert matrices are `[E, N, K]` row-major per expert (`[E, N, K/2]` packed int4, low nibble
//! first, with scales `[E, N, K/block]`, or `[E, N]` without a block size, zero point 8). The
//! int4 experts stay packed in memory and are dequantized on the fly, block by block; each
//! expert projection's rows are split over the backend's thread pool.
//! Activations: `swiglu` (`swiglu_fusion` 0: separate fc3, 1: gate/linear interleaved in fc1,
//! 2: concatenated; `G = min(g, limit)`, `L = clamp(l, -limit, limit)`,
//! `G * sigmoid(alpha * G) * (L + beta)`), `silu`, `relu`, `identity`.

use std::sync::Arc;

use tract_onnx::model::{ParsingContext, optional_inputs};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::common::{axpy, dot, konst, konst_f32, output, par_rows};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    Swiglu {
        fusion: u8,
        alpha: f32,
        beta: f32,
        limit: f32,
    },
    Silu,
    Relu,
    Identity,
}

#[derive(Debug, Clone, PartialEq)]
struct Routing {
    k: usize,
    normalize: bool,
    activation: Activation,
}

fn routing(node: &NodeProto) -> TractResult<Routing> {
    let name = &node.name;
    let op = &node.op_type;
    let k = node.get_attr_opt::<i64>("k")?.unwrap_or(1).max(1) as usize;
    let normalize = node
        .get_attr_opt::<i64>("normalize_routing_weights")?
        .unwrap_or(0)
        != 0;
    ensure!(
        node.get_attr_opt::<i64>("use_sparse_mixer")?.unwrap_or(0) == 0,
        "{op} {name}: use_sparse_mixer is not supported by the tract backend"
    );
    let kind = node
        .get_attr_opt::<String>("activation_type")?
        .unwrap_or_else(|| "relu".to_string());
    let activation = match kind.as_str() {
        "swiglu" => Activation::Swiglu {
            fusion: node.get_attr_opt::<i64>("swiglu_fusion")?.unwrap_or(0) as u8,
            alpha: node.get_attr_opt::<f32>("activation_alpha")?.unwrap_or(1.0),
            beta: node.get_attr_opt::<f32>("activation_beta")?.unwrap_or(0.0),
            limit: node
                .get_attr_opt::<f32>("swiglu_limit")?
                .unwrap_or(f32::INFINITY),
        },
        "silu" => Activation::Silu,
        "relu" => Activation::Relu,
        "identity" => Activation::Identity,
        other => {
            bail!("{op} {name}: activation_type {other:?} is not supported by the tract backend")
        }
    };
    if let Activation::Swiglu { fusion, .. } = activation {
        ensure!(
            fusion <= 2,
            "{op} {name}: swiglu_fusion {fusion} is not 0, 1 or 2"
        );
    }
    Ok(Routing {
        k,
        normalize,
        activation,
    })
}

/// Input positions of one projection: weights, scales (QMoE), bias.
#[derive(Debug, Clone, Copy)]
struct ProjInputs {
    weights: usize,
    scales: Option<usize>,
    bias: Option<usize>,
}

#[derive(Debug, Clone)]
struct MoeNode {
    quantized: bool,
    routing: Routing,
    /// Block size along K for int4 experts; 0: one scale per row.
    block: usize,
    fc1: ProjInputs,
    fc2: ProjInputs,
    fc3: Option<ProjInputs>,
}

pub fn qmoe(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let name = &node.name;
    let routing = routing(node)?;
    let quant = node
        .get_attr_opt::<String>("quant_type")?
        .unwrap_or_else(|| "int".to_string());
    ensure!(
        quant == "int",
        "QMoE {name}: quant_type {quant:?} is not supported by the tract backend (int4 only)"
    );
    let bits = node.get_attr_opt::<i64>("expert_weight_bits")?.unwrap_or(4);
    for attr in [
        "fc1_expert_weight_bits",
        "fc2_expert_weight_bits",
        "fc3_expert_weight_bits",
    ] {
        let b = node.get_attr_opt::<i64>(attr)?.unwrap_or(bits);
        ensure!(
            b == 4,
            "QMoE {name}: {b}-bit experts ({attr}) are not supported by the tract backend (4 only)"
        );
    }
    let block = node.get_attr_opt::<i64>("block_size")?.unwrap_or(0).max(0) as usize;
    let ix: Vec<Option<usize>> = optional_inputs(node).take(21).collect();
    for (i, what) in [
        (11, "fc1_zero_points"),
        (12, "fc2_zero_points"),
        (13, "fc3_zero_points"),
        (14, "router_weights"),
    ] {
        ensure!(
            ix[i].is_none(),
            "QMoE {name}: the {what} input is not supported by the tract backend"
        );
    }
    ensure!(
        ix[15..].iter().all(Option::is_none),
        "QMoE {name}: global/activation scales (fp4/fp8 experts) are not supported by the tract backend"
    );
    let proj = |w: usize, what: &str| -> TractResult<ProjInputs> {
        Ok(ProjInputs {
            weights: ix[w].with_context(|| format!("QMoE {name}: {what} is required"))?,
            scales: Some(
                ix[w + 1].with_context(|| format!("QMoE {name}: {what} scales are required"))?,
            ),
            bias: ix[w + 2],
        })
    };
    let fc3 = match ix[8] {
        Some(_) => Some(proj(8, "fc3_experts_weights")?),
        None => None,
    };
    Ok((
        expand(MoeNode {
            quantized: true,
            routing,
            block,
            fc1: proj(2, "fc1_experts_weights")?,
            fc2: proj(5, "fc2_experts_weights")?,
            fc3,
        }),
        vec![],
    ))
}

pub fn moe(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let name = &node.name;
    let routing = routing(node)?;
    let ix: Vec<Option<usize>> = optional_inputs(node).take(8).collect();
    let proj = |w: usize, what: &str| -> TractResult<ProjInputs> {
        Ok(ProjInputs {
            weights: ix[w].with_context(|| format!("MoE {name}: {what} is required"))?,
            scales: None,
            bias: ix[w + 1],
        })
    };
    let fc3 = match ix[6] {
        Some(_) => Some(proj(6, "fc3_experts_weights")?),
        None => None,
    };
    Ok((
        expand(MoeNode {
            quantized: false,
            routing,
            block: 0,
            fc1: proj(2, "fc1_experts_weights")?,
            fc2: proj(4, "fc2_experts_weights")?,
            fc3,
        }),
        vec![],
    ))
}

impl MoeNode {
    fn projection(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
        p: ProjInputs,
        what: &str,
    ) -> TractResult<Projection> {
        let name = format!("{} {what}", if self.quantized { "QMoE" } else { "MoE" });
        let w = konst(model, inputs[p.weights], &name)?;
        ensure!(
            w.rank() == 3,
            "MoE: {what} weights must be [experts, N, K], got {:?}",
            w.shape()
        );
        let (e, n) = (w.shape()[0], w.shape()[1]);
        let weights = if self.quantized {
            ensure!(
                w.datum_type() == u8::datum_type(),
                "QMoE: {what} weights must be uint8"
            );
            let k = w.shape()[2] * 2;
            let scales = konst_f32(model, inputs[p.scales.context("QMoE: scales")?], &name)?;
            let block = if self.block == 0 { k } else { self.block };
            ensure!(
                k.is_multiple_of(block) && scales.len() == e * n * (k / block),
                "QMoE: {what} has {} scales for {e} experts x {n} rows x {k} columns in blocks of {block}",
                scales.len()
            );
            Weights::Int4 {
                packed: w,
                scales,
                block,
            }
        } else {
            Weights::F32(konst_f32(model, inputs[p.weights], &name)?)
        };
        let k = match &weights {
            Weights::Int4 { packed, .. } => packed.shape()[2] * 2,
            Weights::F32(w) => w.shape()[2],
        };
        let bias = match p.bias {
            Some(b) => {
                let t = konst_f32(model, inputs[b], &name)?;
                ensure!(
                    t.len() == e * n,
                    "MoE: {what} bias has {} values for {e} experts x {n} rows",
                    t.len()
                );
                Some(t)
            }
            None => None,
        };
        Ok(Projection {
            weights,
            bias,
            experts: e,
            n,
            k,
        })
    }
}

impl Expansion for MoeNode {
    fn name(&self) -> StaticName {
        if self.quantized { "QMoE" } else { "MoE" }.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        ensure!(
            x.datum_type == f32::datum_type(),
            "{prefix}: the tract backend runs f32 activations, got {:?}",
            x.datum_type
        );
        let hidden = x
            .shape
            .last()
            .and_then(|d| d.to_usize().ok())
            .context("MoE: the hidden size must be static")?;
        let fc1 = self.projection(model, inputs, self.fc1, "fc1")?;
        let fc2 = self.projection(model, inputs, self.fc2, "fc2")?;
        let fc3 = match self.fc3 {
            Some(p) => Some(self.projection(model, inputs, p, "fc3")?),
            None => None,
        };
        let inter = fc2.k;
        let fused = match self.routing.activation {
            Activation::Swiglu { fusion, .. } => {
                ensure!(
                    (fusion == 0) == fc3.is_some(),
                    "{prefix}: swiglu_fusion {fusion} with{} fc3 weights",
                    if fc3.is_some() { "" } else { "out" }
                );
                fusion != 0
            }
            _ => false,
        };
        let width = if fused { 2 * inter } else { inter };
        ensure!(
            fc1.k == hidden && fc1.n == width && fc2.n == hidden && fc2.experts == fc1.experts,
            "{prefix}: expert shapes fc1 [{}, {}, {}] / fc2 [{}, {}, {}] do not fit hidden {hidden}",
            fc1.experts,
            fc1.n,
            fc1.k,
            fc2.experts,
            fc2.n,
            fc2.k
        );
        if let Some(fc3) = &fc3 {
            ensure!(
                fc3.k == hidden && fc3.n == inter,
                "{prefix}: fc3 is [{}, {}], expected [{inter}, {hidden}]",
                fc3.n,
                fc3.k
            );
        }
        ensure!(
            self.routing.k <= fc1.experts,
            "{prefix}: k = {} experts out of {}",
            self.routing.k,
            fc1.experts
        );
        let op = MoeOp {
            routing: self.routing.clone(),
            fc1,
            fc2,
            fc3,
            inter,
        };
        model.wire_node(prefix, op, &[inputs[0], inputs[1]])
    }
}

#[derive(Debug, Clone)]
enum Weights {
    /// `[E, N, K/2]` uint8 and `[E, N, K/block]` f32.
    Int4 {
        packed: Arc<Tensor>,
        scales: Arc<Tensor>,
        block: usize,
    },
    /// `[E, N, K]`.
    F32(Arc<Tensor>),
}

#[derive(Debug, Clone)]
struct Projection {
    weights: Weights,
    bias: Option<Arc<Tensor>>,
    experts: usize,
    n: usize,
    k: usize,
}

impl Projection {
    /// `y = W[e] x + b[e]`.
    fn apply(&self, e: usize, x: &[f32], y: &mut [f32]) -> TractResult<()> {
        let (n, k) = (self.n, self.k);
        // Rows are split over the pool in chunks of at least 64.
        match &self.weights {
            Weights::F32(w) => {
                let w = w.try_as_plain_ram()?;
                let w = &w.as_slice::<f32>()?[e * n * k..(e + 1) * n * k];
                par_rows(y, 64, |r0, ys| {
                    for (r, y) in (r0..).zip(ys) {
                        *y = dot(&w[r * k..(r + 1) * k], x);
                    }
                });
            }
            Weights::Int4 {
                packed,
                scales,
                block,
            } => {
                let block = *block;
                let packed = packed.try_as_plain_ram()?;
                let packed = &packed.as_slice::<u8>()?[e * n * k / 2..(e + 1) * n * k / 2];
                let scales = scales.try_as_plain_ram()?;
                let blocks = k / block;
                let scales = &scales.as_slice::<f32>()?[e * n * blocks..(e + 1) * n * blocks];
                // (q - 8) * s . x = s * (q . x - 8 * sum(x)) per block.
                let xsum: Vec<f32> = x.chunks(block).map(|c| c.iter().sum()).collect();
                par_rows(y, 64, |r0, ys| {
                    let mut codes = vec![0f32; block];
                    for (r, y) in (r0..).zip(ys) {
                        let row = &packed[r * k / 2..(r + 1) * k / 2];
                        let mut acc = 0f32;
                        for bi in 0..blocks {
                            let bytes = &row[bi * block / 2..(bi + 1) * block / 2];
                            for (i, &byte) in bytes.iter().enumerate() {
                                codes[2 * i] = (byte & 0x0f) as f32;
                                codes[2 * i + 1] = (byte >> 4) as f32;
                            }
                            let xs = &x[bi * block..(bi + 1) * block];
                            acc += scales[r * blocks + bi] * (dot(&codes, xs) - 8.0 * xsum[bi]);
                        }
                        *y = acc;
                    }
                });
            }
        }
        if let Some(b) = &self.bias {
            let b = b.try_as_plain_ram()?;
            let b = &b.as_slice::<f32>()?[e * n..(e + 1) * n];
            for (y, b) in y.iter_mut().zip(b) {
                *y += b;
            }
        }
        Ok(())
    }

    fn same(&self, other: &Self) -> bool {
        let w = match (&self.weights, &other.weights) {
            (Weights::F32(a), Weights::F32(b)) => Arc::ptr_eq(a, b),
            (Weights::Int4 { packed: a, .. }, Weights::Int4 { packed: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        };
        w && self.n == other.n && self.k == other.k
    }
}

#[derive(Debug, Clone)]
pub struct MoeOp {
    routing: Routing,
    fc1: Projection,
    fc2: Projection,
    fc3: Option<Projection>,
    inter: usize,
}

impl PartialEq for MoeOp {
    fn eq(&self, other: &Self) -> bool {
        self.routing == other.routing
            && self.fc1.same(&other.fc1)
            && self.fc2.same(&other.fc2)
            && match (&self.fc3, &other.fc3) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            }
    }
}
impl Eq for MoeOp {}

impl Op for MoeOp {
    fn name(&self) -> StaticName {
        "EdgellmMoE".into()
    }
    op_as_typed_op!();
}

impl TypedOp for MoeOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![f32::fact(inputs[0].shape.clone())])
    }
    as_op!();
}

impl MoeOp {
    /// The top-k experts of one token and their mixing weights.
    fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let z: f32 = exp.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut top: Vec<(usize, f32)> = order[..self.routing.k]
            .iter()
            .map(|&e| (e, exp[e] / z))
            .collect();
        if self.routing.normalize {
            let sum: f32 = top.iter().map(|t| t.1).sum();
            for t in &mut top {
                t.1 /= sum;
            }
        }
        top
    }

    fn activate(&self, h1: &[f32], h3: Option<&[f32]>, out: &mut [f32]) {
        let inter = self.inter;
        match self.routing.activation {
            Activation::Swiglu {
                fusion,
                alpha,
                beta,
                limit,
            } => {
                for (i, o) in out.iter_mut().enumerate() {
                    let (g, l) = match (fusion, h3) {
                        (1, _) => (h1[2 * i], h1[2 * i + 1]),
                        (2, _) => (h1[i], h1[inter + i]),
                        (_, Some(h3)) => (h1[i], h3[i]),
                        (_, None) => (h1[i], 0.0),
                    };
                    let g = g.min(limit);
                    let l = l.clamp(-limit, limit);
                    *o = g / (1.0 + (-alpha * g).exp()) * (l + beta);
                }
            }
            Activation::Silu => {
                for (o, &x) in out.iter_mut().zip(h1) {
                    *o = x / (1.0 + (-x).exp());
                }
            }
            Activation::Relu => {
                for (o, &x) in out.iter_mut().zip(h1) {
                    *o = x.max(0.0);
                }
            }
            Activation::Identity => out.copy_from_slice(&h1[..inter]),
        }
    }
}

impl EvalOp for MoeOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].try_as_plain_ram()?;
        let shape = x.shape().to_vec();
        let x = x.as_slice::<f32>()?;
        let router = inputs[1].try_as_plain_ram()?;
        let router = router.as_slice::<f32>()?;
        let hidden = self.fc2.n;
        let experts = self.fc1.experts;
        let tokens = x.len() / hidden;
        ensure!(
            router.len() == tokens * experts,
            "MoE: router_probs has {} values for {tokens} tokens x {experts} experts",
            router.len()
        );
        let mut out = vec![0f32; x.len()];
        let mut h1 = vec![0f32; self.fc1.n];
        let mut h3 = vec![0f32; self.inter];
        let mut act = vec![0f32; self.inter];
        let mut h2 = vec![0f32; hidden];
        for t in 0..tokens {
            let xt = &x[t * hidden..(t + 1) * hidden];
            for (e, w) in self.route(&router[t * experts..(t + 1) * experts]) {
                self.fc1.apply(e, xt, &mut h1)?;
                let h3 = match &self.fc3 {
                    Some(fc3) => {
                        fc3.apply(e, xt, &mut h3)?;
                        Some(&h3[..])
                    }
                    None => None,
                };
                self.activate(&h1, h3, &mut act);
                self.fc2.apply(e, &act, &mut h2)?;
                axpy(&mut out[t * hidden..(t + 1) * hidden], w, &h2);
            }
        }
        Ok(tvec![output(&shape, out)?])
    }
}
