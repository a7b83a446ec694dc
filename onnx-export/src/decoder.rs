//! The decoder graph, in the op set and I/O names of onnxruntime-genai's CPU builds
//! (`shared/reference/ort-genai-gptoss.md` §1.4, §2.3). It reads top to bottom like the model:
//!
//! ```text
//! input_ids -> embedding -> for each layer:
//!     (Skip)SimplifiedLayerNormalization -> qkv MatMulNBits (+bias) [-> q/k RMSNorm]
//!     -> GroupQueryAttention (RoPE caches, past/present KV, local window, head_sink)
//!     -> o_proj -> SkipSimplifiedLayerNormalization
//!     -> MLP (gate/up/down, SiLU) | MoE (router f32 MatMul + QMoE/MoE swiglu)
//! -> final SkipSimplifiedLayerNormalization [-> last position] -> lm_head -> logits
//! ```
//!
//! Tensor contracts: activations are f32 `[batch, seq, features]`; `MatMulNBits` weights are
//! `uint8 [N, K/block, block/2]` with f32 scales `[N, K/block]` (see `quant`); fp32 `MatMul`
//! weights are `[K, N]`; KV buffers are `[batch, kv_heads, capacity, head_dim]`.

use std::ops::Range;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::proto::data_type;
use crate::onnx::{Attr, Dim, GraphBuilder};
use crate::quant;
use crate::rope;
use crate::spec::{Arch, ModelSpec};

const MS: &str = "com.microsoft";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Int4,
    Fp32,
}

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub precision: Precision,
    pub embeddings: Precision,
    pub block: usize,
    /// Keep logits for every position (teacher-forced parity) instead of the last one only.
    pub logits_all: bool,
    /// Rows of the RoPE caches: the longest sequence the package can run.
    pub max_length: usize,
}

/// Rows of one or more checkpoint tensors stacked along N (output features), each `[rows, K]`.
#[derive(Clone, Debug)]
struct Linear {
    parts: Vec<(String, Range<usize>)>,
    k: usize,
}

impl Linear {
    fn whole(ck: &Checkpoint, name: &str, n: usize, k: usize) -> Result<Self> {
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
fn for_each_chunk(
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

fn transpose(rows: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0.0; n * k];
    for (i, row) in rows.chunks_exact(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * n + i] = v;
        }
    }
    t
}

/// HF tensor names of one decoder layer.
struct LayerNames {
    p: String,
}

impl LayerNames {
    fn new(i: usize) -> Self {
        LayerNames {
            p: format!("model.layers.{i}"),
        }
    }
    fn t(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.p)
    }
}

pub struct DecoderBuilder<'a> {
    spec: &'a ModelSpec,
    ck: &'a Checkpoint,
    opts: &'a BuildOptions,
    g: GraphBuilder,
}

impl<'a> DecoderBuilder<'a> {
    pub fn new(
        spec: &'a ModelSpec,
        ck: &'a Checkpoint,
        opts: &'a BuildOptions,
        g: GraphBuilder,
    ) -> Self {
        DecoderBuilder { spec, ck, opts, g }
    }

