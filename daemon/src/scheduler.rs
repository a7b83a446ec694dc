//! Admission and queueing, between the transports and the engine thread, and nothing else.
//!
//! [`Scheduler::submit`] validates a request, renders and tokenizes its prompt (so a too-long
//! prompt is refused at once, not after waiting in line), and puts it in a bounded queue: when
//! `queue_depth` requests already wait, the answer is `busy`. One OS thread owns the [`Engine`]
//! (and so the backend and its KV cache) and runs the engine's loop over the queue
//! (`engine::serve`): one request at a time, or, with `[limits] parallel` > 1 and a backend
//! with slots, up to `parallel` together (continuous batching; a request leaves the queue when
//! a slot is free).
//!
//! Every accepted request ends with exactly one terminal event on its channel: `Done` with a
//! finish reason (`stop`, `length`, `cancelled`, `shutdown`) or `Error`. Each request has its
//! own [`CancellationToken`], a child of the scheduler's root token: cancelling it (or dropping
//! the receiver) ends that request with `cancelled`; cancelling the root (shutdown) ends the
//! running request with `shutdown` and answers queued ones `shutting_down`. A request that runs
//! past its deadline ends with `length` and the text generated so far.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::api::Request;
pub use crate::api::{ErrorCode, RequestEvent, ServiceError, State, Status};
use crate::engine::Engine;
use crate::engine::serve::{AliveGuard, EngineShared, Held, Job, Work, run_engine};
pub use crate::engine::{BatchSteps, EngineHealth};
use crate::metrics::Metrics;
use crate::model::Model;

