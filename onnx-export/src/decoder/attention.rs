//! Self-attention: fused QKV projection (+ bias), Qwen3's per-head q/k RMSNorm, then
//! GroupQueryAttention with RoPE caches, the shared past/present KV buffers, the local window
//! and gpt-oss's attention sinks, then the output projection.

use super::linear::Linear;
use super::{DecoderBuilder, LayerNames, MS};
use crate::error::Result;
use crate::onnx::Attr;
use crate::spec::Arch;

impl DecoderBuilder<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
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
                let w = self.matrix_f32(
                    &n.t(&format!("self_attn.{which}_norm.weight")),
                    &format!("{prefix}.{which}_norm.weight"),
                    &[d],
                )?;
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
            self.matrix_f32(
                &n.t("self_attn.sinks"),
                &format!("{prefix}.sinks"),
                &[s.heads],
            )?
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
}
