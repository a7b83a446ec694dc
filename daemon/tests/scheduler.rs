//! The scheduler's promises: admission errors come at once (`invalid_request`,
//! `prompt_too_long`, `busy`), every accepted request ends with exactly one terminal event,
//! cancellation (token or dropped receiver) ends a request with `cancelled`, a deadline ends it
//! with `length`, and shutdown ends the running request with `shutdown` and queued ones with
//! `shutting_down`. The backend is scripted and slowed down so queues actually fill.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::time::Duration;

use edgellm::api::{FinishReason, Input, Request};
use edgellm::engine::Engine;
use edgellm::model::Model;
use edgellm::scheduler::{ErrorCode, Handle, Limits, RequestEvent, Scheduler};
use tokio_util::sync::CancellationToken;

fn start(
    tmp: &std::path::Path,
    queue_depth: usize,
    timeout: Duration,
) -> (Scheduler, CancellationToken) {
    start_with_delay(tmp, queue_depth, timeout, Duration::from_millis(10))
}

fn start_with_delay(
    tmp: &std::path::Path,
    queue_depth: usize,
    timeout: Duration,
    delay: Duration,
) -> (Scheduler, CancellationToken) {
    let pkg = common::export("qwen2", tmp);
    let model = Model::load(&pkg).unwrap();
    let script = model
        .tokenizer
        .encode("Hello world, again and again", false)
        .unwrap();
    let backend = common::Scripted::new(script, 512, delay);
    let root = CancellationToken::new();
    let limits = Limits {
        queue_depth,
        parallel: 1,
        max_new_tokens: 1000,
        request_timeout: timeout,
        stream_interval: 1,
    };
    (
        Scheduler::start(
            Engine::new(model, Box::new(backend), 256),
            limits,
            root.clone(),
        ),
        root,
    )
}

fn request(max_tokens: usize) -> Request {
    let mut r = Request::new(Input::Prompt {
        text: "hi".into(),
        raw: true,
    });
    r.max_tokens = Some(max_tokens);
    r.sampling.temperature = 0.0;
    r.ignore_eos = true;
    r
}

/// Drains a handle; returns (streamed events, terminal events).
async fn finish(mut h: Handle) -> (usize, Vec<RequestEvent>) {
    let (mut events, mut terminal) = (0, Vec::new());
    while let Some(e) = h.events.recv().await {
        match e {
            RequestEvent::Event(_) => {
                assert!(terminal.is_empty(), "an event after the terminal one");
                events += 1;
            }
            other => terminal.push(other),
        }
    }
    (events, terminal)
}

fn done_reason(t: &[RequestEvent]) -> FinishReason {
    match t {
        [RequestEvent::Done(c)] => c.finish_reason,
        other => panic!("expected exactly one Done, got {other:?}"),
    }
}

#[tokio::test]
async fn a_full_queue_answers_busy_and_every_accepted_request_ends_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _root) = start(tmp.path(), 2, Duration::from_secs(60));
    let first = s.submit(request(20)).unwrap();
    // Wait until the first request runs, so the queue holds exactly the next two.
    let mut first = first;
    assert!(matches!(
        first.events.recv().await,
        Some(RequestEvent::Event(_))
    ));
    let queued: Vec<Handle> = (0..2).map(|_| s.submit(request(5)).unwrap()).collect();
    let busy = s.submit(request(5)).unwrap_err();
    assert_eq!(busy.code, ErrorCode::Busy);
    assert_eq!(s.in_flight(), 3);
    let (_, t) = finish(first).await;
    assert_eq!(done_reason(&t), FinishReason::Length);
    for h in queued {
        let (_, t) = finish(h).await;
        assert_eq!(done_reason(&t), FinishReason::Length);
    }
    assert_eq!(s.in_flight(), 0);
    s.join();
}

