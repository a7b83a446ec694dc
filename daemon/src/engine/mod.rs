//! The generation loop: one [`Engine`] owns one backend (and so one KV cache) and runs a
//! request as a [`Sequence`]: render and tokenize, prefill, then sample -> detokenize -> stop
//! checks -> emit -> decode one token, until an end-of-sequence token, a stop string,
//! `max_tokens`, the context length, or the caller's cancellation. The daemon runs it on its own
//! OS thread, one request at a time ([`Engine::generate_with`]) or several in the backend's
//! slots (continuous batching: [`Engine::prefill_step`] in the single cache, then
//! [`Engine::store_slot`] and [`Engine::decode_slots`]); the loop over the queue that drives
//! them is `serve` (the engine thread).
//!
//! Prefix reuse: the engine remembers which tokens the backend's KV cache holds (the last
//! request's prompt and the generated tokens it fed back). A new request whose prompt starts
//! with some of them rewinds the cache to that common prefix ([`Backend::rewind`]) and
//! prefills only the rest; `usage.cached_tokens` says how many were reused. The prompt's last
//! token is always computed (its logits pick the first answer token). A chat that goes on
//! (the same history plus a new turn) so pays only for what is new.
//!
//! A cache cannot always go back: a sliding-window layer drops the rows its window has passed
//! (tract trims them, ONNX Runtime's window + slack buffer shifts), so rewinding behind them
//! would read a torn cache; such a request starts from an empty cache. Prefixes worth keeping
//! whatever happens after them (`[model] system_prompts`, [`Engine::keep_prefix`]) are
//! computed once and copied ([`crate::backend::KvSnapshot`]: the full-attention rows up to the
//! prefix and the windowed layers' whole buffers at that point), and a request that starts
//! with one resumes from the copy.

mod sequence;
pub(crate) mod serve;

use std::time::{Duration, Instant};

pub use sequence::Sequence;
pub use serve::{BatchSteps, EngineHealth};

use crate::api::{Completion, Event, Request};
use crate::backend::{Backend, BackendError, PREFILL_CHUNK};
use crate::chat::harmony::{self, Channel};
use crate::model::{Model, ModelError};
use crate::sampler::{SamplingError, StopMatcher};
use crate::tokenizer::{Detokenizer, TokenizerError};
use crate::tools::{self, ToolFormat, Tools, When};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Grammar(#[from] crate::grammar::GrammarError),
    #[error("prompt of {prompt} tokens leaves no room to generate (max_length {max_length})")]
    PromptTooLong { prompt: usize, max_length: usize },
}

pub struct Engine {
    model: std::sync::Arc<Model>,
    backend: Box<dyn Backend>,
    max_length: usize,
    stats: Stats,
    /// The tokens whose keys and values the backend holds, in order (empty after a reset or
    /// a failed step).
    cached: Vec<u32>,
    /// Prefixes kept on purpose, with a copy of the cache at their end.
    kept: Vec<(Vec<u32>, crate::backend::KvSnapshot)>,
    /// The token each slot decodes in a batched step (`None`: idle), reused every step.
    slot_tokens: Vec<Option<u32>>,
}

/// Where a running sequence's events go.
pub trait EventSink {
    /// Takes one event (the text is lent: copy what is kept); `Break` cancels the sequence.
    fn send(&self, event: Event<&str>) -> Flow;
}

/// A sequence running in a slot and its event sink, for [`Engine::decode_slots`].
pub trait Slotted {
    fn parts(&mut self) -> (&mut Sequence, &dyn EventSink);
}

/// Timing of the last request's decode phase, for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Wall time from the first sampled token to the end.
    pub decode: Duration,
    /// Time inside the backend's forward pass during that phase.
    pub decode_forward: Duration,
}

impl Stats {
    /// Share of decode time spent outside the forward pass (sampling, detokenizing, emitting).
    pub fn decode_overhead_fraction(&self) -> f64 {
        let total = self.decode.as_secs_f64();
        if total <= 0.0 {
            return 0.0;
        }
        (total - self.decode_forward.as_secs_f64()).max(0.0) / total
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.name())
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

/// Whether the caller wants generation to go on after an event.
pub type Flow = std::ops::ControlFlow<()>;

impl Engine {
    /// `max_length`: the KV capacity the backend was built with (prompt + generated tokens).
    pub fn new(
        model: impl Into<std::sync::Arc<Model>>,
        backend: Box<dyn Backend>,
        max_length: usize,
    ) -> Self {
        Engine {
            model: model.into(),
            backend,
            max_length,
            stats: Stats::default(),
            // Never longer than the context: a step's push does not reallocate.
            cached: Vec::with_capacity(max_length),
            kept: Vec::new(),
            slot_tokens: Vec::new(),
        }
    }