    pub fn build(mut self) -> Result<GraphBuilder> {
        let s = self.spec;
        self.declare_io();
        // lm_head first when it doubles as the int4 embedding table (tied weights).
        let lm_head = self.lm_head_source()?;
        let share_embedding = s.tie_embeddings
            && self.opts.precision == Precision::Int4
            && self.opts.embeddings == Precision::Int4;
        let lm_head_weights = if share_embedding {
            Some(self.linear_weights("lm_head", &lm_head)?)
        } else {
            None
        };
        let mut x = self.embedding(lm_head_weights.as_ref())?;
        let (seqlens_k, total_len) = self.mask_lengths();
        let (cos, sin) = self.rope_caches()?;

        let mut residual = String::new();
        for i in 0..s.layers {
            let n = LayerNames::new(i);
            let base = format!("/model/layers.{i}");
            let w = self.norm_weight(
                &n.t("input_layernorm.weight"),
                &format!("model.layers.{i}.input_layernorm.weight"),
            )?;
            let normed = if i == 0 {
                residual = x.clone();
                self.g.node(
                    &format!("{base}/input_layernorm/LayerNorm"),
                    "SimplifiedLayerNormalization",
                    "",
                    &[&x, &w],
                    1,
                    &[
                        ("axis", Attr::I(-1)),
                        ("epsilon", Attr::F(s.rms_eps)),
                        ("stash_type", Attr::I(1)),
                    ],
                )
            } else {
                let out = self.skip_norm(
                    &format!("{base}/input_layernorm/SkipLayerNorm"),
                    &x,
                    &residual,
                    &w,
                );
                residual = out[3].clone();
                out
            };
            let attn =
                self.attention(i, &n, &base, &normed[0], &seqlens_k, &total_len, &cos, &sin)?;
            let w = self.norm_weight(
                &n.t("post_attention_layernorm.weight"),
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
            )?;
            let out = self.skip_norm(
                &format!("{base}/post_attention_layernorm/SkipLayerNorm"),
                &attn,
                &residual,
                &w,
            );
            residual = out[3].clone();
            x = if s.moe.is_some() {
                self.moe(i, &n, &base, &out[0])?
            } else {
                self.mlp(i, &n, &base, &out[0])?
            };
        }
        let w = self.norm_weight(
            "model.norm.weight",
            &format!("model.layers.{}.final_norm_layernorm.weight", s.layers),
        )?;
        let out = self.skip_norm(
            "/model/layers.final_norm_layernorm/SkipLayerNorm",
            &x,
            &residual,
            &w,
        );
        let mut h = out[0].clone();
        if !self.opts.logits_all {
            // genai's prune_lm_head: only the last position reaches the lm_head (logits [B,1,V]).
            let starts = self
                .g
                .constant_i64("/model/lm_head/last/starts", &[1], &[-1]);
            let ends = self
                .g
                .constant_i64("/model/lm_head/last/ends", &[1], &[i64::MAX]);
            let axes = self.g.constant_i64("/model/lm_head/last/axes", &[1], &[1]);
            h = self.g.node(
                "/model/lm_head/last/Slice",
                "Slice",
                "",
                &[&h, &starts, &ends, &axes],
                1,
                &[],
            )[0]
            .clone();
        }
        let weights = match lm_head_weights {
            Some(w) => w,
            None => self.linear_weights("lm_head", &lm_head)?,
        };
        self.apply_linear("/model/lm_head", &h, &weights, Some("logits".to_string()));
        Ok(self.g)
    }

    fn declare_io(&mut self) {
        let s = self.spec;
        let batch = Dim::Named("batch_size");
        self.g.input(
            "input_ids",
            data_type::INT64,
            &[batch.clone(), Dim::Named("sequence_length")],
        );
        self.g.input(
            "attention_mask",
            data_type::INT64,
            &[batch.clone(), Dim::Named("total_sequence_length")],
        );
        for i in 0..s.layers {
            let (past, total) = if s.windows[i].is_some() {
                (
                    Dim::Named("past_sliding_length"),
                    Dim::Named("total_sliding_length"),
                )
            } else {
                (
                    Dim::Named("past_sequence_length"),
                    Dim::Named("total_sequence_length"),
                )
            };
            let kv = |len: Dim| {
                vec![
                    batch.clone(),
                    Dim::Fixed(s.kv_heads as i64),
                    len,
                    Dim::Fixed(s.head_dim as i64),
                ]
            };
            for kind in ["key", "value"] {
                self.g.input(
                    &format!("past_key_values.{i}.{kind}"),
                    data_type::FLOAT,
                    &kv(past.clone()),
                );
                self.g.output(
                    &format!("present.{i}.{kind}"),
                    data_type::FLOAT,
                    &kv(total.clone()),
                );
            }
        }
        let seq = if self.opts.logits_all {
            Dim::Named("sequence_length")
        } else {
            Dim::Fixed(1)
        };
        self.g.output(
            "logits",
            data_type::FLOAT,
            &[batch, seq, Dim::Fixed(s.vocab as i64)],
        );
    }

