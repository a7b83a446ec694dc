//! com.microsoft `GroupQueryAttention` for tract, replacing tract-onnx's importer (which only
//! handles a prompt against an empty cache or one token against a cache, and rejects attention
//! sinks and sliding windows with symbolic lengths).
//!
//! Contract, as the tract backend feeds it (`past` holds only valid rows, no shared buffer):
//! `query [B, S, H*D]`, `key`/`value [B, S, Hkv*D]`, `past_key`/`past_value [B, Hkv, P, D]`
//! holding the P positions just before this step, `seqlens_k [B]` = T - 1 where T counts every
//! token so far, this step's included. The new tokens sit at absolute positions `T-S .. T`;
//! past row `j` at `T-S-P+j`. With `do_rotary`, Q and K are rotated (non-interleaved or
//! interleaved, full or partial width: the rotated width is twice `cos_cache`'s) at their
//! absolute positions before K is cached. Query at position `p` sees key `q <= p` (causal) with
//! `p - q < local_window_size` when a window is set; scores are `scale * q.k`, optionally
//! soft-capped (`softcap * tanh(x / softcap)`), and the softmax denominator gains
//! `exp(head_sink[h])` (gpt-oss attention sinks) or `exp(0)` (`smooth_softmax`).
//! Outputs: `[B, S, H*D]` and `present_key`/`present_value` = past followed by this step's K/V.

use std::sync::Arc;

use tract_onnx::model::{ParsingContext, optional_inputs};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::common::{axpy, dot, konst_f32_vec, output};