    /// Computes `ids` once and keeps a copy of the cache at their end: every later request
    /// whose prompt starts with them resumes there. Returns the copy's size in bytes.
    pub fn keep_prefix(&mut self, ids: &[u32]) -> Result<usize, EngineError> {
        if ids.is_empty() || ids.len() >= self.max_length {
            return Err(EngineError::PromptTooLong {
                prompt: ids.len(),
                max_length: self.max_length,
            });
        }
        self.forget_cache();
        self.backend.forward(ids)?;
        self.cached.extend_from_slice(ids);
        let snapshot = self.backend.snapshot().ok_or_else(|| {
            BackendError::Unsupported(format!(
                "the {} backend cannot keep a copy of its cache",
                self.backend.name()
            ))
        })?;
        let bytes = snapshot.bytes();
        self.kept.push((ids.to_vec(), snapshot));
        Ok(bytes)
    }

    /// The copy [`Engine::keep_prefix`] kept for `ids`.
    pub fn kept(&self, ids: &[u32]) -> Option<&crate::backend::KvSnapshot> {
        self.kept.iter().find(|(k, _)| k == ids).map(|(_, s)| s)
    }

    /// Keeps `snapshot` (made earlier, e.g. read back from a file) as the computed prefix
    /// `ids`, as [`Engine::keep_prefix`] would have; `false` (nothing kept) when the backend
    /// does not accept it (another backend's, or shapes that are not its cache's).
    pub fn adopt_prefix(&mut self, ids: &[u32], snapshot: crate::backend::KvSnapshot) -> bool {
        if ids.is_empty() || ids.len() >= self.max_length || snapshot.pos != ids.len() {
            return false;
        }
        self.forget_cache();
        if !self.backend.restore(&snapshot) {
            return false;
        }
        self.cached.extend_from_slice(ids);
        self.kept.push((ids.to_vec(), snapshot));
        true
    }

    /// Empties the KV cache, so the next request computes its whole prompt (benchmarks of
    /// the prefill).
    pub fn forget_cache(&mut self) {
        self.backend.reset();
        self.cached.clear();
    }

    /// Positions the backend at the longest prefix of `prompt` its cache holds (at most all
    /// but the last token) and returns how many tokens that is; 0 after a reset.
    fn resume(&mut self, prompt: &[u32]) -> usize {
        let limit = prompt.len().saturating_sub(1);
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(limit);
        let kept = self
            .kept
            .iter()
            .enumerate()
            .filter(|(_, (ids, _))| ids.len() <= limit && prompt.starts_with(ids))
            .max_by_key(|(_, (ids, _))| ids.len())
            .map(|(i, (ids, _))| (i, ids.len()));
        let kept_len = kept.map_or(0, |(_, n)| n);
        if common > 0 && common >= kept_len && self.backend.rewind(common) {
            self.cached.truncate(common);
            return common;
        }
        if let Some((i, n)) = kept
            && self.backend.restore(&self.kept[i].1)
        {
            self.cached.clear();
            self.cached.extend_from_slice(&prompt[..n]);
            return n;
        }
        self.backend.reset();
        self.cached.clear();
        0
    }

    pub fn last_stats(&self) -> Stats {
        self.stats
    }

    pub fn model(&self) -> &std::sync::Arc<Model> {
        &self.model
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// One forward pass of a single token, then a reset: proves the backend runs the model
    /// (the daemon's start-up heartbeat) and takes first-run costs before the first request.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        let token = self.model.package.config.model.bos_token_id.unwrap_or(0);
        self.forget_cache();
        let result = self.backend.forward(&[token]).map(|_| ());
        self.backend.reset();
        Ok(result?)
    }

