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
//!
//! Files: this one (inputs/outputs, embedding, norms, RoPE caches, the layer loop),
//! `linear.rs` (weights of linear layers), `attention.rs`, `ffn.rs` (MLP and MoE).

mod attention;
mod ffn;
mod linear;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::proto::data_type;
use crate::onnx::{Attr, Dim, GraphBuilder};
use crate::quant;
use crate::rope;
use crate::spec::ModelSpec;

const MS: &str = "com.microsoft";

use linear::{Linear, LinearWeights, for_each_chunk};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Int4,
    /// 8-bit blocks (`--embeddings int8`: the embedding table and the lm_head).
    Int8,
    Fp32,
}

impl Precision {
    /// Bits of a block precision (`None` for fp32).
    pub fn bits(self) -> Option<u8> {
        match self {
            Precision::Int4 => Some(4),
            Precision::Int8 => Some(8),
            Precision::Fp32 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Int4 => "int4",
            Precision::Int8 => "int8",
            Precision::Fp32 => "fp32",
        }
    }
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
    /// How float weights are quantized (`--quant`).
    pub quant: crate::quant::Scheme,
    /// `MatMulNBits` `accuracy_level`: 4 quantizes activations to int8 (fast, the default), 0
    /// keeps them f32 (reference comparisons).
    pub accuracy_level: i64,
    /// Keep GGUF blocks in their exact `MatMulNBits` / `GatherBlockQuantized` form.
    pub native: bool,
    /// Dequantize and re-quantize GGUF tensors that have no exact form (else an error).
    pub allow_requantize: bool,
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
    /// Activation tensor -> its per-32 block sums (offset terms of GGUF types, `linear`).
    block_sums: std::collections::HashMap<String, String>,
}

impl<'a> DecoderBuilder<'a> {
    pub fn new(
        spec: &'a ModelSpec,
        ck: &'a Checkpoint,
        opts: &'a BuildOptions,
        g: GraphBuilder,
    ) -> Self {
        DecoderBuilder {
            spec,
            ck,
            opts,
            g,
            block_sums: Default::default(),
        }
    }

