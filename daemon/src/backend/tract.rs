//! tract backend: the same package in pure Rust (`tract-onnx` =0.23.9), for devices where ONNX
//! Runtime is missing or cannot run the model.
//!
//! The graph is loaded with tract's own importers for everything it already does right
//! (4-bit GatherBlockQuantized without zero points: Q4_0 for block 32, a graph over the packed
//! bytes otherwise; (Skip)SimplifiedLayerNormalization, the standard ops) and with our
//! implementations, registered in tract-onnx's op register, for what it lacks or does slowly:
//!
//! * `GroupQueryAttention` ([`gqa`]) replaces tract's: packed QKV, any number of new tokens
//!   against any cached prefix (chunked prefill), attention sinks (`head_sink`), sliding windows
//!   with symbolic lengths, softcap, partial rotary.
//! * `QMoE` / `MoE` ([`moe`]): top-k routing, int4 experts kept packed, the SwiGLU variants with
//!   alpha/beta/limit.
//! * `MatMulNBits` ([`matmul`]) replaces tract's: 4- and 8-bit weights in blocks of 16 to 256,
//!   with or without zero points, the package's bytes used in place, int8 activations, AVX2
//!   where the CPU has it.
//! * `GatherBlockQuantized` ([`gather`]) for the tables tract's importer lacks: 8-bit, and
//!   4-bit with zero points; only the gathered rows are dequantized, and a table the graph
//!   reshapes from the lm_head's bytes is read in place (one copy).
//!
//! One plan is built at load with the sequence length and every past length symbolic, optimized
//! once and reused for every step of every prompt. The KV cache is explicit: each step feeds
//! the valid rows of every layer's past (`[1, kv_heads, P, head_dim]`, P = the tokens it holds)
//! and keeps the `present` outputs for the next step. Sliding-window layers keep only the rows
//! the window can still see (trimmed when the window plus slack is exceeded), so the op knows
//! their absolute positions from `seqlens_k` rather than from the buffer length. One thread pool
//! ([`common::POOL`], all cores by default) runs tract's matrix products (its executor) and
//! ours.

mod common;
mod gather;
mod gqa;
mod matmul;
mod moe;
#[cfg(test)]
mod test_graph;

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{Backend, BackendError, BackendOptions, KvSnapshot};
use crate::package::Package;

/// The integer kernels `MatMulNBits` runs here: `"avx2"`, `"neon-i8mm"`, `"neon-dotprod"`,
/// `"neon"` or `"portable"` (another CPU, or `EDGELLM_TRACT_PORTABLE` set).
pub fn int_kernels() -> &'static str {
    edgellm_kernels::kernel().name()
}

fn rt(context: impl Into<String>) -> impl FnOnce(TractError) -> BackendError {
    let context = context.into();
    move |e| BackendError::Runtime {
        context,
        msg: format!("{e:#}"),
    }
}

/// tract-onnx with our parsers for what its importers lack or reject. The graph's `value_info`
/// hints are ignored: exporters write them loosely (onnxruntime-genai's builder declares a
/// `[1]` constant as a scalar), and the backend sets the input facts itself.
fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.ignore_value_info = true;
    if let Some(&builtin) = onnx.op_register.0.get("MatMulNBits") {
        let _ = matmul::BUILTIN.set(builtin);
    }
    onnx.op_register
        .insert("MatMulNBits", matmul::mat_mul_nbits);
    if let Some(&builtin) = onnx.op_register.0.get("GatherBlockQuantized") {
        let _ = gather::BUILTIN.set(builtin);
    }
    onnx.op_register
        .insert("GatherBlockQuantized", gather::gather_block_quantized);
    onnx.op_register
        .insert("GroupQueryAttention", gqa::group_query_attention);
    onnx.op_register.insert("QMoE", moe::qmoe);
    onnx.op_register.insert("MoE", moe::moe);
    onnx
}

/// Parses the graph with [`onnx`], after dropping the statistics outputs of normalization
/// nodes that nothing reads (exporters name `mean`/`inv_std_var` even when unused; tract
/// rejects a named `mean`) and pointing quantized embedding tables at their initializers
/// ([`gather::read_tables_in_place`]).
fn read_graph(path: &std::path::Path) -> TractResult<InferenceModel> {
    let onnx = onnx();
    let mut proto = onnx.proto_model_for_path(path)?;
    if let Some(graph) = proto.graph.as_mut() {
        gather::read_tables_in_place(graph);
        let mut used: std::collections::HashSet<String> =
            graph.output.iter().map(|o| o.name.clone()).collect();
        for node in &graph.node {
            used.extend(node.input.iter().cloned());
        }
        for node in &mut graph.node {
            if node.op_type.ends_with("LayerNormalization") {
                for out in node.output.iter_mut().skip(1) {
                    if !used.contains(out.as_str()) {
                        out.clear();
                    }
                }
            }
        }
    }
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = onnx.parse(&proto, dir)?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(tract_onnx::tract_hir::internal::format_err!(
            "unresolved inputs {:?}",
            parsed.unresolved_inputs
        ));
    }
    Ok(parsed.model)
}