pub fn group_query_attention(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let name = &node.name;
    let num_heads: usize = node.get_attr("num_heads")?;
    let kv_num_heads: usize = node.get_attr("kv_num_heads")?;
    ensure!(
        kv_num_heads > 0 && num_heads.is_multiple_of(kv_num_heads),
        "GroupQueryAttention {name}: num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}"
    );
    let scale = node.get_attr_opt::<f32>("scale")?.unwrap_or(0.0);
    let causal = node.get_attr_opt::<i64>("causal")?.unwrap_or(1) != 0;
    let do_rotary = node.get_attr_opt::<i64>("do_rotary")?.unwrap_or(0) != 0;
    let interleaved = node.get_attr_opt::<i64>("rotary_interleaved")?.unwrap_or(0) != 0;
    let window = node
        .get_attr_opt::<i64>("local_window_size")?
        .unwrap_or(-1)
        .max(0) as usize;
    let softcap = node.get_attr_opt::<f32>("softcap")?.unwrap_or(0.0);
    let smooth_softmax = node.get_attr_opt::<i64>("smooth_softmax")?.unwrap_or(-1) == 1;
    ensure!(
        node.get_attr_opt::<i64>("qk_output")?.unwrap_or(0) == 0,
        "GroupQueryAttention {name}: qk_output is not supported by the tract backend"
    );
    for quant in ["k_quant_type", "v_quant_type"] {
        let mode = node
            .get_attr_opt::<String>(quant)?
            .unwrap_or_else(|| "NONE".to_string());
        ensure!(
            mode == "NONE",
            "GroupQueryAttention {name}: {quant}={mode} (quantized KV cache) is not supported by the tract backend"
        );
    }
    // `sliding_window_cache` describes ORT's window-sized shared buffers; the tract backend
    // hands the op only valid rows, so the attribute changes nothing here.

    let mut opt = optional_inputs(node);
    let mut next = || opt.next().flatten();
    let (query, key, value) = (next(), next(), next());
    let (past_key, past_value) = (next(), next());
    let seqlens_k = next();
    let _total_sequence_length = next();
    let (cos, sin) = (next(), next());
    let rejected = [("position_ids", next()), ("attention_bias", next())];
    let head_sink = next();
    let more = [
        ("k_scale", next()),
        ("v_scale", next()),
        ("q_norm_weight", next()),
        ("k_norm_weight", next()),
    ];
    for (input, ix) in rejected.into_iter().chain(more) {
        ensure!(
            ix.is_none(),
            "GroupQueryAttention {name}: the {input} input is not supported by the tract backend"
        );
    }
    ensure!(query == Some(0), "GroupQueryAttention {name}: no query");
    let kv = match (key, value) {
        (Some(k), Some(v)) => Some((k, v)),
        (None, None) => None,
        _ => bail!(
            "GroupQueryAttention {name}: key and value must both be given (or both packed into query)"
        ),
    };
    let past = match (past_key, past_value) {
        (Some(k), Some(v)) => Some((k, v)),
        (None, None) => None,
        _ => bail!("GroupQueryAttention {name}: past_key and past_value must both be given"),
    };
    let seqlens_k =
        seqlens_k.with_context(|| format!("GroupQueryAttention {name}: seqlens_k is required"))?;
    let rotary = match (do_rotary, cos, sin) {
        (true, Some(c), Some(s)) => Some((c, s)),
        (true, _, _) => {
            bail!("GroupQueryAttention {name}: do_rotary=1 needs cos_cache and sin_cache")
        }
        (false, _, _) => None,
    };
    Ok((
        expand(Gqa {
            params: Params {
                num_heads,
                kv_num_heads,
                scale,
                causal,
                interleaved,
                window,
                softcap,
                smooth_softmax,
            },
            kv,
            past,
            seqlens_k,
            rotary,
            head_sink,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone, PartialEq)]
struct Params {
    num_heads: usize,
    kv_num_heads: usize,
    /// 0: 1/sqrt(head size).
    scale: f32,
    causal: bool,
    interleaved: bool,
    /// 0: no window.
    window: usize,
    softcap: f32,
    smooth_softmax: bool,
}

/// The inference-time node: input positions, resolved into a [`GqaOp`] when typed.
#[derive(Debug, Clone)]
struct Gqa {
    params: Params,
    /// Key and value inputs; `None`: packed into the query input (`[B, S, (H + 2 Hkv) * D]`).
    kv: Option<(usize, usize)>,
    past: Option<(usize, usize)>,
    seqlens_k: usize,
    rotary: Option<(usize, usize)>,
    head_sink: Option<usize>,
}

impl Expansion for Gqa {
    fn name(&self) -> StaticName {
        "GroupQueryAttention".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 3)?;
        for o in outputs {
            s.equals(&inputs[0].datum_type, &o.datum_type)?;
        }
        let (h, kvh) = (self.params.num_heads, self.params.kv_num_heads);
        let packed = self.kv.is_none();
        // Head size from the query width: H*D, or (H + 2 Hkv)*D when packed.
        let heads = if packed { h + 2 * kvh } else { h };
        s.equals(&outputs[0].rank, 3)?;
        s.given(&inputs[0].shape, move |s, qs| {
            let d = qs[2].clone() / heads;
            s.equals(&outputs[0].shape[0], qs[0].clone())?;
            s.equals(&outputs[0].shape[1], qs[1].clone())?;
            s.equals(&outputs[0].shape[2], d * h)
        })?;
        // present_key / present_value: [B, Hkv, P + S, D], P = 0 without a past.
        let present = move |s: &mut Solver<'r>, qs: TVec<TDim>, past: TDim| {
            for o in &outputs[1..] {
                let shape = tvec![
                    qs[0].clone(),
                    kvh.to_dim(),
                    past.clone() + qs[1].clone(),
                    qs[2].clone() / heads
                ];
                s.equals(&o.shape, shape)?;
            }
            Ok(())
        };
        match self.past {
            Some((pk, _)) => s.given_2(&inputs[0].shape, &inputs[pk].shape, move |s, qs, ps| {
                present(s, qs, ps[2].clone())
            })?,
            None => s.given(&inputs[0].shape, move |s, qs| present(s, qs, 0.to_dim()))?,
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let q = model.outlet_fact(inputs[0])?.clone();
        ensure!(
            q.datum_type == f32::datum_type() && q.rank() == 3,
            "GroupQueryAttention {prefix}: the tract backend runs f32 [B, S, hidden] queries, got {q:?}"
        );
        let (h, kvh) = (self.params.num_heads, self.params.kv_num_heads);
        let q_width = q.shape[2]
            .to_usize()
            .with_context(|| format!("GroupQueryAttention {prefix}: query width must be static"))?;
        let head_dim = match self.kv {
            Some(_) => q_width / h,
            None => q_width / (h + 2 * kvh),
        };
        let rotary = match self.rotary {
            Some((c, s)) => {
                let half = model.outlet_fact(inputs[c])?.shape[1]
                    .to_usize()
                    .context("GroupQueryAttention: cos_cache width must be static")?;
                ensure!(
                    2 * half <= head_dim,
                    "GroupQueryAttention {prefix}: cos_cache is {half} wide for a head size of {head_dim}"
                );
                Some(Rotary {
                    half,
                    cos: Arc::new(konst_f32_vec(
                        model,
                        inputs[c],
                        "GroupQueryAttention: cos_cache",
                    )?),
                    sin: Arc::new(konst_f32_vec(
                        model,
                        inputs[s],
                        "GroupQueryAttention: sin_cache",
                    )?),
                })
            }
            None => None,
        };
        let sinks = match self.head_sink {
            Some(i) => {
                let v = Arc::new(konst_f32_vec(
                    model,
                    inputs[i],
                    "GroupQueryAttention: head_sink",
                )?);
                ensure!(
                    v.len() == self.params.num_heads,
                    "GroupQueryAttention {prefix}: head_sink has {} values for {} heads",
                    v.len(),
                    self.params.num_heads
                );
                Some(v)
            }
            None => None,
        };
        let op = GqaOp {
            params: self.params.clone(),
            head_dim,
            packed: self.kv.is_none(),
            has_past: self.past.is_some(),
            rotary,
            sinks,
        };
        let mut wired = tvec![inputs[0]];
        if let Some((k, v)) = self.kv {
            wired.push(inputs[k]);
            wired.push(inputs[v]);
        }
        if let Some((pk, pv)) = self.past {
            wired.push(inputs[pk]);
            wired.push(inputs[pv]);
        }
        wired.push(inputs[self.seqlens_k]);
        model.wire_node(prefix, op, &wired)
    }
}

#[derive(Debug, Clone)]
struct Rotary {
    /// Half the rotated width (cos_cache's second dimension).
    half: usize,
    /// `[positions, half]`.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct GqaOp {
    params: Params,
    head_dim: usize,
    /// Q, K and V arrive packed in one input.
    packed: bool,
    has_past: bool,
    rotary: Option<Rotary>,
    sinks: Option<Arc<Vec<f32>>>,
}

impl PartialEq for GqaOp {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Option<Arc<Vec<f32>>>, b: &Option<Arc<Vec<f32>>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.params == other.params
            && self.head_dim == other.head_dim
            && self.packed == other.packed
            && self.has_past == other.has_past
            && same(
                &self.rotary.as_ref().map(|r| r.cos.clone()),
                &other.rotary.as_ref().map(|r| r.cos.clone()),
            )
            && same(&self.sinks, &other.sinks)
    }
}
impl Eq for GqaOp {}

impl GqaOp {
    /// Position of past_key among the op's inputs.
    fn first_past(&self) -> usize {
        if self.packed { 1 } else { 3 }
    }
}

impl Op for GqaOp {
    fn name(&self) -> StaticName {
        "EdgellmGroupQueryAttention".into()
    }
    op_as_typed_op!();
}

impl TypedOp for GqaOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let q = inputs[0];
        let new = q.shape[1].clone();
        let total = if self.has_past {
            inputs[self.first_past()].shape[2].clone() + new
        } else {
            new
        };
        let kv = f32::fact(tvec![
            q.shape[0].clone(),
            self.params.kv_num_heads.to_dim(),
            total,
            self.head_dim.to_dim()
        ]);
        Ok(tvec![
            f32::fact(tvec![
                q.shape[0].clone(),
                q.shape[1].clone(),
                (self.params.num_heads * self.head_dim).to_dim()
            ]),
            kv.clone(),
            kv
        ])
    }
    as_op!();
}