/// Limits applied at admission (from `[limits]` of the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub queue_depth: usize,
    /// Sequences decoded together (continuous batching), when the backend can.
    pub parallel: usize,
    pub max_new_tokens: usize,
    pub request_timeout: Duration,
    /// Pieces of text per streamed chunk after the first (`[limits] stream_interval`; 1: each).
    pub stream_interval: usize,
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
    queue: mpsc::Sender<Work>,
    root: CancellationToken,
    /// Requests accepted and not finished (queued + running).
    in_flight: Arc<AtomicUsize>,
    status: Arc<watch::Sender<Status>>,
    health: Arc<EngineHealth>,
    parallel: usize,
    batch_steps: Arc<BatchSteps>,
    metrics: Arc<Metrics>,
    engine_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let status = Arc::new(watch::Sender::new(Status {
            state: State::Ready,
            queue_length: 0,
            running: 0,
        }));
        let mut engine = engine;
        let parallel = if limits.parallel > 1 {
            match engine.enable_slots(limits.parallel) {
                Ok(n) => {
                    tracing::info!("continuous batching: {n} sequences decode together");
                    n
                }
                Err(why) => {
                    tracing::warn!("parallel = {} not used: {why}", limits.parallel);
                    1
                }
            }
        } else {
            1
        };
        let health = Arc::new(EngineHealth::new());
        let batch_steps = Arc::new(BatchSteps::default());
        let metrics = Arc::new(Metrics::new());
        let shared = EngineShared {
            root: root.clone(),
            in_flight: in_flight.clone(),
            status: status.clone(),
            health: health.clone(),
            batch_steps: batch_steps.clone(),
            metrics: metrics.clone(),
        };
        let engine_thread = std::thread::Builder::new()
            .name("edgellm-engine".into())
            .spawn(move || {
                let _alive = AliveGuard(shared.health.clone());
                run_engine(engine, rx, &shared, parallel)
            })
            .expect("spawning the engine thread");
        Scheduler {
            model,
            max_length,
            limits,
            queue: tx,
            root,
            in_flight,
            status,
            health,
            parallel,
            batch_steps,
            metrics,
            engine_thread: std::sync::Mutex::new(Some(engine_thread)),
        }
    }

    /// What the service has served ([`Metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Batched decode steps so far, by how many sequences each decoded.
    pub fn batch_steps(&self) -> &BatchSteps {
        &self.batch_steps
    }

    /// Requests that run together: `[limits] parallel` when the backend batches, else 1.
    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// The service's state and queue length, updated as they change.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub fn health(&self) -> &Arc<EngineHealth> {
        &self.health
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Marks the service as stopping (before the shutdown itself), for status readers.
    pub fn set_stopping(&self) {
        self.status.send_modify(|s| s.state = State::Stopping);
    }

    /// The start-up heartbeat: the engine thread runs one forward pass (which also warms the
    /// backend up) and answers. Waits behind queued work, so call it before serving.
    pub async fn ping(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Work::Ping(tx))
            .await
            .map_err(|_| "the engine thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the engine thread stopped before answering".to_string())?
    }

    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Validates, tokenizes and queues `req`.
    pub fn submit(&self, req: Request) -> Result<Handle, ServiceError> {
        let origin = req.origin;
        self.submit_text(req)
            .inspect_err(|e| self.metrics.refused(origin, e.code))
    }

    fn submit_text(&self, mut req: Request) -> Result<Handle, ServiceError> {
        self.admit(&mut req)?;
        // A prompt whose text alone could not fit is refused before tokenizing it (a 10 MB
        // prompt took seconds to tokenize just to be refused).
        let bytes = input_bytes(&req.input);
        let bound = self.model.max_prompt_bytes(self.max_length);
        if bytes > bound {
            return Err(ServiceError::new(
                ErrorCode::PromptTooLong,
                format!(
                    "prompt of {bytes} bytes cannot fit in max_length {} tokens (at most {bound} \
                     bytes could)",
                    self.max_length
                ),
            ));
        }
        let prompt = self
            .model
            .request_ids(&req)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidRequest, e.to_string()))?;
        self.enqueue(req, prompt)
    }

    /// [`Scheduler::submit`] of a prompt already in token ids (`req.input` is not rendered):
    /// for tools and benchmarks.
    pub fn submit_ids(&self, mut req: Request, prompt: Vec<u32>) -> Result<Handle, ServiceError> {
        let origin = req.origin;
        self.admit(&mut req)
            .and_then(|()| {
                if prompt.is_empty() {
                    return Err(ServiceError::new(ErrorCode::InvalidRequest, "empty prompt"));
                }
                self.enqueue(req, prompt)
            })
            .inspect_err(|e| self.metrics.refused(origin, e.code))
    }

    /// The checks every request passes first: not shutting down, valid sampling, a positive
    /// `max_tokens` (capped at `[limits] max_new_tokens`), an output format that compiles.
    fn admit(&self, req: &mut Request) -> Result<(), ServiceError> {
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
        // An invalid schema or grammar is refused here, before anything is queued; the
        // engine clones the compiled parser.
        if req.grammar.is_none() {
            req.grammar = self
                .model
                .compile_request(req.format.as_ref(), req.tools.as_deref())
                .map_err(|e| ServiceError::new(ErrorCode::InvalidRequest, e.0))?;
        }
        Ok(())
    }

    /// Queues a request whose prompt is tokenized.
    fn enqueue(&self, req: Request, prompt: Vec<u32>) -> Result<Handle, ServiceError> {
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
            held: Held::new(self.limits.stream_interval),
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(Work::Run(Box::new(job))) {
            Ok(()) => {
                let waiting = self.limits.queue_depth.max(1) - self.queue.capacity();
                self.status.send_if_modified(|s| {
                    let changed = s.queue_length != waiting;
                    s.queue_length = waiting;
                    changed
                });
                Ok(Handle {
                    events: events_rx,
                    cancel,
                })
            }
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

    /// [`Scheduler::submit`] from async code: tokenizing a long prompt takes a while, so on a
    /// multi-threaded runtime the worker hands its other tasks (status reads, other requests)
    /// to the rest of the pool meanwhile.
    pub fn submit_from_async(&self, req: Request) -> Result<Handle, ServiceError> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.submit(req))
            }
            _ => self.submit(req),
        }
    }

    /// Starts the shutdown: cancels the root token (the running request ends with `shutdown`,
    /// queued ones with `shutting_down`, new ones are refused) and wakes an idle engine thread.
    pub fn shutdown(&self) {
        self.set_stopping();
        self.root.cancel();
        // If the queue is full the engine is busy and sees the cancellation after this request.
        let _ = self.queue.try_send(Work::Wake);
    }

    /// [`Scheduler::shutdown`], then waits for the engine thread (blocking: call it from a
    /// blocking context) until every accepted request has had its terminal event.
    pub fn join(&self) {
        self.shutdown();
        let handle = self
            .engine_thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = handle {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.join();
    }
}

/// Bytes of text a request brings (message contents or the prompt).
fn input_bytes(input: &crate::api::Input) -> usize {
    match input {
        crate::api::Input::Prompt { text, .. } => text.len(),
        crate::api::Input::Messages(m) => m.iter().map(|m| m.content.len() + m.role.len()).sum(),
    }
}
