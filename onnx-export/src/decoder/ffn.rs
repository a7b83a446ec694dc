//! The feed-forward half of a layer: the dense SiLU-gated MLP, or gpt-oss's mixture of
//! experts (f32 router, QMoE/MoE with the clamped SwiGLU), with experts read from either the
//! released MXFP4 layout or transformers' dense layout.

use super::linear::{Linear, transpose};
use super::{DecoderBuilder, LayerNames, MS, Precision};
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::Attr;
use crate::quant;
use crate::spec::Arch;

impl DecoderBuilder<'_> {
    pub(super) fn mlp(&mut self, i: usize, n: &LayerNames, base: &str, x: &str) -> Result<String> {
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
        // gate and up read the same input: one product over both (stacked along N), then a
        // Split, saves a kernel launch (and, for offset blocks, a second offset product) per
        // layer.
        let gate_up = Linear {
            parts: gate.parts.into_iter().chain(up.parts).collect(),
            k: h,
        };
        let gu = self.linear(
            &format!("{base}/mlp/gate_up_proj"),
            &format!("{prefix}.gate_up_proj"),
            x,
            &gate_up,
            None,
        )?;
        let split = self.g.constant_i64(
            &format!("{base}/mlp/gate_up/split"),
            &[2],
            &[inter as i64, inter as i64],
        );
        let parts = self.g.node(
            &format!("{base}/mlp/gate_up/Split"),
            "Split",
            "",
            &[&gu, &split],
            2,
            &[("axis", Attr::I(-1))],
        );
        let (g, u) = (parts[0].clone(), parts[1].clone());
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
    pub(super) fn moe(&mut self, i: usize, n: &LayerNames, base: &str, x: &str) -> Result<String> {
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
        let inexact = experts.gguf_block_tensors(self.ck);
        if self.opts.precision != Precision::Fp32
            && !inexact.is_empty()
            && !self.opts.allow_requantize
        {
            return Err(ExportError::InvalidOption(format!(
                "{}: QMoE takes int4 blocks, which these experts cannot be kept in exactly; pass \
                 --allow-requantize to dequantize and re-quantize them (as the Hugging Face path \
                 does with gpt-oss's MXFP4 experts), or --precision fp32",
                inexact.join(", ")
            )));
        }
        let fc1 = self.expert_weights(
            &format!("{prefix}.experts.gate_up_proj"),
            &experts,
            Proj::GateUp,
            2 * inter,
            h,
        )?;
        let b1 = if experts.layout == ExpertLayout::Split {
            // GGUF: separate gate and up biases [E, I], interleaved like the weights' rows.
            let (gate, up) = (
                n.t("mlp.experts.gate_exps_bias"),
                n.t("mlp.experts.up_exps_bias"),
            );
            self.ck.expect(&gate, &[e, inter])?;
            self.ck.expect(&up, &[e, inter])?;
            let (gate, up) = (self.ck.f32(&gate)?, self.ck.f32(&up)?);
            let both: Vec<f32> = gate.iter().zip(&up).flat_map(|(&g, &u)| [g, u]).collect();
            self.g.tensor_from(
                &format!("{prefix}.experts.gate_up_proj.bias"),
                &[e, 2 * inter],
                &both,
            )?
        } else {
            self.matrix_f32(
                &n.t("mlp.experts.gate_up_proj_bias"),
                &format!("{prefix}.experts.gate_up_proj.bias"),
                &[e, 2 * inter],
            )?
        };
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
            // --precision int8 is refused before the export starts.
            Precision::Int4 | Precision::Int8 => {
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

enum ExpertWeights {
    Int4 { q: String, scales: String },
    Fp32 { w: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proj {
    GateUp,
    Down,
}

/// Where a gpt-oss layer keeps its experts: the released MXFP4 `*_blocks`/`*_scales` tensors
/// (`[E, N, K/32, 16]` / `[E, N, K/32]`), the dense tensors transformers saves after
/// fine-tuning (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, i.e. `[E, K, N]`), or a GGUF
/// file's separate gate / up / down tensors (`[E, N, K]`, any type the checkpoint
/// dequantizes, MXFP4 included), whose gate and up rows are interleaved here into transformers'
/// `gate_up` order (row 2i gate i, row 2i+1 up i).
struct Experts {
    count: usize,
    gate_up: String,
    down: String,
    layout: ExpertLayout,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExpertLayout {
    Mxfp4,
    Dense,
    /// GGUF: `gate_up` names the gate tensor, `up` the up tensor.
    Split,
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
                layout: ExpertLayout::Mxfp4,
            });
        }
        let gate = n.t("mlp.experts.gate_exps");
        if ck.contains(&gate) {
            ck.expect(&gate, &[e, inter, h])?;
            ck.expect(&n.t("mlp.experts.up_exps"), &[e, inter, h])?;
            ck.expect(&n.t("mlp.experts.down_exps"), &[e, h, inter])?;
            return Ok(Experts {
                count: e,
                gate_up: gate,
                down: n.t("mlp.experts.down_exps"),
                layout: ExpertLayout::Split,
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
            layout: ExpertLayout::Dense,
        })
    }

    /// The GGUF tensors that hold the experts in a block type (re-quantizing those to int4 is
    /// not exact, so it needs `--allow-requantize`).
    fn gguf_block_tensors(&self, ck: &Checkpoint) -> Vec<String> {
        if self.layout != ExpertLayout::Split {
            return Vec::new();
        }
        [self.gate_up.clone(), self.up(), self.down.clone()]
            .into_iter()
            .filter_map(|t| match ck.ggml_type(&t) {
                // Named as in the file: model.layers.L.mlp.experts.X_exps -> blk.L.ffn_X_exps.weight
                Some(ty) if !ty.is_float() => Some(format!(
                    "{}.weight ({ty:?})",
                    t.replace("model.layers.", "blk.")
                        .replace(".mlp.experts.", ".ffn_")
                )),
                _ => None,
            })
            .collect()
    }

    fn up(&self) -> String {
        self.gate_up.replace(".gate_exps", ".up_exps")
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
        if self.layout == ExpertLayout::Mxfp4 {
            let (bl, sl) = (n * k / 2, n * k / 32);
            let blocks = ck.bytes(&format!("{base}_blocks"), x * bl..(x + 1) * bl)?;
            let scales = ck.bytes(&format!("{base}_scales"), x * sl..(x + 1) * sl)?;
            Ok(quant::decode_mxfp4(&blocks, &scales, n, k))
        } else if self.layout == ExpertLayout::Split {
            let rows = ck.f32_rows(base, x..x + 1)?;
            if proj == Proj::Down {
                return Ok(rows);
            }
            let up = ck.f32_rows(&self.up(), x..x + 1)?;
            Ok(rows
                .chunks_exact(k)
                .zip(up.chunks_exact(k))
                .flat_map(|(g, u)| g.iter().chain(u).copied())
                .collect())
        } else {
            // Stored [E, K, N]: rows x*K..(x+1)*K hold expert x, transposed to [N, K].
            Ok(transpose(&ck.f32_rows(base, x..x + 1)?, k, n))
        }
    }
}