/// Builds the process's thread pool once: `threads` workers (0 = all cores), shared by tract's
/// matrix products (its executor) and our quantized products.
fn set_executor(threads: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        if n > 1
            && let Ok(pool) = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("edgellm-tract-{i}"))
                .build()
        {
            let pool = Arc::new(pool);
            let _ = common::POOL.set(pool.clone());
            tract_linalg::multithread::set_default_executor(
                tract_linalg::multithread::Executor::MultiThread(pool),
            );
        }
    });
}

struct Layer {
    key: Tensor,
    value: Tensor,
    /// Rows kept after a step for a sliding-window layer (its window); `None`: all rows.
    keep: Option<usize>,
    /// Trim once the buffer grows past this (window plus slack): amortizes the copy.
    trim_at: usize,
}

pub struct TractBackend {
    /// The optimized plan's running state (it holds the plan).
    state: TypedSimpleState,
    layers: Vec<Layer>,
    /// Positions of the graph inputs: input_ids, attention_mask, then past key/value per layer.
    input_ids: usize,
    attention_mask: usize,
    past: Vec<(usize, usize)>,
    /// Positions of the outputs: logits, then present key/value per layer.
    logits: usize,
    present: Vec<(usize, usize)>,
    /// KV heads and head size.
    kv_shape: (usize, usize),
    vocab: usize,
    max_length: usize,
    pos: usize,
    prefill_chunk: usize,
    /// The logits output of the last step, kept to hand out slices of it without copying.
    last_logits: Option<TValue>,
    /// `EDGELLM_TRACT_PROFILE=1`: time per operator kind, printed to stderr on drop.
    profile: Option<Profile>,
}

#[derive(Default)]
struct Profile {
    steps: usize,
    times: HashMap<String, std::time::Duration>,
}

