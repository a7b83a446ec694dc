//! The engine thread's loop: it takes work from the scheduler's queue and runs it on the
//! [`Engine`], one request at a time ([`run_one_at_a_time`]) or, with slots, several together
//! ([`run_batched`]: continuous batching), until shutdown; then it answers what is left. Every
//! accepted request ends here with exactly one terminal event. The scheduler (admission and
//! the queue) builds the [`Job`]s and starts [`run_engine`] on its own OS thread.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Engine, EngineError, EventSink, Flow, Sequence, Slotted};
use crate::api::{
    Completion, ErrorCode, Event, FinishReason, Request, RequestEvent, ServiceError, State, Status,
};

/// A request's events go to its transport as owned copies (one allocation per event: the
/// text crosses to the transport's thread); a receiver gone (the caller left) cancels. A
/// request that is not streamed (`req.stream` false) gets only its completion: its events are
/// not sent, so no transport task is woken per token on a small board's few cores. With
/// `[limits] stream_interval` N > 1, answer text goes out N pieces at a time ([`Held`]).
impl EventSink for Job {
    fn send(&self, event: Event<&str>) -> Flow {
        let sent = if !self.req.stream {
            !self.events.is_closed()
        } else {
            match event {
                Event::Delta(text) => match self.held.push(text) {
                    Some(chunk) => self
                        .events
                        .send(RequestEvent::Event(Event::Delta(chunk)))
                        .is_ok(),
                    None => !self.events.is_closed(),
                },
                // Other events keep their order with the text: what is held goes first.
                other => {
                    self.flush_held();
                    self.events
                        .send(RequestEvent::Event(other.to_owned()))
                        .is_ok()
                }
            }
        };
        if sent {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }
}

/// Streamed answer text held back to go out `interval` pieces at a time (one piece is about
/// one token): the first piece goes at once (time to first token is unchanged), then a chunk
/// every `interval` pieces, and what is left goes before the request's next other event or its
/// terminal one ([`Job::flush_held`]), so the chunks always add up to the answer. Each chunk
/// is a socket write and a transport wake-up; on a board whose cores the engine fills, their
/// CPU comes out of decoding (docs/http-api.md, "What streaming costs").
#[derive(Debug)]
pub(crate) struct Held {
    interval: usize,
    /// Only the engine thread touches it; the lock keeps [`Job`] `Sync` and is never contended.
    state: std::sync::Mutex<(String, usize)>,
}

impl Held {
    pub(crate) fn new(interval: usize) -> Self {
        Held {
            interval: interval.max(1),
            // usize::MAX pieces held: nothing sent yet, so the first piece goes at once.
            state: std::sync::Mutex::new((String::new(), usize::MAX)),
        }
    }

