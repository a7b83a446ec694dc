//! Admission and queueing, between the transports and the engine thread.
//!
//! [`Scheduler::submit`] validates a request, renders and tokenizes its prompt (so a too-long
//! prompt is refused at once, not after waiting in line), and puts it in a bounded queue: when
//! `queue_depth` requests already wait, the answer is `busy`. One OS thread owns the [`Engine`]
//! (and so the backend and its KV cache) and runs queued requests one at a time.
//!
//! Every accepted request ends with exactly one terminal event on its channel: `Done` with a
//! finish reason (`stop`, `length`, `cancelled`, `shutdown`) or `Error`. Each request has its
//! own [`CancellationToken`], a child of the scheduler's root token: cancelling it (or dropping
//! the receiver) ends that request with `cancelled`; cancelling the root (shutdown) ends the
//! running request with `shutdown` and answers queued ones `shutting_down`. A request that runs
//! past its deadline ends with `length` and the text generated so far.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{Completion, Event, FinishReason, Request};
use crate::engine::{Engine, EngineError};
use crate::model::Model;

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
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

/// Limits applied at admission (from `[limits]` of the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub queue_depth: usize,
    pub max_new_tokens: usize,
    pub request_timeout: Duration,
}

struct Job {
    req: Request,
    prompt: Vec<u32>,
    events: mpsc::UnboundedSender<RequestEvent>,
    cancel: CancellationToken,
    deadline: Instant,
}

/// A submitted request: its events, and the token that cancels it.
#[derive(Debug)]
pub struct Handle {
    pub events: mpsc::UnboundedReceiver<RequestEvent>,
    pub cancel: CancellationToken,
}