impl Drop for TractBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let mut rows: Vec<_> = p.times.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1));
            let total: std::time::Duration = rows.iter().map(|r| *r.1).sum();
            eprintln!(
                "tract profile: {} steps, {:.1} ms in operators",
                p.steps,
                total.as_secs_f64() * 1e3
            );
            for (op, t) in rows {
                eprintln!(
                    "  {:>10.1} ms  {:>5.1}%  {op}",
                    t.as_secs_f64() * 1e3,
                    100.0 * t.as_secs_f64() / total.as_secs_f64()
                );
            }
        }
    }
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("pos", &self.pos)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl TractBackend {
    pub fn load(pkg: &Package, opts: &BackendOptions) -> Result<Self, BackendError> {
        set_executor(opts.threads);
        tracing::info!(
            int_kernels = int_kernels(),
            "tract: MatMulNBits integer kernels"
        );
        let graph = pkg.graph_path();
        let ctx = format!("loading {} with tract", graph.display());
        let d = &pkg.config.model.decoder;
        if d.inputs.position_ids.is_some() {
            return Err(BackendError::Unsupported(format!(
                "{}: graphs with a position_ids input (RoPE outside GroupQueryAttention) are not supported",
                graph.display()
            )));
        }
        let layout = pkg.kv_layout(opts.max_length);
        let name =
            |n: &Option<String>, default: &str| n.clone().unwrap_or_else(|| default.to_string());
        let layer_name = |pattern: &Option<String>, default: &str, i: usize| {
            name(pattern, default).replace("%d", &i.to_string())
        };

        let mut model = read_graph(&graph).map_err(rt(&ctx))?;
        let inputs: Vec<String> = model
            .input_outlets()
            .map_err(rt(&ctx))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs: Vec<String> = model
            .output_outlets()
            .map_err(rt(&ctx))?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let find = |list: &[String], n: &str, what: &str| {
            list.iter()
                .position(|x| x == n)
                .ok_or_else(|| BackendError::Runtime {
                    context: ctx.clone(),
                    msg: format!("the graph has no {what} named {n:?}"),
                })
        };
        let input_ids = find(&inputs, &name(&d.inputs.input_ids, "input_ids"), "input")?;
        let attention_mask = find(
            &inputs,
            &name(&d.inputs.attention_mask, "attention_mask"),
            "input",
        )?;
        let logits = find(&outputs, &name(&d.outputs.logits, "logits"), "output")?;

        // Batch 1, S new tokens, T tokens in all; each group of layers with the same cache
        // rule gets its own past-length symbol.
        let s = model.symbols.sym("S");
        let t = model.symbols.sym("T");
        let fact = |dt: DatumType, shape: Vec<TDim>| -> InferenceFact {
            TypedFact::dt_shape(dt, shape).into()
        };
        model
            .set_input_fact(input_ids, fact(i64::datum_type(), vec![1.into(), s.into()]))
            .map_err(rt(&ctx))?;
        model
            .set_input_fact(
                attention_mask,
                fact(i64::datum_type(), vec![1.into(), t.into()]),
            )
            .map_err(rt(&ctx))?;
        let window = d.sliding_window.as_ref();
        let mut past = Vec::new();
        let mut present = Vec::new();
        let mut layers = Vec::new();
        let mut symbols = HashMap::new();
        for (i, &cap) in layout.capacity.iter().enumerate() {
            let sliding = cap != layout.max_length;
            let keep = window.filter(|_| sliding).map(|w| w.window_size);
            let p = symbols
                .entry(keep)
                .or_insert_with(|| model.symbols.sym(&format!("P{}", keep.unwrap_or(0))))
                .clone();
            let kv_fact = fact(
                f32::datum_type(),
                vec![
                    1.into(),
                    layout.kv_heads.into(),
                    p.into(),
                    layout.head_dim.into(),
                ],
            );
            let pk = find(
                &inputs,
                &layer_name(&d.inputs.past_key_names, "past_key_values.%d.key", i),
                "input",
            )?;
            let pv = find(
                &inputs,
                &layer_name(&d.inputs.past_value_names, "past_key_values.%d.value", i),
                "input",
            )?;
            for ix in [pk, pv] {
                model
                    .set_input_fact(ix, kv_fact.clone())
                    .map_err(rt(&ctx))?;
            }
            past.push((pk, pv));
            present.push((
                find(
                    &outputs,
                    &layer_name(&d.outputs.present_key_names, "present.%d.key", i),
                    "output",
                )?,
                find(
                    &outputs,
                    &layer_name(&d.outputs.present_value_names, "present.%d.value", i),
                    "output",
                )?,
            ));
            let empty = Tensor::zero::<f32>(&[1, layout.kv_heads, 0, layout.head_dim])
                .map_err(rt("allocating the KV cache"))?;
            layers.push(Layer {
                key: empty.clone(),
                value: empty,
                keep,
                trim_at: cap.max(keep.unwrap_or(0)),
            });
        }
        if inputs.len() != 2 + 2 * layers.len() {
            return Err(BackendError::Unsupported(format!(
                "{}: expected input_ids, attention_mask and a past key/value per layer, found inputs {inputs:?}",
                graph.display()
            )));
        }

        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(rt(&ctx))?;
        let state = TypedSimpleState::new(&plan).map_err(rt(&ctx))?;
        Ok(TractBackend {
            state,
            layers,
            input_ids,
            attention_mask,
            past,
            logits,
            present,
            kv_shape: (layout.kv_heads, layout.head_dim),
            vocab: pkg.config.model.vocab_size,
            max_length: layout.max_length,
            pos: 0,
            prefill_chunk: opts.prefill_chunk.max(1),
            last_logits: None,
            profile: std::env::var_os("EDGELLM_TRACT_PROFILE").map(|_| Profile::default()),
        })
    }

    /// One graph run over `tokens` (appended at `self.pos`); keeps all returned logit rows.
    fn step(&mut self, tokens: &[u32]) -> Result<(), BackendError> {
        let s = tokens.len();
        let total = super::check_step(self.pos, tokens, self.max_length, self.vocab)?;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut inputs: Vec<Option<TValue>> = vec![None; 2 + 2 * self.layers.len()];
        inputs[self.input_ids] = Some(
            Tensor::from_shape(&[1, s], &ids)
                .map_err(rt("input_ids"))?
                .into(),
        );
        inputs[self.attention_mask] = Some(
            Tensor::from_shape(&[1, total], &vec![1i64; total])
                .map_err(rt("attention_mask"))?
                .into(),
        );
        for (layer, &(k, v)) in self.layers.iter_mut().zip(&self.past) {
            // Moved into the step; the present outputs replace them.
            let key = std::mem::take(&mut layer.key);
            let value = std::mem::take(&mut layer.value);
            inputs[k] = Some(key.into());
            inputs[v] = Some(value.into());
        }
        let inputs: TVec<TValue> = inputs
            .into_iter()
            .map(|i| i.expect("every input set"))
            .collect();
        let result = match &mut self.profile {
            None => self.state.run(inputs),
            Some(profile) => {
                profile.steps += 1;
                let times = &mut profile.times;
                self.state
                    .run_plan_with_eval(inputs, |ctx, state, node, input| {
                        let start = std::time::Instant::now();
                        let out = tract_onnx::tract_core::plan::eval(ctx, state, node, input);
                        let op = node.op().name().to_string();
                        *times.entry(op).or_default() += start.elapsed();
                        out
                    })
            }
        };
        let mut outputs = match result {
            Ok(o) => o,
            Err(e) => {
                // The cache was handed to the failed step: start over.
                self.reset();
                return Err(rt("running the model")(e));
            }
        };
        for (layer, &(k, v)) in self.layers.iter_mut().zip(&self.present) {
            let take = |outputs: &mut TVec<TValue>, i: usize| {
                std::mem::replace(&mut outputs[i], Tensor::default().into()).into_tensor()
            };
            let (mut key, mut value) = (take(&mut outputs, k), take(&mut outputs, v));
            if let Some(keep) = layer.keep {
                let len = key.shape()[2];
                if len > layer.trim_at {
                    key = key
                        .slice(2, len - keep, len)
                        .map_err(rt("trimming the KV cache"))?;
                    value = value
                        .slice(2, len - keep, len)
                        .map_err(rt("trimming the KV cache"))?;
                }
            }
            layer.key = key;
            layer.value = value;
        }
        self.last_logits = Some(outputs.swap_remove(self.logits));
        self.pos = total;
        Ok(())
    }
}