    /// Teacher forcing, for evaluations (`edgellm perplexity`): runs `tokens` from an empty KV
    /// cache and calls `on_logits(p, row)` with the logits at every position `p` in
    /// `from..tokens.len() - 1` (`row`: `[vocab]`, the prediction of `tokens[p + 1]`), in order.
    /// The last token predicts nothing and is not run. Returns the number of tokens run.
    ///
    /// Packages whose graph reports the last position's logits only get positions `0..=from`
    /// as a prefill (steps of [`PREFILL_CHUNK`]) and then one token per step; packages exported
    /// with `--logits all` run in steps of [`PREFILL_CHUNK`] and every row is read. The first
    /// step's row count tells which is which.
    pub fn teacher_forced(
        &mut self,
        tokens: &[u32],
        from: usize,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<usize, EngineError> {
        let vocab = self.model.package.config.model.vocab_size;
        let end = tokens.len().saturating_sub(1);
        if from >= end {
            return Ok(0);
        }
        self.forget_cache();
        // Some(true): every step reports a row per token; None: not known yet.
        let mut all_rows: Option<bool> = None;
        let mut pos = 0;
        while pos < end {
            let len = match all_rows {
                Some(true) => (end - pos).min(PREFILL_CHUNK),
                _ if pos > from => 1,
                _ => (from + 1 - pos).min(PREFILL_CHUNK),
            };
            let rows = self.backend.forward_all(&tokens[pos..pos + len])?;
            let n = rows.len() / vocab;
            if all_rows.is_none() && len > 1 {
                all_rows = Some(n == len);
            }
            // The position of the first row: every position of the step, or its last one.
            let first_row = match n {
                _ if !rows.len().is_multiple_of(vocab) => None,
                _ if n == len => Some(pos),
                1 if all_rows != Some(true) => Some(pos + len - 1),
                _ => None,
            }
            .ok_or_else(|| BackendError::Runtime {
                context: "teacher forcing".into(),
                msg: format!(
                    "a step of {len} tokens returned {} logits, not {len} or 1 rows of {vocab}",
                    rows.len()
                ),
            })?;
            for (i, row) in rows.chunks_exact(vocab).enumerate() {
                if first_row + i >= from {
                    on_logits(first_row + i, row);
                }
            }
            pos += len;
        }
        Ok(end)
    }

    /// Prompt ids for a request (render + tokenize), checked against the context length.
    pub fn prompt_ids(&self, req: &Request) -> Result<Vec<u32>, EngineError> {
        let ids = self.model.request_ids(req)?;
        if ids.len() >= self.max_length {
            return Err(EngineError::PromptTooLong {
                prompt: ids.len(),
                max_length: self.max_length,
            });
        }
        Ok(ids)
    }

    /// Runs `req` to completion, calling `on_event` with each piece of text as it is decoded.
    /// Returning `Break` from `on_event` cancels the request (finish reason `cancelled`).
    pub fn generate(
        &mut self,
        req: &Request,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<Completion, EngineError> {
        let prompt = self.prompt_ids(req)?;
        self.generate_from_ids(req, prompt, on_event)
    }

    pub fn generate_from_ids(
        &mut self,
        req: &Request,
        prompt: Vec<u32>,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<Completion, EngineError> {
        self.generate_with(req, prompt, on_event, &|| true)
    }

    /// Like [`Engine::generate_from_ids`], also asking `keep_going` before every decode step,
    /// so a cancellation is seen even while no text is being emitted.
    pub fn generate_with(
        &mut self,
        req: &Request,
        prompt: Vec<u32>,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Completion, EngineError> {
        let mut seq = self.begin(req, prompt)?;
        while !self.prefill_step(&mut seq, usize::MAX, on_event)? {}
        while !seq.feed.is_empty() {
            if !keep_going() {
                seq.cancel();
                break;
            }
            let t = Instant::now();
            // `cached` stays a prefix of what the backend holds, also when a step fails. The
            // tokens a grammar forced go in the same pass as the sampled one.
            let logits = self.backend.forward(&seq.feed)?;
            self.cached.extend_from_slice(&seq.feed);
            seq.forward += t.elapsed();
            seq.accept(&self.model, logits, on_event)?;
        }
        let (completion, stats) = seq.complete(&self.model, on_event)?;
        self.stats = stats;
        Ok(completion)
    }

    /// A request's [`Sequence`], nothing computed yet.
    pub fn begin(&self, req: &Request, prompt: Vec<u32>) -> Result<Sequence, EngineError> {
        Sequence::new(&self.model, req, prompt, self.max_length)
    }

    /// Computes up to `chunk` more prompt tokens of `seq` in the single cache (resuming from
    /// the longest cached prefix first); after the last one, samples the first answer token.
    /// Returns whether the prompt is done. One sequence prefills at a time.
    pub fn prefill_step(
        &mut self,
        seq: &mut Sequence,
        chunk: usize,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<bool, EngineError> {
        if seq.prefilled == 0 {
            seq.cached_tokens = self.resume(&seq.prompt);
            seq.prefilled = seq.cached_tokens;
        }
        let end = seq
            .prompt
            .len()
            .min(seq.prefilled.saturating_add(chunk.max(1)));
        let logits = self.backend.forward(&seq.prompt[seq.prefilled..end])?;
        self.cached
            .extend_from_slice(&seq.prompt[seq.prefilled..end]);
        seq.prefilled = end;
        if end < seq.prompt.len() {
            return Ok(false);
        }
        seq.accept(&self.model, logits, on_event)?;
        Ok(true)
    }

    /// Continuous batching: allocates `n` slots; the number there are, or why there are none.
    pub fn enable_slots(&mut self, n: usize) -> Result<usize, String> {
        let slots = self.backend.enable_slots(n)?;
        self.slot_tokens = vec![None; slots];
        Ok(slots)
    }

    /// Moves a sequence whose prompt is done into `slot` (a copy of the single cache).
    pub fn store_slot(&mut self, seq: &mut Sequence, slot: usize) -> Result<(), EngineError> {
        self.backend.store_slot(slot)?;
        seq.slot = Some(slot);
        Ok(())
    }

    /// One step of every sequence in a slot that is still running: their waiting tokens in
    /// one graph run, then each samples its next token and emits through its sink. Returns how
    /// many sequences the step decoded (0: none was running, nothing ran). Allocates nothing
    /// outside the backend's forward pass.
    pub fn decode_slots<T: Slotted>(&mut self, items: &mut [T]) -> Result<usize, EngineError> {
        self.slot_tokens.fill(None);
        let mut decoded = 0;
        for item in items.iter_mut() {
            let (s, _) = item.parts();
            if let (Some(slot), Some(&next)) = (s.slot, s.feed.first())
                && let Some(t) = self.slot_tokens.get_mut(slot)
            {
                *t = Some(next);
                decoded += 1;
            }
        }
        if decoded == 0 {
            return Ok(0);
        }
        let t = Instant::now();
        let vocab = self.model.package.config.model.vocab_size;
        let rows = self.backend.decode_slots(&self.slot_tokens)?;
        let took = t.elapsed();
        for item in items.iter_mut() {
            let (s, sink) = item.parts();
            if let (Some(slot), false) = (s.slot, s.feed.is_empty()) {
                s.forward += took;
                if s.feed.len() > 1 {
                    // A token a grammar forced: fed one per step here, nothing to sample yet.
                    s.feed.remove(0);
                    continue;
                }
                s.accept(
                    &self.model,
                    &rows[slot * vocab..(slot + 1) * vocab],
                    &mut |e| sink.send(e),
                )?;
            }
        }
        Ok(decoded)
    }

    /// Ends `seq`: its completion (held-back text flushed through `on_event` unless cancelled).
    pub fn complete(
        &mut self,
        seq: Sequence,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<Completion, EngineError> {
        let (completion, stats) = seq.complete(&self.model, on_event)?;
        self.stats = stats;
        Ok(completion)
    }
}

enum Step {
    Continue,
    Stop,
    Cancelled,
}

/// Turns generated ids into answer text: harmony channel parsing (gpt-oss), detokenization,
/// end-of-sequence ids and stop strings. Its buffers are sized when the request starts, so a
/// step appends to them and allocates nothing; the answer text (`text`) is reserved for up to
/// [`TEXT_RESERVE`] bytes and grows by doubling past that (a few times in a long answer, not
/// per token). A gpt-oss message header is decoded with `tokenizers` once per message.
struct Output {
    detok: Detokenizer,
    stops: StopMatcher,
    harmony: Option<harmony::Parser>,
    /// Channel of the message being decoded (harmony).
    channel: Channel,
    reasoning: Detokenizer,
    include_reasoning: bool,
    ignore_eos: bool,
    /// The text this step decoded, lent to the caller's event.
    piece: String,
    text: String,
    /// Tool calls being watched for and read (a request with tools).
    calls: Option<Calls>,
}

/// A request's tool calls as the answer writes them. Unlike the rest of [`Output`], this
/// allocates as it goes (the watch's text per token, the calls' text): a request with tools is
/// not on the allocation-free decode path, as one with a grammar is not either (llguidance).
struct Calls {
    format: ToolFormat,
    /// Template models, `tool_choice` auto: text that could open a call is held back.
    watch: Option<tools::Watch>,
    /// The call text has begun (from its opening, `<tool_call>` or `{"name"`).
    calling: bool,
    text: String,
    /// The opening's text as the call grammar reads it, once seen: the sequence starts the
    /// grammar with it.
    opened: Option<String>,
    /// Harmony: the calls made (name, arguments).
    made: Vec<(String, String)>,
}

impl Calls {
    fn new(format: ToolFormat, tools: &Tools, when: When) -> Self {
        let forced = tools.forced() && format != ToolFormat::Harmony;
        Calls {
            format,
            watch: match when {
                When::After(t) => Some(tools::Watch::new(t)),
                _ => None,
            },
            calling: forced,
            text: String::new(),
            opened: None,
            made: Vec::new(),
        }
    }

    /// The calls the answer made; `None` when it made none or its call text is not complete.
    fn parsed(&self) -> Option<Vec<(String, String)>> {
        match self.format {
            ToolFormat::Harmony => (!self.made.is_empty()).then(|| self.made.clone()),
            f if self.calling => f.parse_calls(&self.text),
            _ => None,
        }
    }
}

/// Bytes of answer text reserved per request: 8 per token (English runs near 4) up to 8 KiB.
const TEXT_RESERVE: usize = 8 << 10;

impl Output {
    fn new(
        model: &Model,
        req: &Request,
        max_new: usize,
        when: When,
    ) -> Result<Self, SamplingError> {
        let tok = &model.tokenizer;
        let max_piece = tok.max_piece_text();
        let calls = req
            .tools
            .as_deref()
            .filter(|t| t.active())
            .and_then(|t| Some(Calls::new(model.tool_format()?, t, when)));
        Ok(Output {
            detok: Detokenizer::new(tok),
            stops: StopMatcher::new(&req.stop, max_piece)?,
            harmony: model.harmony().map(harmony::Parser::new),
            channel: Channel::Other,
            reasoning: Detokenizer::new(tok),
            include_reasoning: req.include_reasoning,
            ignore_eos: req.ignore_eos,
            piece: String::with_capacity(max_piece),
            text: String::with_capacity(max_new.saturating_mul(8).min(TEXT_RESERVE)),
            calls,
        })
    }

    /// The opening of a tool call the last token completed, as the call grammar reads it.
    fn take_opened(&mut self) -> Option<String> {
        self.calls.as_mut()?.opened.take()
    }

    /// Passes this step's text through the tool-call watch: a call's text is kept, not
    /// emitted; answer text goes on to [`Output::emit`].
    fn watch_calls(&mut self, on_event: &mut dyn FnMut(Event<&str>) -> Flow) -> Step {
        let Some(calls) = &mut self.calls else {
            return self.emit(on_event);
        };
        if calls.calling {
            calls.text.push_str(&self.piece);
            self.piece.clear();
            return Step::Continue;
        }
        let Some(watch) = &mut calls.watch else {
            return self.emit(on_event);
        };
        match watch.push(&self.piece) {
            tools::Seen::Text(t) => {
                self.piece.clear();
                self.piece.push_str(&t);
                self.emit(on_event)
            }
            tools::Seen::Call { before, call } => {
                let trigger = watch.trigger();
                calls.calling = true;
                if !trigger.keep {
                    calls.text.push_str(trigger.text);
                }
                calls.text.push_str(&call);
                calls.opened = Some(call);
                self.piece.clear();
                self.piece.push_str(&before);
                match self.emit(on_event) {
                    Step::Continue => Step::Continue,
                    // A stop string before the call: the answer ends there.
                    other => {
                        if let Some(c) = &mut self.calls {
                            c.calling = false;
                            c.opened = None;
                        }
                        other
                    }
                }
            }
        }
    }

    /// The calls the answer made, if it made complete ones.
    fn tool_calls(&self) -> Option<Vec<(String, String)>> {
        self.calls.as_ref()?.parsed()
    }

    /// Whether the next token is answer text a grammar constrains: always, but with harmony
    /// only the `final` channel's content (reasoning stays free).
    fn constrained_now(&self) -> bool {
        self.harmony
            .as_ref()
            .is_none_or(|p| p.content_channel() == Some(Channel::Final))
    }

    /// Passes `piece` through the stop matcher and emits what is safe.
    fn emit(&mut self, on_event: &mut dyn FnMut(Event<&str>) -> Flow) -> Step {
        let Output {
            stops, text, piece, ..
        } = self;
        let (flow, hit) = stops.push(piece, |safe| {
            text.push_str(safe);
            on_event(Event::Delta(safe))
        });
        piece.clear();
        if hit {
            Step::Stop
        } else if flow.is_some_and(|f| f.is_break()) {
            Step::Cancelled
        } else {
            Step::Continue
        }
    }

    /// Emits `piece` as reasoning (when asked for and it is analysis text); whether the
    /// caller cancelled.
    fn emit_reasoning(&mut self, on_event: &mut dyn FnMut(Event<&str>) -> Flow) -> bool {
        let cancelled = self.include_reasoning
            && self.channel == Channel::Analysis
            && !self.piece.is_empty()
            && on_event(Event::Reasoning(&self.piece)).is_break();
        self.piece.clear();
        cancelled
    }

    fn push(
        &mut self,
        model: &Model,
        id: u32,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<Step, EngineError> {
        let tok = &model.tokenizer;
        if let Some(parser) = &mut self.harmony {
            let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
            return Ok(match parser.push(id, &decode) {
                harmony::Event::Stop { call } if !self.ignore_eos => {
                    if call && let Some(calls) = &mut self.calls {
                        self.reasoning.finish(tok, &mut self.piece)?;
                        self.reasoning.reset();
                        calls.text.push_str(&self.piece);
                        self.piece.clear();
                        let name = parser.header().recipient.as_deref().unwrap_or_default();
                        calls.made.push((
                            name.strip_prefix("functions.").unwrap_or(name).to_string(),
                            std::mem::take(&mut calls.text),
                        ));
                    }
                    Step::Stop
                }
                harmony::Event::Content {
                    channel: Channel::ToolCall,
                    id,
                } if self.calls.is_some() => {
                    self.reasoning.push(tok, id, &mut self.piece)?;
                    if let Some(calls) = &mut self.calls {
                        calls.text.push_str(&self.piece);
                    }
                    self.piece.clear();
                    Step::Continue
                }
                harmony::Event::Content {
                    channel: Channel::Final,
                    id,
                } => {
                    self.channel = Channel::Final;
                    self.detok.push(tok, id, &mut self.piece)?;
                    self.emit(on_event)
                }
                harmony::Event::Content { channel, id } => {
                    self.channel = channel;
                    self.reasoning.push(tok, id, &mut self.piece)?;
                    if self.emit_reasoning(on_event) {
                        return Ok(Step::Cancelled);
                    }
                    Step::Continue
                }
                harmony::Event::MessageEnd => {
                    self.reasoning.finish(tok, &mut self.piece)?;
                    self.reasoning.reset();
                    if self.emit_reasoning(on_event) {
                        return Ok(Step::Cancelled);
                    }
                    Step::Continue
                }
                _ => Step::Continue,
            });
        }
        if !self.ignore_eos && model.eos.contains(&id) {
            return Ok(Step::Stop);
        }
        self.detok.push(tok, id, &mut self.piece)?;
        Ok(self.watch_calls(on_event))
    }

    /// End of generation: release held-back text.
    fn flush(
        &mut self,
        model: &Model,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<(), EngineError> {
        self.detok.finish(&model.tokenizer, &mut self.piece)?;
        if let Some(calls) = &mut self.calls {
            if calls.calling {
                calls.text.push_str(&self.piece);
                self.piece.clear();
                // A call cut short (max_tokens) is not a call: its text is the answer's, so
                // nothing the model wrote is lost.
                if calls.format != ToolFormat::Harmony && calls.parsed().is_none() {
                    self.piece.push_str(&calls.text);
                    calls.calling = false;
                }
            } else if let Some(w) = &mut calls.watch {
                self.piece.insert_str(0, &w.finish());
            }
        }
        let Output {
            stops, text, piece, ..
        } = self;
        let (_, hit) = stops.push(piece, |safe| {
            text.push_str(safe);
            let _ = on_event(Event::Delta(safe));
        });
        piece.clear();
        if !hit {
            stops.finish(|rest| {
                text.push_str(rest);
                let _ = on_event(Event::Delta(rest));
            });
        }
        Ok(())
    }
}
