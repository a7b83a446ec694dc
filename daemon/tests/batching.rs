//! Continuous batching (`[limits] parallel`): requests that run together get exactly the tokens
//! and the text each gets alone, whatever their lengths, sampling settings and stop strings,
//! with one cancelled midway; the status shows them running together. fp32 packages of the
//! fixtures on ONNX Runtime (the backend with slots): llama (full attention) batches; mistral
//! (sliding windows) and tract run one request at a time and say so (`Parallel` = 1).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::path::Path;
use std::time::Duration;

#[cfg(feature = "ort")]
use edgellm::api::{Completion, FinishReason, Input, Request};
#[cfg(feature = "ort")]
use edgellm::engine::Engine;
#[cfg(feature = "ort")]
use edgellm::scheduler::RequestEvent;
use edgellm::scheduler::{Limits, Scheduler};
use tokio_util::sync::CancellationToken;

fn scheduler(pkg: &Path, backend: &str, parallel: usize) -> Scheduler {
    let limits = Limits {
        queue_depth: 16,
        parallel,
        max_new_tokens: 1000,
        request_timeout: Duration::from_secs(300),
        stream_interval: 1,
    };
    Scheduler::start(
        common::small_step_engine(pkg, backend),
        limits,
        CancellationToken::new(),
    )
}

#[cfg(feature = "ort")]
/// Mixed prompts, lengths, sampling and stop strings; the last one is the one cancelled.
fn requests() -> Vec<Request> {
    let text = |t: &str| Input::Prompt {
        text: t.to_string(),
        raw: true,
    };
    let mut out = Vec::new();
    let mut r = Request::new(text("The sea is"));
    r.max_tokens = Some(24);
    r.sampling.temperature = 0.0;
    r.ignore_eos = true;
    out.push(r);
    let mut r = Request::new(text(
        "A much longer prompt that spans several prefill chunks of sixteen tokens each, so \
         that it joins while the others decode, step by step, and keeps going for a while more.",
    ));
    r.max_tokens = Some(40);
    r.sampling.temperature = 0.9;
    r.sampling.top_p = 0.9;
    r.sampling.seed = Some(7);
    r.ignore_eos = true;
    out.push(r);
    let mut r = Request::new(text("Count: one two"));
    r.max_tokens = Some(9);
    r.sampling.temperature = 0.7;
    r.sampling.top_k = 20;
    r.sampling.repetition_penalty = 1.3;
    r.sampling.seed = Some(3);
    r.ignore_eos = true;
    out.push(r);
    let mut r = Request::new(text("Stop strings end this one"));
    r.max_tokens = Some(60);
    r.sampling.temperature = 1.0;
    r.sampling.seed = Some(11);
    r.ignore_eos = true;
    out.push(r);
    let mut r = Request::new(text("This one is cancelled midway"));
    r.max_tokens = Some(200);
    r.sampling.temperature = 0.0;
    r.ignore_eos = true;
    out.push(r);
    out
}

#[cfg(feature = "ort")]
fn alone(engine: &mut Engine, req: &Request) -> Completion {
    engine.forget_cache();
    engine
        .generate(req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
}

#[cfg(feature = "ort")]
/// Submits every request at once and collects each one's deltas and terminal event; the last
/// request is cancelled after its third delta. Also the most sequences one decode step ran
/// together (0: no batched step ran).
async fn together(s: &Scheduler, reqs: &[Request]) -> (Vec<(String, Completion)>, usize) {
    let handles: Vec<_> = reqs.iter().map(|r| s.submit(r.clone()).unwrap()).collect();
    let last = handles.len() - 1;
    let mut tasks = Vec::new();
    for (i, mut h) in handles.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let (mut text, mut deltas) = (String::new(), 0);
            loop {
                match h.events.recv().await.expect("a terminal event") {
                    RequestEvent::Event(edgellm::api::Event::Delta(d)) => {
                        text.push_str(&d);
                        deltas += 1;
                        if i == last && deltas == 3 {
                            h.cancel.cancel();
                        }
                    }
                    RequestEvent::Event(_) => {}
                    RequestEvent::Done(c) => return (text, c),
                    RequestEvent::Error(e) => panic!("request {i}: {e}"),
                }
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    let steps = s.batch_steps().counts();
    let most = steps.iter().rposition(|&n| n > 0).unwrap_or(0);
    (out, most)
}

#[cfg(feature = "ort")]
/// Every request's tokens, text and finish reason as alone; the cancelled one a prefix of its
/// tokens alone. `stop` gets a stop string taken from its own answer alone, so it really stops.
async fn same_as_alone(pkg: &Path, parallel: usize, expect_parallel: usize) {
    let mut reqs = requests();
    let mut e = common::small_step_engine(pkg, "ort");
    let stop_source = alone(&mut e, &reqs[3]);
    let cut = stop_source
        .text
        .char_indices()
        .nth(12)
        .map_or(0, |(i, _)| i);
    let stop: String = stop_source.text[cut..].chars().take(3).collect();
    assert!(
        !stop.trim().is_empty(),
        "a stop string from {:?}",
        stop_source.text
    );
    reqs[3].stop = vec![stop];
    let solo: Vec<Completion> = reqs.iter().map(|r| alone(&mut e, r)).collect();
    assert_eq!(solo[3].finish_reason, FinishReason::Stop);
    drop(e);

    let s = scheduler(pkg, "ort", parallel);
    assert_eq!(s.parallel(), expect_parallel);
    let (got, most) = together(&s, &reqs).await;
    let last = reqs.len() - 1;
    for (i, ((text, c), want)) in got.iter().zip(&solo).enumerate() {
        if i == last {
            assert_eq!(c.finish_reason, FinishReason::Cancelled);
            assert!(
                c.token_ids.len() >= 3 && want.token_ids.starts_with(&c.token_ids),
                "the cancelled request's {} tokens are not a prefix of its tokens alone",
                c.token_ids.len()
            );
            continue;
        }
        assert_eq!(
            c.token_ids, want.token_ids,
            "request {i}: tokens differ from alone"
        );
        assert_eq!(c.text, want.text, "request {i}: text differs from alone");
        assert_eq!(
            text, &want.text,
            "request {i}: streamed text differs from alone"
        );
        assert_eq!(c.finish_reason, want.finish_reason, "request {i}");
    }
    // Batching really happened (or, where it cannot, really did not): requests join while the
    // first ones still decode, so steps decode 3 and more sequences together.
    match expect_parallel {
        1 => assert_eq!(most, 0, "one at a time: no batched step"),
        2 => assert_eq!(most, 2, "two slots"),
        _ => assert!(most >= 3, "at most {most} sequences decoded together"),
    }
    assert!(most <= expect_parallel);
}

#[cfg(feature = "ort")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_get_the_tokens_they_get_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::export_fp32("llama", tmp.path());
    same_as_alone(&pkg, 4, 4).await;
    // Fewer slots than requests: the others wait in the queue and join as slots free up.
    same_as_alone(&pkg, 2, 2).await;
}

#[cfg(feature = "ort")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_packages_run_one_at_a_time_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::export_fp32("mistral", tmp.path());
    same_as_alone(&pkg, 4, 1).await;
}

#[cfg(feature = "tract")]
#[test]
fn tract_runs_one_at_a_time_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::export_fp32("llama", tmp.path());
    let s = scheduler(&pkg, "tract", 4);
    assert_eq!(s.parallel(), 1);
}
