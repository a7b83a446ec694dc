//! One request's state while the engine runs it: its prompt, sampler, history, output
//! (detokenizer, stop matcher, harmony parser), timing, and its finish reason, decided once
//! here. Everything a step touches is sized when the sequence begins (the history for prompt
//! plus `max_new` tokens, the sampler's scratch for the vocabulary, fixed-capacity stops and
//! UTF-8 bytes), so once it runs a decode step allocates nothing outside the backend. The single-sequence loop ([`super::Engine::generate_with`]) and continuous batching
//! ([`super::Engine::prefill_step`], [`super::Engine::decode_slots`]) drive the same type.

use std::time::{Duration, Instant};

use super::{EngineError, Flow, Output, Step};
use crate::api::{Completion, Event, FinishReason, Request, Usage};
use crate::grammar::{Constraint, Grammar};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::tools::{ToolCall, When};

pub struct Sequence {
    pub(super) prompt: Vec<u32>,
    sampler: Sampler,
    out: Output,
    /// Prompt and generated tokens, for the sampler's penalties.
    history: Vec<u32>,
    generated: Vec<u32>,
    max_new: usize,
    /// Prompt tokens reused from the cache, and prompt tokens computed so far (with them).
    pub(super) cached_tokens: usize,
    pub(super) prefilled: usize,
    /// Tokens decided and not yet fed to the model: the last sampled one, then those a
    /// grammar forced after it (empty once the sequence has finished).
    pub(super) feed: Vec<u32>,
    /// The request's `response_format` or `grammar` (or its tools' call grammar), while it
    /// constrains the answer.
    constraint: Option<Constraint>,
    /// Which tokens the constraint applies to.
    when: When,
    /// A tool-call grammar waiting for the call to open (`tool_choice` auto).
    pending: Option<Grammar>,
    /// The batching slot holding this sequence's cache, once prefilled.
    pub slot: Option<usize>,
    start: Instant,
    first_token_at: Option<Instant>,
    /// Time inside the backend's forward pass while decoding.
    pub(super) forward: Duration,
    finish: Option<FinishReason>,
}

impl Sequence {
    pub(super) fn new(
        model: &Model,
        req: &Request,
        prompt: Vec<u32>,
        max_length: usize,
    ) -> Result<Self, EngineError> {
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let compiled = match &req.grammar {
            Some(g) => Some(g.clone()),
            None => model.compile_request(req.format.as_ref(), req.tools.as_deref())?,
        };
        let (constraint, pending, when) = match compiled {
            Some((g, w @ When::After(_))) => (None, Some(g), w),
            Some((g, w)) => (Some(Constraint::new(&g)), None, w),
            None => (None, None, When::Answer),
        };
        sampler.reserve(model.package.config.model.vocab_size);
        let room = max_length.saturating_sub(prompt.len());
        let max_new = req.max_tokens.map_or(room, |m| m.min(room));
        // Sized for the whole request: a step pushes without reallocating.
        let mut history = Vec::with_capacity(prompt.len() + max_new);
        history.extend_from_slice(&prompt);
        Ok(Sequence {
            sampler,
            out: Output::new(model, req, max_new, when)?,
            history,
            generated: Vec::with_capacity(max_new),
            max_new,
            cached_tokens: 0,
            prefilled: 0,
            // One sampled token per step; forced tokens may add more (constrained only).
            feed: Vec::with_capacity(1),
            constraint,
            when,
            pending,
            slot: None,
            start: Instant::now(),
            first_token_at: None,
            forward: Duration::ZERO,
            finish: None,
            prompt,
        })
    }

