//! ONNX Runtime backend (`ort` with `load-dynamic`: `libonnxruntime.so` is opened at run time).
//!
//! KV cache, as onnxruntime-genai runs it with `past_present_share_buffer`: one ORT-owned f32
//! buffer per layer and K/V, `[1, kv_heads, capacity, head_dim]`, allocated and zeroed once and
//! bound as both `past_key_values.N.*` and `present.N.*`, so GroupQueryAttention writes new
//! positions in place and no step copies or allocates the cache. Capacity is `max_length` for
//! full-attention layers and window + slack for sliding layers (the op evicts inside the buffer,
//! `sliding_window_cache=1`). Intra-op threads may spin between operators during a request
//! ([`BackendOptions::allow_spinning`]). Each step binds `input_ids [1,S]` and an all-ones
//! `attention_mask [1,T]` (T = tokens so far, this step included); the graph derives
//! `seqlens_k` and `total_sequence_length` from it. Prompts run in chunks of `prefill_chunk`.

use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

use super::{Backend, BackendError, BackendOptions, KvSnapshot, ort_library_candidates};
use crate::package::{KvLayout, Package};

/// The process's ONNX Runtime environment. ONNX Runtime allows one per process and `ort`
/// loads one library per process, so every backend shares it; asking for a different library
/// later is an error rather than a silent mix.
fn environment(candidates: &[PathBuf]) -> Result<ort::environment::Environment, BackendError> {
    let mut tried = Vec::new();
    for lib in candidates {
        match environment_from(lib) {
            Ok(env) => return Ok(env),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(BackendError::Library {
        path: candidates.first().cloned().unwrap_or_default(),
        msg: format!(
            "could not load ONNX Runtime (>= {}): {} (set [onnxruntime] library or ORT_DYLIB_PATH, or run scripts/fetch-onnxruntime.sh)",
            super::ORT_MIN_VERSION,
            tried.join("; ")
        ),
    })
}

fn environment_from(lib: &Path) -> Result<ort::environment::Environment, BackendError> {
    static ENV: std::sync::Mutex<Option<(PathBuf, ort::environment::Environment)>> =
        std::sync::Mutex::new(None);
    let mut slot = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != lib {
            return Err(BackendError::Library {
                path: lib.to_path_buf(),
                msg: format!(
                    "this process already loaded ONNX Runtime from {}",
                    loaded.display()
                ),
            });
        }
        return Ok(env.clone());
    }
    let err = |e: &dyn std::fmt::Display| BackendError::Library {
        path: lib.to_path_buf(),
        msg: e.to_string(),
    };
    let env = ort::init_from(lib)
        .map_err(|e| err(&e))?
        .with_name("edgellm")
        .build()
        .map_err(|e| err(&e))?;
    *slot = Some((lib.to_path_buf(), env.clone()));
    Ok(env)
}

/// One zeroed KV buffer of `shape`, bound as both `past` and `present` (GroupQueryAttention
/// then writes new positions in place).
fn bind_kv(
    binding: &mut ort::session::IoBinding,
    allocator: &Allocator,
    shape: [usize; 4],
    past: &str,
    present: &str,
) -> Result<Tensor<f32>, BackendError> {
    let mut t = Tensor::<f32>::new(allocator, shape).map_err(rt("allocating the KV cache"))?;
    t.extract_tensor_mut().1.fill(0.0);
    binding.bind_input(past, &t).map_err(rt(past))?;
    binding.bind_output(present, &mut t).map_err(rt(present))?;
    Ok(t)
}

fn rt(context: &str) -> impl FnOnce(ort::Error) -> BackendError + '_ {
    move |e| BackendError::Runtime {
        context: context.to_string(),
        msg: e.to_string(),
    }
}

pub struct OrtBackend {
    session: Session,
    binding: ort::session::IoBinding,
    /// Kept alive: bound as past and present of every layer.
    _kv: Vec<Tensor<f32>>,
    cpu: MemoryInfo<'static>,
    layout: KvLayout,
    names: Names,
    vocab: usize,
    /// Tokens in the KV cache.
    pos: usize,
    prefill_chunk: usize,
    /// The logits output of the last step (`[1, rows, vocab]`), kept to hand out slices of it
    /// without copying.
    logits: Option<ort::value::DynValue>,
    /// Continuous batching, once enabled ([`Backend::enable_slots`]).
    slots: Option<Slots>,
    /// The KV input and output names of every layer: `(past, present)` for key, then value.
    kv_names: Vec<(String, String)>,
}