    /// Adds a piece; the chunk to send now, if one is due.
    fn push(&self, piece: &str) -> Option<String> {
        if self.interval == 1 {
            return Some(piece.to_owned());
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (text, pieces) = &mut *state;
        text.push_str(piece);
        *pieces = pieces.saturating_add(1);
        if *pieces >= self.interval {
            *pieces = 0;
            Some(std::mem::take(text))
        } else {
            None
        }
    }

    /// The text held back, if any.
    fn take(&self) -> Option<String> {
        if self.interval == 1 {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (text, pieces) = &mut *state;
        if text.is_empty() {
            return None;
        }
        *pieces = 0;
        Some(std::mem::take(text))
    }
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
    pub(crate) fn new() -> Self {
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
pub(crate) struct AliveGuard(pub(crate) Arc<EngineHealth>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

/// Work for the engine thread.
pub(crate) enum Work {
    /// Boxed: a request (its format, its grammar) is large beside the other variants.
    Run(Box<Job>),
    /// Run one forward pass and answer: the start-up heartbeat (READY=1 waits for it).
    Ping(oneshot::Sender<Result<(), String>>),
    /// Nothing to do: wakes an idle engine thread so it sees the shutdown.
    Wake,
}

/// An admitted request: its prompt in ids, its channel, its cancellation and its deadline.
pub(crate) struct Job {
    pub(crate) req: Request,
    pub(crate) prompt: Vec<u32>,
    pub(crate) events: mpsc::UnboundedSender<RequestEvent>,
    pub(crate) cancel: CancellationToken,
    pub(crate) deadline: Instant,
    /// Streamed text not sent yet (`[limits] stream_interval`).
    pub(crate) held: Held,
}

impl Job {
    /// Sends the streamed text held back, if any (before another event or the terminal one).
    fn flush_held(&self) {
        if let Some(text) = self.held.take() {
            let _ = self.events.send(RequestEvent::Event(Event::Delta(text)));
        }
    }

    /// Why the request must stop now, if it must: cancelled (or its receiver went away: the
    /// caller disconnected), the service stopping, or its deadline passed.
    fn cut_short(&self, root: &CancellationToken) -> Option<Why> {
        if self.cancel.is_cancelled() || self.events.is_closed() {
            Some(if root.is_cancelled() {
                Why::Shutdown
            } else {
                Why::Cancelled
            })
        } else if Instant::now() >= self.deadline {
            Some(Why::Deadline)
        } else {
            None
        }
    }
}

/// What the engine thread shares with the scheduler.
pub(crate) struct EngineShared {
    pub(crate) root: CancellationToken,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) status: Arc<watch::Sender<Status>>,
    pub(crate) health: Arc<EngineHealth>,
    pub(crate) batch_steps: Arc<BatchSteps>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
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
        match &terminal {
            RequestEvent::Done(c) => self.metrics.finished(job.req.origin, Ok(c)),
            RequestEvent::Error(e) => self.metrics.finished(job.req.origin, Err(e.code)),
            RequestEvent::Event(_) => {}
        }
        job.flush_held();
        let _ = job.events.send(terminal);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine thread: runs work in order until shutdown, then answers what is left. With
/// `parallel` > 1 (slots enabled), sequences are batched ([`run_batched`]).
pub(crate) fn run_engine(
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
            Work::Run(job) => *job,
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

/// A request running in the batched loop: its job, its sequence, and why it was cut short.
struct Active {
    job: Job,
    seq: Sequence,
    why: Option<Why>,
}

impl Active {
    /// Cancels the sequence when its caller cancelled or left, the service stops, or its
    /// deadline passed.
    fn check(&mut self, root: &CancellationToken) {
        if self.why.is_some() || self.seq.finished().is_some() {
            return;
        }
        self.why = self.job.cut_short(root);
        if self.why.is_some() {
            self.seq.cancel();
        }
    }

    fn terminal(
        mut self,
        engine: &mut Engine,
        result: Result<(), EngineError>,
    ) -> (Job, RequestEvent) {
        let job = &self.job;
        let result = result.and_then(|()| {
            engine.complete(self.seq, &mut |e| {
                let _ = EventSink::send(job, e);
                ControlFlow::Continue(())
            })
        });
        let why = self.why.take();
        (self.job, terminal_of(result, why))
    }
}

impl Slotted for Active {
    fn parts(&mut self) -> (&mut Sequence, &dyn EventSink) {
        (&mut self.seq, &self.job)
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
            // Say so before waiting: the last sequence may just have left.
            shared.publish(rx, 0);
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
                let job = *job;
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
            let step = if a.seq.finished().is_some() {
                Ok(true)
            } else {
                let Active { seq, job, .. } = &mut a;
                engine.prefill_step(seq, chunk, &mut |e| EventSink::send(&*job, e))
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
        let step = engine.decode_slots(&mut running);
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
        tool_calls: Vec::new(),
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
        if why.get().is_none() {
            why.set(job.cut_short(root));
        }
        why.get().is_none()
    };
    let result = engine.generate_with(
        &job.req,
        job.prompt.clone(),
        &mut |event| {
            if EventSink::send(job, event).is_break() || !check() {
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

#[cfg(test)]
mod tests {
    use super::Held;

    #[test]
    fn held_text_goes_first_at_once_then_every_interval_pieces() {
        let h = Held::new(3);
        let sent: Vec<Option<String>> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|p| h.push(p))
            .collect();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            sent,
            [some("a"), None, None, some("bcd"), None, None, some("efg")]
        );
        assert_eq!(h.take(), None, "nothing is held after a full chunk");
        assert_eq!(h.push("h"), None);
        assert_eq!(h.take(), some("h"), "the rest goes before the end");
        assert_eq!(h.take(), None);
        // After a flush the count starts again: three more pieces make the next chunk.
        assert_eq!(h.push("i"), None);
        assert_eq!(h.push("j"), None);
        assert_eq!(h.push("k"), some("ijk"));

        let every = Held::new(1);
        assert_eq!(every.push("x"), some("x"));
        assert_eq!(every.push("y"), some("y"));
        assert_eq!(every.take(), None);
    }
}