    /// Why the sequence ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Samples the next token from `logits` (among those the grammar allows, when one
    /// constrains this part of the answer), emits its text and decides whether the sequence
    /// ends here (end of sequence or stop string, a complete grammar, `max_tokens` or the
    /// context, the caller's `Break`). Otherwise the token, and any the grammar forces after
    /// it, wait in `feed` for the next forward pass.
    pub(super) fn accept(
        &mut self,
        model: &Model,
        logits: &[f32],
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<(), EngineError> {
        self.feed.clear();
        let constrained =
            self.constraint.is_some() && (self.when != When::Answer || self.out.constrained_now());
        let token = match &mut self.constraint {
            Some(c) if constrained => {
                let allowed = c.mask()?;
                self.sampler.sample_masked(logits, &self.history, allowed)
            }
            _ => self.sampler.sample(logits, &self.history),
        };
        self.first_token_at.get_or_insert_with(Instant::now);
        self.take(model, token, on_event)?;
        if let Some(opening) = self.out.take_opened()
            && let Some(g) = self.pending.take()
            && self.finish.is_none()
        {
            // A tool call opened: its grammar takes over from the text written so far.
            let mut c = Constraint::new(&g);
            let mut forced = Vec::new();
            let ids = model.tokenizer.encode(&opening, false)?;
            c.consume(&ids, &mut forced)?;
            self.constraint = Some(c);
            for f in forced {
                if self.finish.is_some() {
                    break;
                }
                self.take(model, f, on_event)?;
            }
        }
        if constrained
            && self.finish.is_none()
            && let Some(c) = &mut self.constraint
        {
            let mut forced = Vec::new();
            c.commit(token, &mut forced)?;
            let complete = c.is_complete();
            // The forced tokens are part of the answer even when they complete the grammar
            // (a closing `"}` after the last value).
            for f in forced {
                if self.finish.is_some() {
                    break;
                }
                self.take(model, f, on_event)?;
            }
            if complete && self.finish.is_none() {
                self.finish = Some(FinishReason::Stop);
                self.feed.clear();
            }
        }
        Ok(())
    }

    /// Appends `token` to the answer (sampled or forced), emits its text and decides whether
    /// the sequence ends with it; if not, it is to be fed to the model.
    fn take(
        &mut self,
        model: &Model,
        token: u32,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<(), EngineError> {
        self.generated.push(token);
        self.history.push(token);
        self.finish = match self.out.push(model, token, on_event)? {
            Step::Stop => Some(FinishReason::Stop),
            Step::Cancelled => Some(FinishReason::Cancelled),
            Step::Continue if self.generated.len() >= self.max_new => Some(FinishReason::Length),
            Step::Continue => None,
        };
        if self.finish.is_none() {
            self.feed.push(token);
        } else {
            self.feed.clear();
        }
        Ok(())
    }

    /// Ends the sequence before its next step (cancellation, deadline, shutdown: the caller
    /// maps `Cancelled` to its reason).
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
        self.feed.clear();
    }

    /// The request's result: flushes held-back text (unless cancelled) and measures usage.
    pub fn complete(
        mut self,
        model: &Model,
        on_event: &mut dyn FnMut(Event<&str>) -> Flow,
    ) -> Result<(Completion, super::Stats), EngineError> {
        let mut finish = self.finish.unwrap_or(FinishReason::Length);
        if finish != FinishReason::Cancelled {
            self.out.flush(model, on_event)?;
        }
        let tool_calls: Vec<ToolCall> = match self.out.tool_calls() {
            Some(calls) if finish == FinishReason::Stop => {
                finish = FinishReason::ToolCalls;
                calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: crate::tools::call_id(),
                        name,
                        arguments,
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let end = Instant::now();
        let ttft = self
            .first_token_at
            .map_or(end - self.start, |t| t - self.start);
        let decode = end.saturating_duration_since(self.first_token_at.unwrap_or(end));
        let n = self.generated.len();
        let usage = Usage {
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: n,
            ttft_ms: ttft.as_secs_f64() * 1e3,
            prefill_tok_s: (self.prompt.len() - self.cached_tokens) as f64
                / ttft.as_secs_f64().max(1e-9),
            decode_tok_s: if n > 1 {
                (n - 1) as f64 / decode.as_secs_f64().max(1e-9)
            } else {
                0.0
            },
            grammar_ms: self
                .constraint
                .as_ref()
                .map_or(0.0, |c| c.time.as_secs_f64() * 1e3),
            forced_tokens: self.constraint.as_ref().map_or(0, |c| c.forced),
        };
        let stats = super::Stats {
            decode,
            decode_forward: self.forward,
        };
        Ok((
            Completion {
                text: self.out.text,
                token_ids: self.generated,
                finish_reason: finish,
                tool_calls,
                usage,
            },
            stats,
        ))
    }
}