/// The slots of continuous batching: a second set of KV buffers, `[n, kv_heads, max_length,
/// head_dim]` per layer and K/V, bound to their own I/O binding as past and present (the genai
/// layout with batch n). A step binds `input_ids [n, 1]` and a right-padded `attention_mask
/// [n, T]` whose row i has `len_i + 1` ones: the graph derives each row's `seqlens_k` from it,
/// and GroupQueryAttention writes row i's new key and value at position `len_i` of slot i and
/// attends over its own rows only. Each row's result is the one the sequence would get alone
/// (checked against the single cache in the tests). New sequences are prefilled in the single
/// cache (where prefix reuse lives) and copied into a slot ([`Backend::store_slot`]).
struct Slots {
    binding: ort::session::IoBinding,
    kv: Vec<Tensor<f32>>,
    /// Tokens in each slot.
    lens: Vec<usize>,
    logits: Option<ort::value::DynValue>,
}

struct Names {
    input_ids: String,
    attention_mask: String,
    logits: String,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("layout", &self.layout)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl OrtBackend {
    pub fn load(pkg: &Package, opts: &BackendOptions) -> Result<Self, BackendError> {
        let env = environment(&ort_library_candidates(opts.library.as_deref()))?;
        let graph = pkg.graph_path();
        let ctx = format!("creating an ONNX Runtime session for {}", graph.display());
        let builder = Session::builder(&env).map_err(rt(&ctx))?;
        let builder = builder
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| rt(&ctx)(e.into()))?
            .with_intra_op_spinning(opts.allow_spinning)
            .map_err(|e| rt(&ctx)(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| rt(&ctx)(e.into()))?;
        let mut builder = if opts.threads > 0 {
            builder
                .with_intra_threads(opts.threads)
                .map_err(|e| rt(&ctx)(e.into()))?
        } else {
            builder
        };
        if opts
            .execution_providers
            .contains(&super::ExecutionProvider::Cuda)
        {
            // Registration must succeed: a CPU-only library would otherwise quietly run the
            // package on the CPU while the configuration says GPU.
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| BackendError::Runtime {
                    context: format!(
                        "registering ONNX Runtime's CUDA execution provider (execution providers {:?})",
                        opts.execution_providers
                    ),
                    msg: format!(
                        "{e} (the library needs to be a CUDA-enabled ONNX Runtime build, with CUDA and cuDNN installed: see docs/deploy-jetson.md)"
                    ),
                })?;
        }
        let session = builder.commit_from_file(&graph).map_err(rt(&ctx))?;

        let d = &pkg.config.model.decoder;
        let layout = pkg.kv_layout(opts.max_length);
        let name =
            |n: &Option<String>, default: &str| n.clone().unwrap_or_else(|| default.to_string());
        let names = Names {
            input_ids: name(&d.inputs.input_ids, "input_ids"),
            attention_mask: name(&d.inputs.attention_mask, "attention_mask"),
            logits: name(&d.outputs.logits, "logits"),
        };
        if d.inputs.position_ids.is_some() {
            return Err(BackendError::Unsupported(format!(
                "{}: graphs with a position_ids input (RoPE outside GroupQueryAttention) are not supported",
                graph.display()
            )));
        }
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(rt("CPU memory info"))?;
        let allocator = Allocator::default();
        let mut binding = session
            .create_binding()
            .map_err(rt("creating an I/O binding"))?;
        let mut kv = Vec::with_capacity(2 * d.num_hidden_layers);
        let mut kv_names = Vec::with_capacity(2 * d.num_hidden_layers);
        for (layer, &cap) in layout.capacity.iter().enumerate() {
            for (past, present, kind) in [
                (
                    &d.inputs.past_key_names,
                    &d.outputs.present_key_names,
                    "key",
                ),
                (
                    &d.inputs.past_value_names,
                    &d.outputs.present_value_names,
                    "value",
                ),
            ] {
                let past = name(past, &format!("past_key_values.%d.{kind}"))
                    .replace("%d", &layer.to_string());
                let present =
                    name(present, &format!("present.%d.{kind}")).replace("%d", &layer.to_string());
                let shape = [1, layout.kv_heads, cap, layout.head_dim];
                kv.push(bind_kv(&mut binding, &allocator, shape, &past, &present)?);
                kv_names.push((past, present));
            }
        }
        Ok(OrtBackend {
            session,
            binding,
            _kv: kv,
            cpu,
            vocab: pkg.config.model.vocab_size,
            layout,
            names,
            pos: 0,
            prefill_chunk: opts.prefill_chunk.max(1),
            logits: None,
            slots: None,
            kv_names,
        })
    }