impl EvalOp for GqaOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &self.params;
        let d = self.head_dim;
        let (h, hkv) = (p.num_heads, p.kv_num_heads);
        let q_in = inputs[0].try_as_plain_ram()?;
        let (b, s) = (q_in.shape()[0], q_in.shape()[1]);
        // Row layout: [q | k | v] per token when packed, else three inputs.
        let (k_in, v_in) = if self.packed {
            ensure!(
                q_in.shape()[2] == (h + 2 * hkv) * d,
                "GroupQueryAttention: packed QKV width {} is not ({h} + 2 x {hkv}) x {d}",
                q_in.shape()[2]
            );
            (None, None)
        } else {
            let (k, v) = (inputs[1].try_as_plain_ram()?, inputs[2].try_as_plain_ram()?);
            ensure!(
                q_in.shape()[2] == h * d && k.shape()[2] == hkv * d && v.shape()[2] == hkv * d,
                "GroupQueryAttention: query/key/value widths {:?}/{:?}/{:?} do not match {h}x{d} and {hkv}x{d}",
                q_in.shape(),
                k.shape(),
                v.shape()
            );
            (Some(k), Some(v))
        };
        let past_at = self.first_past();
        let (past_k, past_v, pl) = if self.has_past {
            let pk = inputs[past_at].try_as_plain_ram()?;
            let pv = inputs[past_at + 1].try_as_plain_ram()?;
            ensure!(
                pk.shape() == pv.shape()
                    && pk.shape().len() == 4
                    && pk.shape()[0] == b
                    && pk.shape()[1] == hkv
                    && pk.shape()[3] == d,
                "GroupQueryAttention: past key/value shapes {:?}/{:?} do not match [{b}, {hkv}, P, {d}]",
                pk.shape(),
                pv.shape()
            );
            let pl = pk.shape()[2];
            (Some(pk.as_slice::<f32>()?), Some(pv.as_slice::<f32>()?), pl)
        } else {
            (None, None, 0)
        };
        let seqlens = inputs[past_at + if self.has_past { 2 } else { 0 }].cast_to::<i64>()?;
        let seqlens = seqlens.try_as_plain_ram()?;
        let seqlens = seqlens.as_slice::<i64>()?;
        ensure!(
            seqlens.len() == b,
            "GroupQueryAttention: seqlens_k has {} values for a batch of {b}",
            seqlens.len()
        );
        let q_in = q_in.as_slice::<f32>()?;
        let (k_in, v_in) = match (&k_in, &v_in) {
            (Some(k), Some(v)) => (Some(k.as_slice::<f32>()?), Some(v.as_slice::<f32>()?)),
            _ => (None, None),
        };
        // Per token: where its q, k and v start.
        let width = if self.packed {
            (h + 2 * hkv) * d
        } else {
            h * d
        };
        let q_at = |bs: usize| bs * width;
        let k_row = |bs: usize, g: usize| -> &[f32] {
            match k_in {
                Some(k) => &k[(bs * hkv + g) * d..(bs * hkv + g + 1) * d],
                None => &q_in[bs * width + (h + g) * d..bs * width + (h + g + 1) * d],
            }
        };
        let v_row = |bs: usize, g: usize| -> &[f32] {
            match v_in {
                Some(v) => &v[(bs * hkv + g) * d..(bs * hkv + g + 1) * d],
                None => &q_in[bs * width + (h + hkv + g) * d..bs * width + (h + hkv + g + 1) * d],
            }
        };

        let tl = pl + s;
        let mut out = vec![0f32; b * s * h * d];
        let mut present_k = vec![0f32; b * hkv * tl * d];
        let mut present_v = vec![0f32; b * hkv * tl * d];
        let scale = if p.scale == 0.0 {
            1.0 / (d as f32).sqrt()
        } else {
            p.scale
        };
        let group = h / hkv;
        let mut q = vec![0f32; s * h * d];
        for bi in 0..b {
            let total = seqlens[bi] + 1;
            let first = total - s as i64;
            ensure!(
                first >= pl as i64,
                "GroupQueryAttention: seqlens_k {} leaves no room for {pl} cached and {s} new positions",
                seqlens[bi]
            );
            let first = first as usize;
            // Q (rotated) for this batch entry, [S, H, D].
            for si in 0..s {
                let at = q_at(bi * s + si);
                q[si * h * d..(si + 1) * h * d].copy_from_slice(&q_in[at..at + h * d]);
            }
            if let Some(r) = &self.rotary {
                for si in 0..s {
                    for hi in 0..h {
                        let x = &mut q[(si * h + hi) * d..(si * h + hi + 1) * d];
                        r.apply(x, first + si, p.interleaved)?;
                    }
                }
            }
            // Present K/V: past rows, then this step's (rotated) keys and values.
            for g in 0..hkv {
                let dst = (bi * hkv + g) * tl * d;
                if let (Some(pk), Some(pv)) = (past_k, past_v) {
                    let src = (bi * hkv + g) * pl * d;
                    present_k[dst..dst + pl * d].copy_from_slice(&pk[src..src + pl * d]);
                    present_v[dst..dst + pl * d].copy_from_slice(&pv[src..src + pl * d]);
                }
                for si in 0..s {
                    let row = dst + (pl + si) * d;
                    present_k[row..row + d].copy_from_slice(k_row(bi * s + si, g));
                    present_v[row..row + d].copy_from_slice(v_row(bi * s + si, g));
                    if let Some(r) = &self.rotary {
                        r.apply(&mut present_k[row..row + d], first + si, p.interleaved)?;
                    }
                }
            }
            // Key row j sits at absolute position first - pl + j.
            let base = first - pl;
            let mut scores = vec![0f32; tl];
            for si in 0..s {
                let qpos = first + si;
                // Visible keys: [lo, hi) in rows.
                let hi_row = if p.causal { qpos - base + 1 } else { tl };
                let lo_row = if p.window > 0 {
                    (qpos + 1).saturating_sub(p.window).max(base) - base
                } else {
                    0
                };
                let hi_row = hi_row.min(tl);
                for hi in 0..h {
                    let g = hi / group;
                    let kv0 = (bi * hkv + g) * tl * d;
                    let qv = &q[(si * h + hi) * d..(si * h + hi + 1) * d];
                    let mut max = f32::NEG_INFINITY;
                    for j in lo_row..hi_row {
                        let mut x = scale * dot(qv, &present_k[kv0 + j * d..kv0 + (j + 1) * d]);
                        if p.softcap > 0.0 {
                            x = p.softcap * (x / p.softcap).tanh();
                        }
                        scores[j] = x;
                        max = max.max(x);
                    }
                    let sink = match &self.sinks {
                        Some(sinks) => Some(sinks[hi]),
                        None if p.smooth_softmax => Some(0.0),
                        None => None,
                    };
                    if let Some(sink) = sink {
                        max = max.max(sink);
                    }
                    let mut denom = sink.map_or(0.0, |sink| (sink - max).exp());
                    for x in &mut scores[lo_row..hi_row] {
                        *x = (*x - max).exp();
                        denom += *x;
                    }
                    let o =
                        &mut out[((bi * s + si) * h + hi) * d..((bi * s + si) * h + hi + 1) * d];
                    if denom > 0.0 {
                        let inv = 1.0 / denom;
                        for j in lo_row..hi_row {
                            axpy(
                                o,
                                scores[j] * inv,
                                &present_v[kv0 + j * d..kv0 + (j + 1) * d],
                            );
                        }
                    }
                }
            }
        }
        Ok(tvec![
            output(&[b, s, h * d], out)?,
            output(&[b, hkv, tl, d], present_k)?,
            output(&[b, hkv, tl, d], present_v)?,
        ])
    }
}

impl Rotary {
    /// Rotates the first `2 * half` values of one head vector to position `pos`.
    fn apply(&self, x: &mut [f32], pos: usize, interleaved: bool) -> TractResult<()> {
        let n = self.half;
        let row = pos * n;
        ensure!(
            row + n <= self.cos.len(),
            "GroupQueryAttention: position {pos} is beyond the rotary cache ({} positions)",
            self.cos.len() / n
        );
        let (cos, sin) = (&self.cos[row..row + n], &self.sin[row..row + n]);
        for i in 0..n {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + n)
            };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * cos[i] - x2 * sin[i];
            x[b] = x2 * cos[i] + x1 * sin[i];
        }
        Ok(())
    }
}