    fn lm_head_source(&self) -> Result<Linear> {
        let s = self.spec;
        let name = if s.tie_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Linear::whole(self.ck, name, s.vocab, s.hidden)
    }

    fn embedding(&mut self, shared_lm_head: Option<&LinearWeights>) -> Result<String> {
        let s = self.spec;
        let (v, h, bs) = (s.vocab, s.hidden, self.opts.block);
        let table = Linear::whole(self.ck, "model.embed_tokens.weight", v, h)?;
        let name = "/model/embed_tokens";
        if self.opts.embeddings == Precision::Fp32 {
            let w = self
                .g
                .tensor::<f32>("model.embed_tokens.weight", &[v, h], |sink| {
                    for_each_chunk(self.ck, &table, |rows| sink.put(rows))
                })?;
            return Ok(self.g.node(
                &format!("{name}/Gather"),
                "Gather",
                "",
                &[&w, "input_ids"],
                1,
                &[],
            )[0]
            .clone());
        }
        if !h.is_multiple_of(bs) {
            return Err(ExportError::InvalidOption(format!(
                "--embeddings int4 needs hidden_size ({h}) to be a multiple of the block size ({bs})"
            )));
        }
        let (data, scales) = match shared_lm_head {
            Some(LinearWeights::Int4 { q, scales, .. }) => {
                let shape = self.g.constant_i64(
                    &format!("{name}/Reshape/shape"),
                    &[2],
                    &[v as i64, (h / 2) as i64],
                );
                let data = self.g.node(
                    &format!("{name}/Reshape"),
                    "Reshape",
                    "",
                    &[q, &shape],
                    1,
                    &[],
                )[0]
                .clone();
                (data, scales.clone())
            }
            _ => {
                let mut all_scales = Vec::with_capacity(v * h / bs);
                let data =
                    self.g
                        .tensor::<u8>("model.embed_tokens.qweight", &[v, h / 2], |sink| {
                            for_each_chunk(self.ck, &table, |rows| {
                                let mut packed = Vec::with_capacity(rows.len() / 2);
                                quant::quantize_rows(rows, h, bs, &mut packed, &mut all_scales);
                                sink.put(&packed)
                            })
                        })?;
                let scales =
                    self.g
                        .tensor_from("model.embed_tokens.scales", &[v, h / bs], &all_scales)?;
                (data, scales)
            }
        };
        Ok(self.g.node(
            &format!("{name}/GatherBlockQuantized"),
            "GatherBlockQuantized",
            MS,
            &[&data, "input_ids", &scales],
            1,
            &[
                ("bits", Attr::I(4)),
                ("block_size", Attr::I(bs as i64)),
                ("gather_axis", Attr::I(0)),
                ("quantize_axis", Attr::I(1)),
            ],
        )[0]
        .clone())
    }

    /// `seqlens_k = ReduceSum(mask) - 1` (int32 [B]) and `total_sequence_length` (int32 scalar),
    /// computed once in-graph exactly as genai's builder does.
    fn mask_lengths(&mut self) -> (String, String) {
        let g = &mut self.g;
        let p = "/model/attn_mask_reformat/attn_mask_subgraph";
        let axes = g.constant_i64(&format!("{p}/ReduceSum/axes"), &[1], &[1]);
        let sum = g.node(
            &format!("{p}/ReduceSum"),
            "ReduceSum",
            "",
            &["attention_mask", &axes],
            1,
            &[("keepdims", Attr::I(0))],
        );
        let one = g.constant_i64(&format!("{p}/Sub/one"), &[], &[1]);
        let sub = g.node(&format!("{p}/Sub"), "Sub", "", &[&sum[0], &one], 1, &[]);
        let seqlens = g.node(
            &format!("{p}/Sub/Cast"),
            "Cast",
            "",
            &[&sub[0]],
            1,
            &[("to", Attr::I(data_type::INT32 as i64))],
        );
        let shape = g.node(
            &format!("{p}/Shape"),
            "Shape",
            "",
            &["attention_mask"],
            1,
            &[],
        );
        let idx = g.constant_i64(&format!("{p}/Gather/index"), &[], &[1]);
        let total = g.node(
            &format!("{p}/Gather"),
            "Gather",
            "",
            &[&shape[0], &idx],
            1,
            &[("axis", Attr::I(0))],
        );
        let total = g.node(
            &format!("{p}/Gather/Cast"),
            "Cast",
            "",
            &[&total[0]],
            1,
            &[("to", Attr::I(data_type::INT32 as i64))],
        );
        (seqlens[0].clone(), total[0].clone())
    }