    /// The logits output bound to CPU memory and the run's logits taken out of `outputs`.
    fn take_logits(
        name: &str,
        mut outputs: ort::session::SessionOutputs<'_>,
    ) -> Result<ort::value::DynValue, BackendError> {
        outputs.remove(name).ok_or_else(|| BackendError::Runtime {
            context: "running the model".into(),
            msg: format!("no {name:?} output"),
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Tokens currently in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// One graph run over `tokens` (appended at `self.pos`); keeps all returned logit rows.
    fn step(&mut self, tokens: &[u32]) -> Result<(), BackendError> {
        let s = tokens.len();
        let total = super::check_step(self.pos, tokens, self.layout.max_length, self.vocab)?;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_array(([1usize, s], ids)).map_err(rt("input_ids"))?;
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total]))
            .map_err(rt("attention_mask"))?;
        self.binding
            .bind_input(&self.names.input_ids, &ids)
            .map_err(rt("input_ids"))?;
        self.binding
            .bind_input(&self.names.attention_mask, &mask)
            .map_err(rt("attention_mask"))?;
        // A device-bound output keeps the shape of its first run; rebind every step.
        self.binding
            .bind_output_to_device(&self.names.logits, &self.cpu)
            .map_err(rt("logits"))?;
        let outputs = self
            .session
            .run_binding(&self.binding)
            .map_err(rt("running the model"))?;
        self.logits = Some(Self::take_logits(&self.names.logits, outputs)?);
        self.pos = total;
        Ok(())
    }

    /// All rows of the last step's logits.
    fn logit_rows(&self) -> Result<&[f32], BackendError> {
        let value = self.logits.as_ref().ok_or_else(|| BackendError::Runtime {
            context: "reading logits".into(),
            msg: "no forward pass has run".into(),
        })?;
        let (_, data) = value
            .try_extract_tensor::<f32>()
            .map_err(rt("reading logits"))?;
        Ok(data)
    }
}

