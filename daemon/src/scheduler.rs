//! Admission and queueing, between the transports and the engine thread.
//!
//! [`Scheduler::submit`] validates a request, renders and tokenizes its prompt (so a too-long
//! prompt is refused at once, not after waiting in line), and puts it in a bounded queue: when
//! `queue_depth` requests already wait, the answer is `busy`. One OS thread owns the [`Engine`]
//! (and so the backend and its KV cache) and runs queued requests one at a time, or, with
//! `[limits] parallel` > 1 and a backend with slots, up to `parallel` together
//! ([`run_batched`]: continuous batching; a request leaves the queue when a slot is free).
//!
//! Every accepted request ends with exactly one terminal event on its channel: `Done` with a
//! finish reason (`stop`, `length`, `cancelled`, `shutdown`) or `Error`. Each request has its
//! own [`CancellationToken`], a child of the scheduler's root token: cancelling it (or dropping
//! the receiver) ends that request with `cancelled`; cancelling the root (shutdown) ends the
//! running request with `shutdown` and answers queued ones `shutting_down`. A request that runs
//! past its deadline ends with `length` and the text generated so far.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
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
    /// Sequences decoded together (continuous batching), when the backend can.
    pub parallel: usize,
    pub max_new_tokens: usize,
    pub request_timeout: Duration,
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

/// A snapshot of the service, published on a [`watch`] channel whenever it changes, so health
/// and status are read without waiting behind inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Requests waiting behind the running ones.
    pub queue_length: usize,
    /// Requests running (prefilling or decoding): at most [`Scheduler::parallel`].
    pub running: usize,
}

/// Liveness of the engine thread, readable at any time (the systemd watchdog's input).
#[derive(Debug)]
pub struct EngineHealth {
    started: Instant,
    alive: AtomicBool,
    busy: AtomicBool,
    /// Milliseconds since `started` at the engine's last sign of progress.
    progress_ms: AtomicU64,
}

impl EngineHealth {
    fn new() -> Self {
        EngineHealth {
            started: Instant::now(),
            alive: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.progress_ms.store(ms, Ordering::Relaxed);
    }

    /// The engine thread is running and, if it is working on a request, has made progress (a
    /// prefill or a decoded token) within `stall`. An idle engine waiting for work is healthy.
    pub fn healthy(&self, stall: Duration) -> bool {
        if !self.alive.load(Ordering::Relaxed) {
            return false;
        }
        if !self.busy.load(Ordering::Relaxed) {
            return true;
        }
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < stall
    }
}

/// Marks the engine dead when its thread ends, by return or by panic.
struct AliveGuard(Arc<EngineHealth>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

/// Work for the engine thread.
enum Work {
    Run(Job),
    /// Run one forward pass and answer: the start-up heartbeat (READY=1 waits for it).
    Ping(oneshot::Sender<Result<(), String>>),
    /// Nothing to do: wakes an idle engine thread so it sees the shutdown.
    Wake,
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
    queue: mpsc::Sender<Work>,
    root: CancellationToken,
    /// Requests accepted and not finished (queued + running).
    in_flight: Arc<AtomicUsize>,
    status: Arc<watch::Sender<Status>>,
    health: Arc<EngineHealth>,
    parallel: usize,
    batch_steps: Arc<BatchSteps>,
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
        let shared = EngineShared {
            root: root.clone(),
            in_flight: in_flight.clone(),
            status: status.clone(),
            health: health.clone(),
            batch_steps: batch_steps.clone(),
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
            engine_thread: std::sync::Mutex::new(Some(engine_thread)),
        }
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
    pub fn submit(&self, mut req: Request) -> Result<Handle, ServiceError> {
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
            .prompt_ids(&req.input, req.reasoning_effort)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidRequest, e.to_string()))?;
        self.enqueue(req, prompt)
    }