pub struct Scheduler {
    model: Arc<Model>,
    max_length: usize,
    limits: Limits,
    queue: mpsc::Sender<Job>,
    root: CancellationToken,
    /// Requests accepted and not finished (queued + running).
    in_flight: Arc<AtomicUsize>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("limits", &self.limits)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Starts the engine thread. `root` cancelled = shutdown.
    pub fn start(engine: Engine, limits: Limits, root: CancellationToken) -> Self {
        let model = engine.model().clone();
        let max_length = engine.max_length();
        // The queue holds waiting requests; the running one has already left it.
        let (tx, rx) = mpsc::channel(limits.queue_depth.max(1));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let thread_root = root.clone();
        let thread_count = in_flight.clone();
        let engine_thread = std::thread::Builder::new()
            .name("edgellm-engine".into())
            .spawn(move || run_engine(engine, rx, thread_root, thread_count))
            .expect("spawning the engine thread");
        Scheduler {
            model,
            max_length,
            limits,
            queue: tx,
            root,
            in_flight,
            engine_thread: Some(engine_thread),
        }
    }

    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Validates, tokenizes and queues `req`.
    pub fn submit(&self, mut req: Request) -> Result<Handle, ServiceError> {
        if self.root.is_cancelled() {
            return Err(ServiceError::new(
                ErrorCode::ShuttingDown,
                "the service is stopping",
            ));
        }
        req.sampling
            .validate()
            .map_err(|e| ServiceError::new(ErrorCode::InvalidRequest, e.to_string()))?;
        if req.max_tokens == Some(0) {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                "max_tokens: must be positive",
            ));
        }
        req.max_tokens = Some(req.max_tokens.map_or(self.limits.max_new_tokens, |m| {
            m.min(self.limits.max_new_tokens)
        }));
        let prompt = self
            .model
            .prompt_ids(&req.input, req.reasoning_effort)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidRequest, e.to_string()))?;
        if prompt.len() >= self.max_length {
            return Err(ServiceError::new(
                ErrorCode::PromptTooLong,
                format!(
                    "prompt of {} tokens leaves no room to generate (max_length {})",
                    prompt.len(),
                    self.max_length
                ),
            ));
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let cancel = self.root.child_token();
        let job = Job {
            req,
            prompt,
            events: events_tx,
            cancel: cancel.clone(),
            deadline: Instant::now() + self.limits.request_timeout,
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(job) {
            Ok(()) => Ok(Handle {
                events: events_rx,
                cancel,
            }),
            Err(e) => {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ServiceError::new(
                        ErrorCode::Busy,
                        format!("{} requests are already waiting", self.limits.queue_depth),
                    ),
                    mpsc::error::TrySendError::Closed(_) => {
                        ServiceError::new(ErrorCode::ShuttingDown, "the engine has stopped")
                    }
                })
            }
        }
    }

    /// Shuts down (cancels the root token), closes the queue and waits for the engine thread:
    /// the running request ends with `shutdown`, queued ones with `shutting_down`.
    pub fn join(mut self) {
        self.root.cancel();
        // Dropping the only sender wakes an idle engine thread (its receive returns `None`).
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(t) = self.engine_thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine thread: runs jobs in order until shutdown, then answers what is left.
fn run_engine(
    mut engine: Engine,
    mut rx: mpsc::Receiver<Job>,
    root: CancellationToken,
    in_flight: Arc<AtomicUsize>,
) {
    while let Some(job) = rx.blocking_recv() {
        let events = job.events.clone();
        let terminal = if root.is_cancelled() {
            RequestEvent::Error(ServiceError::new(
                ErrorCode::ShuttingDown,
                "the service is stopping",
            ))
        } else if job.cancel.is_cancelled() || events.is_closed() {
            RequestEvent::Done(cancelled_before_start(&job))
        } else {
            run_job(&mut engine, &job, &root)
        };
        let _ = events.send(terminal);
        in_flight.fetch_sub(1, Ordering::Relaxed);
        if root.is_cancelled() {
            break;
        }
    }
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.events.send(RequestEvent::Error(ServiceError::new(
            ErrorCode::ShuttingDown,
            "the service is stopping",
        )));
        in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn cancelled_before_start(job: &Job) -> Completion {
    Completion {
        text: String::new(),
        token_ids: Vec::new(),
        finish_reason: FinishReason::Cancelled,
        usage: crate::api::Usage {
            prompt_tokens: job.prompt.len(),
            ..Default::default()
        },
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Why {
    Cancelled,
    Shutdown,
    Deadline,
}

fn run_job(engine: &mut Engine, job: &Job, root: &CancellationToken) -> RequestEvent {
    // Why generation was cut short, decided by whichever check saw it first.
    let why = std::cell::Cell::new(None);
    let check = || {
        if job.cancel.is_cancelled() || job.events.is_closed() {
            // A receiver that went away (caller disconnected) cancels the request.
            why.set(Some(if root.is_cancelled() {
                Why::Shutdown
            } else {
                Why::Cancelled
            }));
        } else if Instant::now() >= job.deadline {
            why.set(Some(Why::Deadline));
        }
        why.get().is_none()
    };
    let result = engine.generate_with(
        &job.req,
        job.prompt.clone(),
        &mut |event| {
            if job.events.send(RequestEvent::Event(event)).is_err() || !check() {
                check();
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
        &check,
    );
    let why = why.get();
    match result {
        Ok(mut c) => {
            if c.finish_reason == FinishReason::Cancelled {
                c.finish_reason = match why {
                    Some(Why::Shutdown) => FinishReason::Shutdown,
                    Some(Why::Deadline) => FinishReason::Length,
                    _ => FinishReason::Cancelled,
                };
            }
            RequestEvent::Done(c)
        }
        Err(EngineError::PromptTooLong { prompt, max_length }) => {
            RequestEvent::Error(ServiceError::new(
                ErrorCode::PromptTooLong,
                format!(
                    "prompt of {prompt} tokens leaves no room to generate (max_length {max_length})"
                ),
            ))
        }
        Err(e) => RequestEvent::Error(ServiceError::new(ErrorCode::Internal, e.to_string())),
    }
}