impl Backend for OrtBackend {
    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        self.step(tokens)?;
        self.logit_rows()
    }

    fn name(&self) -> &'static str {
        "ort"
    }

    fn reset(&mut self) {
        // The buffers keep stale rows; the attention mask length (== pos) decides what is read.
        self.pos = 0;
    }

    /// Full-attention layers keep every position at its own row, so any earlier position can
    /// be resumed: the rows past it are stale and never read again. A sliding-window layer's
    /// buffer (window + slack rows) holds positions at their own rows only until the sequence
    /// outgrows it; then GroupQueryAttention shifts it to evict old rows, and no earlier
    /// position can be resumed (the current one still can: a conversation that goes on).
    fn rewind(&mut self, len: usize) -> bool {
        let evicted = self.layout.capacity.iter().any(|&cap| self.pos > cap);
        if len > self.pos || (evicted && len < self.pos) {
            return false;
        }
        self.pos = len;
        true
    }

    /// Per buffer (`[1, kv_heads, capacity, head_dim]`): the first `pos` rows of each head for
    /// full-attention layers, the whole buffer for sliding-window ones (GroupQueryAttention
    /// may have shifted it: its rows are state as a whole).
    fn snapshot(&mut self) -> Option<KvSnapshot> {
        let (heads, dim, full) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.max_length,
        );
        let mut parts = Vec::with_capacity(self._kv.len());
        for (i, t) in self._kv.iter_mut().enumerate() {
            let cap = self.layout.capacity[i / 2];
            let rows = if cap == full { self.pos } else { cap };
            let data = t.extract_tensor_mut().1;
            let mut part = Vec::with_capacity(heads * rows * dim);
            for h in 0..heads {
                let start = h * cap * dim;
                part.extend_from_slice(&data[start..start + rows * dim]);
            }
            parts.push(super::KvPart {
                shape: vec![heads, rows, dim],
                data: part,
            });
        }
        Some(KvSnapshot {
            backend: self.name().to_string(),
            pos: self.pos,
            parts,
        })
    }

    fn restore(&mut self, snapshot: &KvSnapshot) -> bool {
        if snapshot.backend != self.name() {
            return false;
        }
        let parts = &snapshot.parts;
        let (heads, dim, full) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.max_length,
        );
        let rows_of = |i: usize| {
            let cap = self.layout.capacity[i / 2];
            (cap, if cap == full { snapshot.pos } else { cap })
        };
        let fits = parts.len() == self._kv.len()
            && snapshot.pos <= full
            && parts.iter().enumerate().all(|(i, p)| {
                p.shape == [heads, rows_of(i).1, dim] && p.data.len() == heads * rows_of(i).1 * dim
            });
        if !fits {
            return false;
        }
        for (i, (t, part)) in self._kv.iter_mut().zip(parts).enumerate() {
            let (cap, rows) = rows_of(i);
            let data = t.extract_tensor_mut().1;
            for h in 0..heads {
                let start = h * cap * dim;
                data[start..start + rows * dim]
                    .copy_from_slice(&part.data[h * rows * dim..(h + 1) * rows * dim]);
            }
        }
        self.pos = snapshot.pos;
        true
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        let (chunk, vocab) = (self.prefill_chunk, self.vocab);
        super::forward_in_chunks(self, tokens, chunk, vocab)
    }

    /// Slots hold every position at its own row, so sliding-window layers (whose single
    /// buffer is shorter than `max_length` and shifts) are not batched: such a package runs one
    /// sequence at a time.
    fn enable_slots(&mut self, n: usize) -> Result<usize, String> {
        if n < 2 {
            return Err("parallel = 1".into());
        }
        let full = self.layout.max_length;
        if self.layout.capacity.iter().any(|&c| c != full) {
            return Err(
                "this package has sliding-window layers, which are not batched: it runs one \
                 sequence at a time"
                    .into(),
            );
        }
        let allocator = Allocator::default();
        let mut binding = self
            .session
            .create_binding()
            .map_err(|e| format!("creating an I/O binding for the slots: {e}"))?;
        let mut kv = Vec::with_capacity(self.kv_names.len());
        for (past, present) in &self.kv_names {
            let shape = [n, self.layout.kv_heads, full, self.layout.head_dim];
            let t = bind_kv(&mut binding, &allocator, shape, past, present)
                .map_err(|e| format!("{n} slots of KV cache: {e}"))?;
            kv.push(t);
        }
        self.slots = Some(Slots {
            binding,
            kv,
            lens: vec![0; n],
            logits: None,
        });
        Ok(n)
    }

    fn store_slot(&mut self, slot: usize) -> Result<(), BackendError> {
        let (heads, dim, full, pos) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.max_length,
            self.pos,
        );
        let slots = self
            .slots
            .as_mut()
            .ok_or_else(|| BackendError::Unsupported("slots are not enabled".into()))?;
        if slot >= slots.lens.len() {
            return Err(BackendError::Unsupported(format!(
                "slot {slot} of {}",
                slots.lens.len()
            )));
        }
        // Single buffer [1, heads, full, dim] -> slot `slot` of [n, heads, full, dim].
        for (single, batch) in self._kv.iter_mut().zip(slots.kv.iter_mut()) {
            let src = single.extract_tensor_mut().1;
            let dst = &mut batch.extract_tensor_mut().1[slot * heads * full * dim..];
            for h in 0..heads {
                let at = h * full * dim;
                dst[at..at + pos * dim].copy_from_slice(&src[at..at + pos * dim]);
            }
        }
        slots.lens[slot] = pos;
        Ok(())
    }

    fn decode_slots(&mut self, tokens: &[Option<u32>]) -> Result<&[f32], BackendError> {
        let (vocab, full) = (self.vocab, self.layout.max_length);
        let slots = self
            .slots
            .as_mut()
            .ok_or_else(|| BackendError::Unsupported("slots are not enabled".into()))?;
        let n = slots.lens.len();
        if tokens.len() != n {
            return Err(BackendError::Unsupported(format!(
                "{} tokens for {n} slots",
                tokens.len()
            )));
        }
        // An idle slot runs token 0 at position 0 of its own (unused) cache.
        let mut width = 1;
        for (t, &len) in tokens.iter().zip(&slots.lens) {
            if let Some(t) = *t {
                super::check_step(len, &[t], full, vocab)?;
                width = width.max(len + 1);
            }
        }
        let ids: Vec<i64> = tokens.iter().map(|t| t.map_or(0, i64::from)).collect();
        let mut mask = vec![0i64; n * width];
        for (i, (t, &len)) in tokens.iter().zip(&slots.lens).enumerate() {
            let ones = if t.is_some() { len + 1 } else { 1 };
            mask[i * width..i * width + ones].fill(1);
        }
        let ids = Tensor::from_array(([n, 1usize], ids)).map_err(rt("input_ids"))?;
        let mask = Tensor::from_array(([n, width], mask)).map_err(rt("attention_mask"))?;
        slots
            .binding
            .bind_input(&self.names.input_ids, &ids)
            .map_err(rt("input_ids"))?;
        slots
            .binding
            .bind_input(&self.names.attention_mask, &mask)
            .map_err(rt("attention_mask"))?;
        slots
            .binding
            .bind_output_to_device(&self.names.logits, &self.cpu)
            .map_err(rt("logits"))?;
        let outputs = self
            .session
            .run_binding(&slots.binding)
            .map_err(rt("running the model over the slots"))?;
        slots.logits = Some(Self::take_logits(&self.names.logits, outputs)?);
        for (t, len) in tokens.iter().zip(slots.lens.iter_mut()) {
            *len = if t.is_some() { *len + 1 } else { 0 };
        }
        let value = slots.logits.as_ref().expect("set above");
        let (_, data) = value
            .try_extract_tensor::<f32>()
            .map_err(rt("reading logits"))?;
        if data.len() != n * vocab {
            return Err(BackendError::Runtime {
                context: "running the model over the slots".into(),
                msg: format!("{} logits for {n} slots of {vocab}", data.len()),
            });
        }
        Ok(data)
    }
}