    fn rope_caches(&mut self) -> Result<(String, String)> {
        let (cos, sin) = rope::caches(&self.spec.rope, self.opts.max_length);
        let dims = [self.opts.max_length, self.spec.rope.dim / 2];
        Ok((
            self.g.tensor_from("cos_cache", &dims, &cos)?,
            self.g.tensor_from("sin_cache", &dims, &sin)?,
        ))
    }

    fn norm_weight(&mut self, hf: &str, onnx: &str) -> Result<String> {
        self.matrix_f32(hf, onnx, &[self.spec.hidden])
    }

    fn skip_norm(&mut self, name: &str, x: &str, skip: &str, w: &str) -> Vec<String> {
        self.g.node(
            name,
            "SkipSimplifiedLayerNormalization",
            MS,
            &[x, skip, w],
            4,
            &[("epsilon", Attr::F(self.spec.rms_eps))],
        )
    }

    /// Optional bias: the concatenation of `names` (each `[len]`), present all or none.
    fn bias(&mut self, onnx: &str, names: &[(String, usize)]) -> Result<Option<String>> {
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
    fn matrix_f32(&mut self, hf: &str, onnx: &str, dims: &[usize]) -> Result<String> {
        self.ck.expect(hf, dims)?;
        let w = self.ck.f32(hf)?;
        self.g.tensor_from(onnx, dims, &w)
    }

    /// Writes a linear layer's weights (int4 blocks + scales, or a transposed f32 matrix).
    fn linear_weights(&mut self, prefix: &str, lin: &Linear) -> Result<LinearWeights> {
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

    fn apply_linear(
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
    fn linear(
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

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        i: usize,
        n: &LayerNames,
        base: &str,
        x: &str,
        seqlens_k: &str,
        total_len: &str,
        cos: &str,
        sin: &str,
    ) -> Result<String> {
        let s = self.spec;
        let (h, qd, kvd, d) = (s.hidden, s.q_dim(), s.kv_dim(), s.head_dim);
        let prefix = format!("model.layers.{i}.attn");
        let qkv_lin = if s.arch == Arch::Phi3 {
            let name = n.t("self_attn.qkv_proj.weight");
            self.ck.expect(&name, &[qd + 2 * kvd, h])?;
            Linear {
                parts: vec![(name, 0..qd + 2 * kvd)],
                k: h,
            }
        } else {
            let mut parts = Vec::new();
            for (proj, rows) in [("q", qd), ("k", kvd), ("v", kvd)] {
                let name = n.t(&format!("self_attn.{proj}_proj.weight"));
                self.ck.expect(&name, &[rows, h])?;
                parts.push((name, 0..rows));
            }
            Linear { parts, k: h }
        };
        let bias = self.bias(
            &format!("{prefix}.qkv_proj.Add.bias"),
            &[
                (n.t("self_attn.q_proj.bias"), qd),
                (n.t("self_attn.k_proj.bias"), kvd),
                (n.t("self_attn.v_proj.bias"), kvd),
            ],
        )?;
        let qkv = self.linear(
            &format!("{base}/attn/qkv_proj"),
            &format!("{prefix}.qkv_proj"),
            x,
            &qkv_lin,
            bias,
        )?;

        // Qwen3: per-head RMSNorm of q and k before RoPE (on CPU the genai builder keeps it as
        // Split -> Reshape -> SimplifiedLayerNormalization -> Reshape).
        let (q, k, v) = if s.arch == Arch::Qwen3 {
            let split = self.g.constant_i64(
                &format!("{base}/attn/qkv/split"),
                &[3],
                &[qd as i64, kvd as i64, kvd as i64],
            );
            let parts = self.g.node(
                &format!("{base}/attn/qkv/Split"),
                "Split",
                "",
                &[&qkv, &split],
                3,
                &[("axis", Attr::I(-1))],
            );
            let mut normed = Vec::new();
            for (which, src, heads) in [("q", &parts[0], s.heads), ("k", &parts[1], s.kv_heads)] {
                let hf = n.t(&format!("self_attn.{which}_norm.weight"));
                self.ck.expect(&hf, &[d])?;
                let w = self.ck.f32(&hf)?;
                let w = self
                    .g
                    .tensor_from(&format!("{prefix}.{which}_norm.weight"), &[d], &w)?;
                let nb = format!("{base}/attn/{which}_norm");
                let to_heads = self.g.constant_i64(
                    &format!("{nb}/Reshape_1/shape"),
                    &[4],
                    &[0, 0, heads as i64, d as i64],
                );
                let back = self.g.constant_i64(
                    &format!("{nb}/Reshape_2/shape"),
                    &[3],
                    &[0, 0, (heads * d) as i64],
                );
                let r = self.g.node(
                    &format!("{nb}/Reshape_1"),
                    "Reshape",
                    "",
                    &[src, &to_heads],
                    1,
                    &[],
                );
                let ln = self.g.node(
                    &format!("{nb}/SimplifiedLayerNormalization"),
                    "SimplifiedLayerNormalization",
                    "",
                    &[&r[0], &w],
                    1,
                    &[
                        ("axis", Attr::I(-1)),
                        ("epsilon", Attr::F(s.rms_eps)),
                        ("stash_type", Attr::I(1)),
                    ],
                );
                normed.push(
                    self.g.node(
                        &format!("{nb}/Reshape_2"),
                        "Reshape",
                        "",
                        &[&ln[0], &back],
                        1,
                        &[],
                    )[0]
                    .clone(),
                );
            }
            (normed[0].clone(), normed[1].clone(), parts[2].clone())
        } else {
            (qkv, String::new(), String::new())
        };

        let sinks = if s.arch == Arch::GptOss {
            let hf = n.t("self_attn.sinks");
            self.ck.expect(&hf, &[s.heads])?;
            let w = self.ck.f32(&hf)?;
            self.g
                .tensor_from(&format!("{prefix}.sinks"), &[s.heads], &w)?
        } else {
            String::new()
        };
        let past_k = format!("past_key_values.{i}.key");
        let past_v = format!("past_key_values.{i}.value");
        let mut attrs = vec![
            ("num_heads", Attr::I(s.heads as i64)),
            ("kv_num_heads", Attr::I(s.kv_heads as i64)),
            ("scale", Attr::F(1.0 / (d as f32).sqrt())),
            (
                "local_window_size",
                Attr::I(s.windows[i].map_or(-1, |w| w as i64)),
            ),
            ("softcap", Attr::F(0.0)),
            ("do_rotary", Attr::I(1)),
            ("rotary_interleaved", Attr::I(0)),
        ];
        if s.windows[i].is_some() {
            // Window-sized KV buffers (capacity W + slack), evicted inside the op: the
            // contract genai >= 0.16 runs and our backend allocates (DESIGN.md, KV cache).
            attrs.push(("sliding_window_cache", Attr::I(1)));
        }
        let mut inputs: Vec<&str> =
            vec![&q, &k, &v, &past_k, &past_v, seqlens_k, total_len, cos, sin];
        if !sinks.is_empty() {
            inputs.extend(["", "", &sinks]);
        }
        let out = format!("{base}/attn/GroupQueryAttention/output_0");
        self.g.node_named(
            &format!("{base}/attn/GroupQueryAttention"),
            "GroupQueryAttention",
            MS,
            &inputs,
            &[
                out.clone(),
                format!("present.{i}.key"),
                format!("present.{i}.value"),
            ],
            &attrs,
        );
        let o_lin = Linear::whole(self.ck, &n.t("self_attn.o_proj.weight"), h, qd)?;
        let o_bias = self.bias(
            &format!("{prefix}.o_proj.Add.bias"),
            &[(n.t("self_attn.o_proj.bias"), h)],
        )?;
        self.linear(
            &format!("{base}/attn/o_proj"),
            &format!("{prefix}.o_proj"),
            &out,
            &o_lin,
            o_bias,
        )
    }

    fn mlp(&mut self, i: usize, n: &LayerNames, base: &str, x: &str) -> Result<String> {
        let s = self.spec;
        let (h, inter) = (s.hidden, s.intermediate);
        let (gate, up) = if s.arch == Arch::Phi3 {
            // Phi-3 fuses gate and up as rows [0, I) and [I, 2I) of one tensor.
            let name = n.t("mlp.gate_up_proj.weight");
            self.ck.expect(&name, &[2 * inter, h])?;
            (
                Linear {
                    parts: vec![(name.clone(), 0..inter)],
                    k: h,
                },
                Linear {
                    parts: vec![(name, inter..2 * inter)],
                    k: h,
                },
            )
        } else {
            (
                Linear::whole(self.ck, &n.t("mlp.gate_proj.weight"), inter, h)?,
                Linear::whole(self.ck, &n.t("mlp.up_proj.weight"), inter, h)?,
            )
        };
        let prefix = format!("model.layers.{i}.mlp");
        let g = self.linear(
            &format!("{base}/mlp/gate_proj"),
            &format!("{prefix}.gate_proj"),
            x,
            &gate,
            None,
        )?;
        let u = self.linear(
            &format!("{base}/mlp/up_proj"),
            &format!("{prefix}.up_proj"),
            x,
            &up,
            None,
        )?;
        let sig = self.g.node(
            &format!("{base}/mlp/act_fn/Sigmoid"),
            "Sigmoid",
            "",
            &[&g],
            1,
            &[],
        );
        let act = self.g.node(
            &format!("{base}/mlp/act_fn/Mul"),
            "Mul",
            "",
            &[&g, &sig[0]],
            1,
            &[],
        );
        let prod = self.g.node(
            &format!("{base}/mlp/Mul"),
            "Mul",
            "",
            &[&act[0], &u],
            1,
            &[],
        );
        let down = Linear::whole(self.ck, &n.t("mlp.down_proj.weight"), h, inter)?;
        self.linear(
            &format!("{base}/mlp/down_proj"),
            &format!("{prefix}.down_proj"),
            &prod[0],
            &down,
            None,
        )
    }

    /// gpt-oss MoE: an f32 router (kept above int4 precision: it is tiny and routing is
    /// sensitive to it), then QMoE (int4) or MoE (fp32) with the clamped SwiGLU
    /// `min(g, L) * sigmoid(alpha * min(g, L)) * (clamp(u, -L, L) + 1)`, gate/up interleaved.
    fn moe(&mut self, i: usize, n: &LayerNames, base: &str, x: &str) -> Result<String> {
        let s = self.spec;
        let moe = s.moe.as_ref().expect("moe() is only called for MoE specs");
        let (h, inter, e) = (s.hidden, s.intermediate, moe.experts);
        let prefix = format!("model.layers.{i}.moe");
        let router_name = n.t("mlp.router.weight");
        self.ck.expect(&router_name, &[e, h])?;
        let router_w = transpose(&self.ck.f32(&router_name)?, e, h);
        let router_w = self.g.tensor_from(
            &format!("{prefix}.router.MatMul.weight"),
            &[h, e],
            &router_w,
        )?;
        let logits = self.g.node(
            &format!("{base}/moe/router/MatMul"),
            "MatMul",
            "",
            &[x, &router_w],
            1,
            &[],
        );
        let rb = self
            .bias(
                &format!("{prefix}.router.Add.bias"),
                &[(n.t("mlp.router.bias"), e)],
            )?
            .ok_or_else(|| ExportError::MissingTensor {
                name: n.t("mlp.router.bias"),
            })?;
        let logits = self.g.node(
            &format!("{base}/moe/router/Add"),
            "Add",
            "",
            &[&logits[0], &rb],
            1,
            &[],
        );
        let shape = self.g.constant_i64(
            &format!("{base}/moe/router/Reshape/shape"),
            &[2],
            &[-1, e as i64],
        );
        let logits = self.g.node(
            &format!("{base}/moe/router/Reshape"),
            "Reshape",
            "",
            &[&logits[0], &shape],
            1,
            &[],
        );

        let experts = Experts::find(self.ck, n, e, h, inter)?;
        let fc1 = self.expert_weights(
            &format!("{prefix}.experts.gate_up_proj"),
            &experts,
            Proj::GateUp,
            2 * inter,
            h,
        )?;
        let b1 = self.matrix_f32(
            &n.t("mlp.experts.gate_up_proj_bias"),
            &format!("{prefix}.experts.gate_up_proj.bias"),
            &[e, 2 * inter],
        )?;
        let fc2 = self.expert_weights(
            &format!("{prefix}.experts.down_proj"),
            &experts,
            Proj::Down,
            h,
            inter,
        )?;
        let b2 = self.matrix_f32(
            &n.t("mlp.experts.down_proj_bias"),
            &format!("{prefix}.experts.down_proj.bias"),
            &[e, h],
        )?;
        let mut attrs = vec![
            ("k", Attr::I(moe.top_k as i64)),
            ("activation_type", Attr::S("swiglu")),
            ("activation_alpha", Attr::F(moe.swiglu_alpha)),
            ("activation_beta", Attr::F(1.0)),
            ("swiglu_limit", Attr::F(moe.swiglu_limit)),
            ("swiglu_fusion", Attr::I(1)),
            ("normalize_routing_weights", Attr::I(1)),
            ("use_sparse_mixer", Attr::I(0)),
        ];
        let (op, inputs): (&str, Vec<&str>) = match (&fc1, &fc2) {
            (
                ExpertWeights::Int4 { q: q1, scales: s1 },
                ExpertWeights::Int4 { q: q2, scales: s2 },
            ) => {
                attrs.extend([
                    ("expert_weight_bits", Attr::I(4)),
                    ("block_size", Attr::I(self.opts.block as i64)),
                    ("accuracy_level", Attr::I(4)),
                ]);
                ("QMoE", vec![x, &logits[0], q1, s1, &b1, q2, s2, &b2])
            }
            (ExpertWeights::Fp32 { w: w1 }, ExpertWeights::Fp32 { w: w2 }) => {
                ("MoE", vec![x, &logits[0], w1, &b1, w2, &b2])
            }
            _ => unreachable!("both expert projections use the same precision"),
        };
        Ok(self
            .g
            .node(&format!("{base}/moe/{op}"), op, MS, &inputs, 1, &attrs)[0]
            .clone())
    }

    /// Expert matrices `[E, N, K]` (row-major per expert), as int4 `[E, N, K/2]` + scales
    /// `[E, N, K/block]`, or f32 `[E, N, K]`. Streams one expert at a time.
    fn expert_weights(
        &mut self,
        prefix: &str,
        experts: &Experts,
        proj: Proj,
        n: usize,
        k: usize,
    ) -> Result<ExpertWeights> {
        let (e, bs) = (experts.count, self.opts.block);
        let ck = self.ck;
        match self.opts.precision {
            Precision::Int4 => {
                if !k.is_multiple_of(bs) {
                    return Err(ExportError::InvalidOption(format!(
                        "QMoE needs the expert input size ({k}) to be a multiple of the block size ({bs})"
                    )));
                }
                let mut scales = Vec::with_capacity(e * n * k / bs);
                let q =
                    self.g
                        .tensor::<u8>(&format!("{prefix}.qweight"), &[e, n, k / 2], |sink| {
                            for x in 0..e {
                                let m = experts.matrix(ck, proj, x, n, k)?;
                                let mut packed = Vec::with_capacity(m.len() / 2);
                                quant::quantize_rows(&m, k, bs, &mut packed, &mut scales);
                                sink.put(&packed)?;
                            }
                            Ok(())
                        })?;
                let scales =
                    self.g
                        .tensor_from(&format!("{prefix}.scales"), &[e, n, k / bs], &scales)?;
                Ok(ExpertWeights::Int4 { q, scales })
            }
            Precision::Fp32 => {
                let w = self
                    .g
                    .tensor::<f32>(&format!("{prefix}.weight"), &[e, n, k], |sink| {
                        for x in 0..e {
                            sink.put(&experts.matrix(ck, proj, x, n, k)?)?;
                        }
                        Ok(())
                    })?;
                Ok(ExpertWeights::Fp32 { w })
            }
        }
    }
}

enum LinearWeights {
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

enum ExpertWeights {
    Int4 { q: String, scales: String },
    Fp32 { w: String },
}

#[derive(Clone, Copy)]
enum Proj {
    GateUp,
    Down,
}

/// Where a gpt-oss layer keeps its experts: the released MXFP4 `*_blocks`/`*_scales` tensors
/// (`[E, N, K/32, 16]` / `[E, N, K/32]`), or the dense tensors transformers saves after
/// fine-tuning (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, i.e. `[E, K, N]`).
struct Experts {
    count: usize,
    gate_up: String,
    down: String,
    mxfp4: bool,
}

impl Experts {
    fn find(ck: &Checkpoint, n: &LayerNames, e: usize, h: usize, inter: usize) -> Result<Self> {
        let blocks = n.t("mlp.experts.gate_up_proj_blocks");
        if ck.contains(&blocks) {
            ck.expect(&blocks, &[e, 2 * inter, h / 32, 16])?;
            ck.expect(
                &n.t("mlp.experts.gate_up_proj_scales"),
                &[e, 2 * inter, h / 32],
            )?;
            ck.expect(
                &n.t("mlp.experts.down_proj_blocks"),
                &[e, h, inter / 32, 16],
            )?;
            ck.expect(&n.t("mlp.experts.down_proj_scales"), &[e, h, inter / 32])?;
            return Ok(Experts {
                count: e,
                gate_up: n.t("mlp.experts.gate_up_proj"),
                down: n.t("mlp.experts.down_proj"),
                mxfp4: true,
            });
        }
        let dense = n.t("mlp.experts.gate_up_proj");
        if !ck.contains(&dense) {
            return Err(ExportError::MissingTensor {
                name: format!("{blocks} (MXFP4) or {dense} (dense)"),
            });
        }
        ck.expect(&dense, &[e, h, 2 * inter])?;
        ck.expect(&n.t("mlp.experts.down_proj"), &[e, inter, h])?;
        Ok(Experts {
            count: e,
            gate_up: dense,
            down: n.t("mlp.experts.down_proj"),
            mxfp4: false,
        })
    }

    /// Expert `x`'s matrix as row-major `[n, k]` f32.
    fn matrix(
        &self,
        ck: &Checkpoint,
        proj: Proj,
        x: usize,
        n: usize,
        k: usize,
    ) -> Result<Vec<f32>> {
        let base = match proj {
            Proj::GateUp => &self.gate_up,
            Proj::Down => &self.down,
        };
        if self.mxfp4 {
            let blocks = ck.bytes(&format!("{base}_blocks"))?;
            let scales = ck.bytes(&format!("{base}_scales"))?;
            let (bl, sl) = (n * k / 2, n * k / 32);
            Ok(quant::decode_mxfp4(
                &blocks[x * bl..(x + 1) * bl],
                &scales[x * sl..(x + 1) * sl],
                n,
                k,
            ))
        } else {
            // Stored [E, K, N]: rows x*K..(x+1)*K hold expert x, transposed to [N, K].
            Ok(transpose(&ck.f32_rows(base, x..x + 1)?, k, n))
        }
    }
}