    /// [`Scheduler::submit`] of a prompt already in token ids (`req.input` is not rendered):
    /// for tools and benchmarks.
    pub fn submit_ids(&self, mut req: Request, prompt: Vec<u32>) -> Result<Handle, ServiceError> {
        self.admit(&mut req)?;
        if prompt.is_empty() {
            return Err(ServiceError::new(ErrorCode::InvalidRequest, "empty prompt"));
        }
        self.enqueue(req, prompt)
    }

    /// The checks every request passes first: not shutting down, valid sampling, a positive
    /// `max_tokens` (capped at `[limits] max_new_tokens`).
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
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(Work::Run(job)) {
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

/// What the engine thread shares with the scheduler.
struct EngineShared {
    root: CancellationToken,
    in_flight: Arc<AtomicUsize>,
    status: Arc<watch::Sender<Status>>,
    health: Arc<EngineHealth>,
    batch_steps: Arc<BatchSteps>,
}

/// Decode steps run with continuous batching, by how many sequences each decoded: how full the
/// batches are (for operators and metrics; the tests read it to see sequences run together).
#[derive(Debug)]
pub struct BatchSteps {
    /// `counts[n]`: steps that decoded `n` sequences together (`n` up to 64, `parallel`'s most).
    counts: [AtomicU64; 65],
}

impl Default for BatchSteps {
    fn default() -> Self {
        BatchSteps {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl BatchSteps {
    fn add(&self, sequences: usize) {
        self.counts[sequences.min(64)].fetch_add(1, Ordering::Relaxed);
    }

    /// Steps per number of sequences decoded together (index 0 unused).
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

impl EngineShared {
    /// Publishes the state and the number of requests still waiting in `rx`.
    fn publish(&self, rx: &mpsc::Receiver<Work>, running: usize) {
        let state = if self.root.is_cancelled() || self.status.borrow().state == State::Stopping {
            State::Stopping
        } else if running > 0 {
            State::Busy
        } else {
            State::Ready
        };
        let queue_length = rx.len();
        self.status.send_if_modified(|s| {
            let next = Status {
                state,
                queue_length,
                running,
            };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    fn finish(&self, job: &Job, terminal: RequestEvent) {
        let _ = job.events.send(terminal);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine thread: runs work in order until shutdown, then answers what is left. With
/// `parallel` > 1 (slots enabled), sequences are batched ([`run_batched`]).
fn run_engine(
    engine: Engine,
    mut rx: mpsc::Receiver<Work>,
    shared: &EngineShared,
    parallel: usize,
) {
    if parallel > 1 {
        run_batched(engine, &mut rx, shared, parallel);
    } else {
        run_one_at_a_time(engine, &mut rx, shared);
    }
    drain(rx, shared);
}

fn run_one_at_a_time(mut engine: Engine, rx: &mut mpsc::Receiver<Work>, shared: &EngineShared) {
    let root = &shared.root;
    while let Some(work) = rx.blocking_recv() {
        let job = match work {
            Work::Ping(answer) => {
                shared.health.busy.store(true, Ordering::Relaxed);
                shared.health.tick();
                let _ = answer.send(engine.warm_up().map_err(|e| e.to_string()));
                shared.health.busy.store(false, Ordering::Relaxed);
                continue;
            }
            Work::Wake if root.is_cancelled() => break,
            Work::Wake => continue,
            Work::Run(job) => job,
        };
        shared.publish(rx, 1);
        shared.health.tick();
        shared.health.busy.store(true, Ordering::Relaxed);
        let terminal = if root.is_cancelled() {
            RequestEvent::Error(ServiceError::new(
                ErrorCode::ShuttingDown,
                "the service is stopping",
            ))
        } else if job.cancel.is_cancelled() || job.events.is_closed() {
            RequestEvent::Done(cancelled_before_start(&job))
        } else {
            run_job(&mut engine, &job, root, &shared.health)
        };
        shared.health.busy.store(false, Ordering::Relaxed);
        shared.finish(&job, terminal);
        shared.publish(rx, 0);
        if root.is_cancelled() {
            break;
        }
    }
}

/// After the loop: answers what is still queued `shutting_down`.
fn drain(mut rx: mpsc::Receiver<Work>, shared: &EngineShared) {
    rx.close();
    while let Ok(work) = rx.try_recv() {
        match work {
            Work::Run(job) => shared.finish(
                &job,
                RequestEvent::Error(ServiceError::new(
                    ErrorCode::ShuttingDown,
                    "the service is stopping",
                )),
            ),
            Work::Ping(answer) => {
                let _ = answer.send(Err("the service is stopping".into()));
            }
            Work::Wake => {}
        }
    }
    shared.publish(&rx, 0);
}

/// Bytes of text a request brings (message contents or the prompt).
fn input_bytes(input: &crate::api::Input) -> usize {
    match input {
        crate::api::Input::Prompt { text, .. } => text.len(),
        crate::api::Input::Messages(m) => m.iter().map(|m| m.content.len() + m.role.len()).sum(),
    }
}

/// A request running in the batched loop: its job, its sequence, and why it was cut short.
struct Active {
    job: Job,
    seq: crate::engine::Sequence,
    why: Option<Why>,
}

impl Active {
    /// Cancels the sequence when its caller cancelled or left, the service stops, or its
    /// deadline passed.
    fn check(&mut self, root: &CancellationToken) {
        if self.why.is_some() || self.seq.finished().is_some() {
            return;
        }
        self.why = if self.job.cancel.is_cancelled() || self.job.events.is_closed() {
            Some(if root.is_cancelled() {
                Why::Shutdown
            } else {
                Why::Cancelled
            })
        } else if Instant::now() >= self.job.deadline {
            Some(Why::Deadline)
        } else {
            None
        };
        if self.why.is_some() {
            self.seq.cancel();
        }
    }

    fn terminal(
        mut self,
        engine: &mut Engine,
        result: Result<(), EngineError>,
    ) -> (Job, RequestEvent) {
        let events = self.job.events.clone();
        let result = result.and_then(|()| {
            engine.complete(self.seq, &mut |e| {
                let _ = events.send(RequestEvent::Event(e));
                ControlFlow::Continue(())
            })
        });
        let why = self.why.take();
        (self.job, terminal_of(result, why))
    }
}

/// Continuous batching: up to `slots` sequences decode together, one token each per graph run.
/// A waiting request is taken when a slot is free; its prompt is prefilled in the single
/// cache one chunk per iteration, between the running sequences' steps (so a long prompt
/// does not freeze them), then copied into the free slot. Finished or cancelled sequences leave
/// at once; the others go on. The queue keeps its meaning: requests still in it are waiting.
fn run_batched(
    mut engine: Engine,
    rx: &mut mpsc::Receiver<Work>,
    shared: &EngineShared,
    slots: usize,
) {
    /// Prompt tokens per prefill step while others are decoding.
    const INTERLEAVED_CHUNK: usize = 64;
    let root = &shared.root;
    let mut running: Vec<Active> = Vec::new();
    let mut prefilling: Option<Active> = None;
    loop {
        // Take work: block when idle, else only what can start now.
        let idle = running.is_empty() && prefilling.is_none();
        let work = if root.is_cancelled() {
            None
        } else if idle {
            match rx.blocking_recv() {
                Some(w) => Some(w),
                None => break,
            }
        } else if prefilling.is_none() && running.len() < slots {
            rx.try_recv().ok()
        } else {
            None
        };
        match work {
            Some(Work::Ping(answer)) => {
                // Only taken when nothing prefills (the heartbeat uses the single cache).
                shared.health.tick();
                let _ = answer.send(engine.warm_up().map_err(|e| e.to_string()));
            }
            Some(Work::Wake) | None => {}
            Some(Work::Run(job)) => {
                if job.cancel.is_cancelled() || job.events.is_closed() {
                    let done = RequestEvent::Done(cancelled_before_start(&job));
                    shared.finish(&job, done);
                } else {
                    match engine.begin(&job.req, job.prompt.clone()) {
                        Ok(seq) => {
                            prefilling = Some(Active {
                                job,
                                seq,
                                why: None,
                            })
                        }
                        Err(e) => {
                            let terminal = terminal_of(Err(e), None);
                            shared.finish(&job, terminal);
                        }
                    }
                }
            }
        }
        let busy = !running.is_empty() || prefilling.is_some();
        shared.health.busy.store(busy, Ordering::Relaxed);
        shared.publish(rx, running.len() + usize::from(prefilling.is_some()));
        if !busy {
            if root.is_cancelled() {
                break;
            }
            continue;
        }
        shared.health.tick();

        // Cancellations, deadlines, shutdown.
        for a in running.iter_mut().chain(prefilling.as_mut()) {
            a.check(root);
        }

        // One prefill chunk of the joining sequence.
        if let Some(mut a) = prefilling.take() {
            let chunk = if running.is_empty() {
                usize::MAX
            } else {
                INTERLEAVED_CHUNK
            };
            let events = a.job.events.clone();
            let step = if a.seq.finished().is_some() {
                Ok(true)
            } else {
                engine.prefill_step(&mut a.seq, chunk, &mut |e| {
                    if events.send(RequestEvent::Event(e)).is_err() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
            };
            match step {
                Ok(false) => prefilling = Some(a),
                Ok(true) if a.seq.finished().is_none() => {
                    let free = (0..slots)
                        .find(|s| running.iter().all(|r| r.seq.slot != Some(*s)))
                        .expect("a prefill starts only when a slot is free");
                    match engine.store_slot(&mut a.seq, free) {
                        Ok(()) => running.push(a),
                        Err(e) => {
                            let (job, t) = a.terminal(&mut engine, Err(e));
                            shared.finish(&job, t);
                        }
                    }
                }
                Ok(true) => {
                    let (job, t) = a.terminal(&mut engine, Ok(()));
                    shared.finish(&job, t);
                }
                Err(e) => {
                    let (job, t) = a.terminal(&mut engine, Err(e));
                    shared.finish(&job, t);
                }
            }
        }

        // One decode step of every running sequence.
        let step = {
            let senders: Vec<_> = running.iter().map(|a| a.job.events.clone()).collect();
            let mut seqs: Vec<&mut crate::engine::Sequence> =
                running.iter_mut().map(|a| &mut a.seq).collect();
            engine.decode_slots(&mut seqs, slots, &mut |i, e| {
                if senders[i].send(RequestEvent::Event(e)).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        };
        if let Ok(n) = step
            && n > 0
        {
            shared.batch_steps.add(n);
        }
        let failed = step.err().map(|e| e.to_string());
        let mut i = 0;
        while i < running.len() {
            if failed.is_some() || running[i].seq.finished().is_some() {
                let a = running.swap_remove(i);
                let result = match &failed {
                    Some(msg) => Err(EngineError::Backend(
                        crate::backend::BackendError::Runtime {
                            context: "a batched decode step".into(),
                            msg: msg.clone(),
                        },
                    )),
                    None => Ok(()),
                };
                let (job, t) = a.terminal(&mut engine, result);
                shared.finish(&job, t);
            } else {
                i += 1;
            }
        }
    }
}

/// The terminal event of a request from its result and why it was cut short.
fn terminal_of(result: Result<Completion, EngineError>, why: Option<Why>) -> RequestEvent {
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

fn run_job(
    engine: &mut Engine,
    job: &Job,
    root: &CancellationToken,
    health: &EngineHealth,
) -> RequestEvent {
    // Why generation was cut short, decided by whichever check saw it first.
    let why = std::cell::Cell::new(None);
    let check = || {
        health.tick();
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
    terminal_of(result, why.get())
}