#[tokio::test]
async fn admission_errors_are_immediate_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _root) = start(tmp.path(), 2, Duration::from_secs(60));
    let mut bad = request(5);
    bad.sampling.top_p = 2.0;
    let e = s.submit(bad).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("top_p"), "{e}");
    let e = s.submit(request(0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    let long = Request::new(Input::Prompt {
        text: "word ".repeat(300),
        raw: true,
    });
    assert_eq!(s.submit(long).unwrap_err().code, ErrorCode::PromptTooLong);
    let empty = Request::new(Input::Messages(vec![]));
    assert_eq!(s.submit(empty).unwrap_err().code, ErrorCode::InvalidRequest);
    // Still serving.
    let (events, t) = finish(s.submit(request(3)).unwrap()).await;
    assert!(events > 0);
    assert_eq!(done_reason(&t), FinishReason::Length);
    s.join();
}

#[tokio::test]
async fn cancel_mid_generation_reports_cancelled_and_a_dropped_caller_cancels_too() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _root) = start(tmp.path(), 2, Duration::from_secs(60));
    let mut h = s.submit(request(500)).unwrap();
    assert!(matches!(
        h.events.recv().await,
        Some(RequestEvent::Event(_))
    ));
    h.cancel.cancel();
    let (_, t) = finish(h).await;
    match &t[..] {
        [RequestEvent::Done(c)] => {
            assert_eq!(c.finish_reason, FinishReason::Cancelled);
            assert!(c.token_ids.len() < 500);
        }
        other => panic!("{other:?}"),
    }
    // A caller that goes away: its request stops, and the next one is served promptly.
    // Uncancelled, it would take 2000 x 10 ms = 20 s.
    let mut gone = s.submit(request(2000)).unwrap();
    assert!(matches!(
        gone.events.recv().await,
        Some(RequestEvent::Event(_))
    ));
    drop(gone);
    let started = std::time::Instant::now();
    let (_, t) = finish(s.submit(request(3)).unwrap()).await;
    assert_eq!(done_reason(&t), FinishReason::Length);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the abandoned request kept the engine busy"
    );
    s.join();
}

#[tokio::test]
async fn a_deadline_ends_the_request_with_length_and_its_partial_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _root) = start(tmp.path(), 2, Duration::from_millis(200));
    let (events, t) = finish(s.submit(request(500)).unwrap()).await;
    match &t[..] {
        [RequestEvent::Done(c)] => {
            assert_eq!(c.finish_reason, FinishReason::Length);
            assert!(!c.text.is_empty() && c.token_ids.len() < 500);
            assert!(events > 0);
        }
        other => panic!("{other:?}"),
    }
    s.join();
}

#[tokio::test]
async fn shutdown_ends_running_with_shutdown_and_queued_with_shutting_down() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, root) = start(tmp.path(), 4, Duration::from_secs(60));
    let mut running = s.submit(request(500)).unwrap();
    assert!(matches!(
        running.events.recv().await,
        Some(RequestEvent::Event(_))
    ));
    let queued: Vec<Handle> = (0..3).map(|_| s.submit(request(5)).unwrap()).collect();
    root.cancel();
    let (_, t) = finish(running).await;
    assert_eq!(done_reason(&t), FinishReason::Shutdown);
    for h in queued {
        let (_, t) = finish(h).await;
        match &t[..] {
            [RequestEvent::Error(e)] => assert_eq!(e.code, ErrorCode::ShuttingDown),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        s.submit(request(5)).unwrap_err().code,
        ErrorCode::ShuttingDown
    );
    s.join();
}

/// The watchdog's input: healthy while idle and while a long generation makes progress token
/// by token; unhealthy when one step takes longer than the stall limit (a wedged backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_health_follows_progress_not_request_length() {
    let tmp = tempfile::tempdir().unwrap();
    let stall = Duration::from_millis(300);
    let (s, _root) = start(tmp.path(), 2, Duration::from_secs(60));
    assert!(s.health().healthy(stall));
    let mut h = s.submit(request(80)).unwrap();
    // ~0.8 s of generation, far longer than the stall limit, healthy throughout.
    assert!(matches!(
        h.events.recv().await,
        Some(RequestEvent::Event(_))
    ));
    // Every event to the terminal one (a slow step must not end the check early).
    let mut events = 1;
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), h.events.recv())
            .await
            .expect("the generation stalled")
            .expect("the request ended without a terminal event");
        assert!(
            s.health().healthy(stall),
            "unhealthy during a progressing generation (after {events} events)"
        );
        if !matches!(e, RequestEvent::Event(_)) {
            break;
        }
        events += 1;
    }
    assert!(
        events >= 40,
        "only {events} events: the generation was not followed"
    );
    assert!(s.health().healthy(stall));
    s.join();

    let tmp = tempfile::tempdir().unwrap();
    let (s, _root) = start_with_delay(
        tmp.path(),
        2,
        Duration::from_secs(60),
        Duration::from_millis(1200),
    );
    let _h = s.submit(request(3)).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !s.health().healthy(stall),
        "a stuck step must stop the watchdog"
    );
    s.join();
    assert!(
        !s.health().healthy(stall),
        "a stopped engine thread is not alive"
    );
}