    pub fn build(mut self) -> Result<GraphBuilder> {
        let s = self.spec;
        self.declare_io();
        // lm_head first when it doubles as the int4 embedding table (tied weights).
        let lm_head = self.lm_head_source()?;
        let native_table = self.native_embedding();
        let share_embedding = s.tied()
            && self.opts.precision != Precision::Fp32
            && (self.opts.embeddings != Precision::Fp32 || native_table);
        let lm_head_weights = if share_embedding {
            Some(self.lm_head_weights(&lm_head, true)?)
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
            None => self.lm_head_weights(&lm_head, false)?,
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
        let name = if s.tied() {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Linear::whole(self.ck, name, s.vocab, s.hidden)
    }

    /// The lm_head: 8 bits with `--embeddings int8`; symmetric when it doubles as the embedding
    /// table (`GatherBlockQuantized` is given no zero points).
    fn lm_head_weights(&mut self, lin: &Linear, shared: bool) -> Result<LinearWeights> {
        let o = self.opts;
        let bits = match (o.embeddings, o.precision) {
            (_, Precision::Fp32) => return self.linear_weights("lm_head", lin),
            (Precision::Int8, _) => 8,
            (Precision::Int4, _) if shared => 4,
            (_, p) => p.bits().unwrap_or(4),
        };
        // GatherBlockQuantized is given no zero points: a shared table is never `asym`.
        let scheme = match o.quant {
            crate::quant::Scheme::Asym if shared => crate::quant::Scheme::Mse,
            q => q,
        };
        self.linear_weights_as("lm_head", lin, bits, scheme)
    }

    /// Whether the embedding table is GGUF blocks kept in their exact form.
    fn native_embedding(&self) -> bool {
        self.opts.native
            && self.opts.precision != Precision::Fp32
            && self
                .ck
                .ggml_type("model.embed_tokens.weight")
                .is_some_and(|t| t.nbits().is_some())
    }

    fn embedding(&mut self, shared_lm_head: Option<&LinearWeights>) -> Result<String> {
        let s = self.spec;
        let (v, h, bs) = (s.vocab, s.hidden, self.opts.block);
        let table = Linear::whole(self.ck, "model.embed_tokens.weight", v, h)?;
        let name = "/model/embed_tokens";
        if self.native_embedding() {
            let own;
            let w = match shared_lm_head {
                Some(w) => w,
                None => {
                    own = self.linear_weights("model.embed_tokens", &table)?;
                    &own
                }
            };
            return Ok(self.gather_nbits(name, w, v, h));
        }
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
                "--embeddings {} needs hidden_size ({h}) to be a multiple of the block size ({bs})",
                self.opts.embeddings.name()
            )));
        }
        let w = match shared_lm_head {
            Some(w) => w,
            None => {
                let bits = self.opts.embeddings.bits().unwrap_or(4);
                let scheme = match self.opts.quant {
                    quant::Scheme::Asym => quant::Scheme::Mse,
                    q => q,
                };
                &self.linear_weights_as("model.embed_tokens", &table, bits, scheme)?
            }
        };
        Ok(self.gather_nbits(name, w, v, h))
    }

    /// Embedding rows gathered from `MatMulNBits` weights `[v, h/block, blob]` (shared with a
    /// tied lm_head): `GatherBlockQuantized` over the same bytes seen as `[v, h*bits/8]` (its
    /// default zero points, 8 for 4 bits and 128 for 8 bits, are `MatMulNBits`' too), plus the
    /// per-block offsets (GGUF types that have them, `--quant offset`), gathered from the
    /// `[h/offset_block, v]` table.
    fn gather_nbits(&mut self, name: &str, w: &LinearWeights, v: usize, h: usize) -> String {
        let LinearWeights::NBits {
            q,
            scales,
            bits,
            block,
            offsets,
            offset_block: ob,
            zero_points: None,
            ..
        } = w
        else {
            unreachable!("gather_nbits is only called with symmetric block weights")
        };
        let shape = self.g.constant_i64(
            &format!("{name}/Reshape/shape"),
            &[2],
            &[v as i64, (h * *bits as usize / 8) as i64],
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
        let x = self.g.node(
            &format!("{name}/GatherBlockQuantized"),
            "GatherBlockQuantized",
            MS,
            &[&data, "input_ids", scales],
            1,
            &[
                ("bits", Attr::I(*bits as i64)),
                ("block_size", Attr::I(*block as i64)),
                ("gather_axis", Attr::I(0)),
                ("quantize_axis", Attr::I(1)),
            ],
        )[0]
        .clone();
        let Some(offsets) = offsets else {
            return x;
        };
        // [h/ob, v] gathered on axis 1 -> [h/ob, B, S] -> [B, S, h/ob, 1], added to x seen
        // as [B, S, h/ob, ob].
        let p = format!("{name}/Offset");
        let g = self.g.node(
            &format!("{p}/Gather"),
            "Gather",
            "",
            &[offsets, "input_ids"],
            1,
            &[("axis", Attr::I(1))],
        );
        let t = self.g.node(
            &format!("{p}/Transpose"),
            "Transpose",
            "",
            &[&g[0]],
            1,
            &[("perm", Attr::Ints(vec![1, 2, 0]))],
        );
        let axes = self
            .g
            .constant_i64(&format!("{p}/Unsqueeze/axes"), &[1], &[-1]);
        let u = self.g.node(
            &format!("{p}/Unsqueeze"),
            "Unsqueeze",
            "",
            &[&t[0], &axes],
            1,
            &[],
        );
        let split = self.g.constant_i64(
            &format!("{p}/blocks"),
            &[4],
            &[0, 0, (h / ob) as i64, *ob as i64],
        );
        let xb = self.g.node(
            &format!("{p}/Reshape"),
            "Reshape",
            "",
            &[&x, &split],
            1,
            &[],
        );
        let sum = self
            .g
            .node(&format!("{p}/Add"), "Add", "", &[&xb[0], &u[0]], 1, &[]);
        let back = self
            .g
            .constant_i64(&format!("{p}/shape"), &[3], &[0, 0, h as i64]);
        self.g.node(
            &format!("{p}/Reshape_1"),
            "Reshape",
            "",
            &[&sum[0], &back],
            1,
            &[],
        )[0]
        .clone()
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
}
