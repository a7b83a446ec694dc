//! Transport-neutral request, event and finish types: what D-Bus, MQTT and the CLI all
//! translate to and from (DESIGN.md, "Transports": OpenAI chat field names).

use crate::chat::Message;
use crate::chat::harmony::ReasoningEffort;
use crate::sampler::SamplingParams;

/// What to complete.
#[derive(Debug, Clone)]
pub enum Input {
    /// Rendered with the model's chat template (or harmony for gpt-oss).
    Messages(Vec<Message>),
    /// A plain prompt. `raw`: tokenized as transformers' `tokenizer(prompt)` would, without the
    /// chat template; otherwise sent as one user message.
    Prompt { text: String, raw: bool },
}

#[derive(Debug, Clone)]
pub struct Request {
    pub input: Input,
    /// Upper bound on generated tokens; `None`: as many as the context allows.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first one, which is not returned.
    pub stop: Vec<String>,
    /// gpt-oss only; default medium.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// gpt-oss: also stream the `analysis` channel (as [`Event::Reasoning`]).
    pub include_reasoning: bool,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// The transport it came through (metrics).
    pub origin: crate::metrics::Origin,
    /// Whether the caller reads the text as it is generated ([`Event`]s on the request's
    /// channel); `false` (a whole answer: D-Bus `Chat`, MQTT `"stream": false`, HTTP without
    /// `stream`): only the completion is sent, and the engine thread wakes no transport task
    /// per token.
    pub stream: bool,
    /// What the answer must match (`response_format`, `grammar`); `None`: free text.
    pub format: Option<crate::grammar::Format>,
    /// `tools` and `tool_choice`; `None`: no tools.
    pub tools: Option<std::sync::Arc<crate::tools::Tools>>,
    /// `format` (and the tools' call grammar) compiled, and when it applies: the scheduler
    /// compiles it when it admits the request (so an invalid one is refused before it is
    /// queued); left `None`, the engine compiles it.
    pub grammar: Option<(crate::grammar::Grammar, crate::tools::When)>,
}

impl Request {
    pub fn new(input: Input) -> Self {
        Request {
            input,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            reasoning_effort: None,
            include_reasoning: false,
            ignore_eos: false,
            origin: crate::metrics::Origin::local,
            stream: true,
            format: None,
            tools: None,
            grammar: None,
        }
    }
}

/// Streamed while a request runs. The engine lends its text (`Event<&str>`: its buffers are
/// reused, so a decode step allocates nothing); whoever keeps or sends it on owns a copy
/// (`Event<String>`, the default, what [`RequestEvent`] carries to the transports).
#[derive(Debug, Clone, PartialEq)]
pub enum Event<S = String> {
    /// Answer text, in order; concatenated they are the final text.
    Delta(S),
    /// gpt-oss analysis text, when asked for.
    Reasoning(S),
}

impl Event<&str> {
    /// An owned copy, to keep or to send to another thread.
    pub fn to_owned(&self) -> Event {
        match *self {
            Event::Delta(t) => Event::Delta(t.to_owned()),
            Event::Reasoning(t) => Event::Reasoning(t.to_owned()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    Cancelled,
    Shutdown,
    /// The answer is tool calls ([`Completion::tool_calls`]).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Shutdown => "shutdown",
            Self::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the cache (not computed): the
    /// common prefix with what the engine held.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// From the start of the prefill to the first sampled token.
    pub ttft_ms: f64,
    /// Prompt tokens computed (`prompt_tokens - cached_tokens`) per second of `ttft_ms`.
    pub prefill_tok_s: f64,
    /// Tokens after the first, per second of decoding.
    pub decode_tok_s: f64,
    /// Structured output: time spent computing token masks and forced tokens (0 without
    /// `response_format` or `grammar`).
    pub grammar_ms: f64,
    /// Structured output: completion tokens the grammar forced (taken without sampling).
    pub forced_tokens: usize,
}

/// The result of a finished request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Completion {
    pub text: String,
    /// Generated ids only (an end-of-sequence token included when one ended the answer).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// The calls the model made (finish reason `tool_calls`); empty otherwise.
    pub tool_calls: Vec<crate::tools::ToolCall>,
    pub usage: Usage,
}

// ------------------------------------------------------------------------------------------
// What the service answers: errors, a request's events, and its status.

/// Error codes of the wire protocols (DESIGN.md, "Transports").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Busy,
    InvalidRequest,
    PromptTooLong,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    /// The wire name (`busy`, `invalid_request`, ...), as both transports send it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Busy => "busy",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    Event(Event),
    /// Terminal: the request finished.
    Done(Completion),
    /// Terminal: the request failed.
    Error(ServiceError),
}

/// What the service is doing, as the transports and systemd's STATUS= report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Loading,
    Ready,
    Busy,
    Stopping,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Loading => "loading",
            State::Ready => "ready",
            State::Busy => "busy",
            State::Stopping => "stopping",
        }
    }
}

/// A snapshot of the service, published on a `tokio::sync::watch` channel whenever it changes, so health
/// and status are read without waiting behind inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Requests waiting behind the running ones.
    pub queue_length: usize,
    /// Requests running (prefilling or decoding): at most [`crate::scheduler::Scheduler::parallel`].
    pub running: usize,
}