impl Backend for TractBackend {
    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        self.step(tokens)?;
        let logits = self.last_logits.as_ref().expect("set by the step");
        logits
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .map_err(rt("reading logits"))
    }

    fn name(&self) -> &'static str {
        "tract"
    }

    fn reset(&mut self) {
        let (heads, dim) = self.kv_shape;
        for layer in &mut self.layers {
            let empty = Tensor::zero::<f32>(&[1, heads, 0, dim]).unwrap_or_default();
            layer.key = empty.clone();
            layer.value = empty;
        }
        self.pos = 0;
    }

    /// A layer holds the rows of positions `pos - P .. pos` (P rows). Full-attention layers
    /// hold them all; a sliding-window layer may have dropped the oldest, and position `len`
    /// needs the `keep` (window) positions before it, so rewinding there works only while those
    /// are still held.
    fn rewind(&mut self, len: usize) -> bool {
        if len >= self.pos {
            return len == self.pos;
        }
        let pos = self.pos;
        let fits = self.layers.iter().all(|l| {
            let first = pos - l.key.shape()[2];
            first == 0 || l.keep.is_some_and(|w| first + w <= len)
        });
        if !fits {
            return false;
        }
        for layer in &mut self.layers {
            let first = pos - layer.key.shape()[2];
            let rows = len - first;
            let (key, value) = (layer.key.slice(2, 0, rows), layer.value.slice(2, 0, rows));
            match (key, value) {
                (Ok(k), Ok(v)) => {
                    layer.key = k;
                    layer.value = v;
                }
                // Cannot happen for in-range rows; start over rather than keep a torn cache.
                _ => {
                    self.reset();
                    return false;
                }
            }
        }
        self.pos = len;
        true
    }

    /// The layers' key and value tensors as they are (windowed layers hold only their rows).
    /// Per layer, its key then its value rows: `[1, kv_heads, rows, head_dim]`.
    fn snapshot(&mut self) -> Option<KvSnapshot> {
        let mut parts = Vec::with_capacity(2 * self.layers.len());
        for l in &self.layers {
            for t in [&l.key, &l.value] {
                parts.push(super::KvPart {
                    shape: t.shape().to_vec(),
                    data: t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec(),
                });
            }
        }
        Some(KvSnapshot {
            backend: self.name().to_string(),
            pos: self.pos,
            parts,
        })
    }

    /// Rows `[1, kv_heads, rows, head_dim]` per key and value: all `pos` of them for a
    /// full-attention layer, at most `pos` (what its window kept) for a sliding-window one.
    fn restore(&mut self, snapshot: &KvSnapshot) -> bool {
        let (heads, dim) = self.kv_shape;
        let pos = snapshot.pos;
        let fits = snapshot.backend == self.name()
            && snapshot.parts.len() == 2 * self.layers.len()
            && snapshot.parts.iter().enumerate().all(|(i, p)| {
                let full = self.layers[i / 2].keep.is_none();
                matches!(p.shape[..], [1, h, rows, d]
                    if h == heads && d == dim && (rows == pos || (!full && rows < pos))
                        && p.data.len() == heads * rows * dim)
            });
        if !fits {
            return false;
        }
        let mut tensors = Vec::with_capacity(snapshot.parts.len());
        for p in &snapshot.parts {
            match Tensor::from_shape::<f32>(&p.shape, &p.data) {
                Ok(t) => tensors.push(t),
                Err(_) => return false,
            }
        }
        let mut tensors = tensors.into_iter();
        for l in &mut self.layers {
            if let (Some(k), Some(v)) = (tensors.next(), tensors.next()) {
                l.key = k;
                l.value = v;
            }
        }
        self.pos = pos;
        true
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        let (chunk, vocab) = (self.prefill_chunk, self.vocab);
        super::forward_in_chunks(self, tokens, chunk, vocab)
    }
}
