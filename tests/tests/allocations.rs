//! Issue 13 §1: once a sequence runs, a decode step allocates nothing outside the backend's
//! forward pass (engine, sampler, stop matcher, detokenizer), alone and batched, greedy and
//! sampled, with stop strings; and a report of what each backend and transport allocates per
//! token (run with `-- --nocapture` to read it).
//!
//! A counting global allocator sees every allocation (`alloc`, `alloc_zeroed`, `realloc`) on
//! Rust's heap: per thread, split by whether the backend is running (a wrapper marks its
//! calls), and process-wide for every thread but the test's own clients. ONNX Runtime's own
//! (C++) allocations are not seen; its arena reuses its blocks from step to step.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgellm::api::{Event, Input, Request};
use edgellm::backend::{Backend, BackendChoice, BackendError, BackendOptions, KvSnapshot};
use edgellm::engine::{Engine, EventSink, Flow, Sequence, Slotted};
use edgellm_export::Precision;
use edgellm_tests::harness::{DbusBus, Mosquitto};
use edgellm_tests::service::*;
use serde_json::json;

struct Counting;

/// Allocations by every thread not marked as a test client.
static PROCESS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IN_BACKEND: Cell<bool> = const { Cell::new(false) };
    /// This thread's allocations outside and inside the backend.
    static OUTSIDE: Cell<u64> = const { Cell::new(0) };
    static INSIDE: Cell<u64> = const { Cell::new(0) };
    static CLIENT: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // `try_with`: a thread being torn down may still allocate.
    let _ = IN_BACKEND.try_with(|inside| {
        let cell = if inside.get() { &INSIDE } else { &OUTSIDE };
        let _ = cell.try_with(|c| c.set(c.get() + 1));
    });
    if !CLIENT.try_with(Cell::get).unwrap_or(false) {
        PROCESS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only
// atomics and const-initialized thread-locals (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests run one at a time: the process-wide count must see one test's work only.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This thread's (outside, inside the backend) allocation counts.
fn tally() -> (u64, u64) {
    (OUTSIDE.get(), INSIDE.get())
}

/// A backend whose calls count as the backend's.
struct Counted(Box<dyn Backend>);

fn inside<R>(f: impl FnOnce() -> R) -> R {
    IN_BACKEND.set(true);
    let r = f();
    IN_BACKEND.set(false);
    r
}

impl Backend for Counted {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn reset(&mut self) {
        inside(|| self.0.reset())
    }
    fn rewind(&mut self, len: usize) -> bool {
        inside(|| self.0.rewind(len))
    }
    fn snapshot(&mut self) -> Option<KvSnapshot> {
        inside(|| self.0.snapshot())
    }
    fn restore(&mut self, snapshot: &KvSnapshot) -> bool {
        inside(|| self.0.restore(snapshot))
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        inside(|| self.0.forward(tokens))
    }
    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        inside(|| self.0.forward_all(tokens))
    }
    fn enable_slots(&mut self, n: usize) -> Result<usize, String> {
        inside(|| self.0.enable_slots(n))
    }
    fn store_slot(&mut self, slot: usize) -> Result<(), BackendError> {
        inside(|| self.0.store_slot(slot))
    }
    fn decode_slots(&mut self, tokens: &[Option<u32>]) -> Result<&[f32], BackendError> {
        inside(|| self.0.decode_slots(tokens))
    }
}

const MAX_LENGTH: usize = 256;

fn engine(pkg: &std::path::Path, backend: BackendChoice) -> Engine {
    let opts = BackendOptions {
        threads: 1,
        max_length: MAX_LENGTH,
        ..BackendOptions::default()
    };
    let package = edgellm::package::Package::open(pkg).unwrap();
    let loaded = edgellm::backend::load(&package, backend, &opts).unwrap();
    Engine::new(
        edgellm::model::Model::load(pkg).unwrap(),
        Box::new(Counted(loaded.backend)),
        MAX_LENGTH,
    )
}

/// The settings under test: greedy; every filter (top-k in the heap); top-k past the heap.
fn requests() -> Vec<(&'static str, Request)> {
    let base = |prompt: &str| {
        let mut r = Request::new(Input::Prompt {
            text: prompt.into(),
            raw: true,
        });
        r.max_tokens = Some(48);
        r.ignore_eos = true;
        // Stops that do not occur: every step runs the matcher's search and hold-back.
        r.stop = vec![
            "never-ever-stop".into(),
            "\u{1F600}!".into(),
            "\n\n\n\n\n\n".into(),
        ];
        r
    };
    let mut greedy = base("The sea is");
    greedy.sampling.temperature = 0.0;
    let mut filters = base("Once upon a time, in a land far away,");
    filters.sampling.temperature = 0.8;
    filters.sampling.top_k = 40;
    filters.sampling.top_p = 0.9;
    filters.sampling.min_p = 0.02;
    filters.sampling.repetition_penalty = 1.1;
    filters.sampling.seed = Some(3);
    let mut wide = base("Count: one two three");
    wide.sampling.temperature = 1.0;
    wide.sampling.top_k = 300;
    wide.sampling.seed = Some(5);
    vec![
        ("greedy", greedy),
        ("filters", filters),
        ("top_k 300", wide),
    ]
}

/// Counts the text it is lent, allocating nothing.
#[derive(Default)]
struct Sink {
    bytes: Cell<usize>,
}

impl EventSink for Sink {
    fn send(&self, event: Event<&str>) -> Flow {
        let (Event::Delta(t) | Event::Reasoning(t)) = event;
        self.bytes.set(self.bytes.get() + t.len());
        ControlFlow::Continue(())
    }
}

struct Item {
    seq: Sequence,
    sink: Sink,
}

impl Slotted for Item {
    fn parts(&mut self) -> (&mut Sequence, &dyn EventSink) {
        (&mut self.seq, &self.sink)
    }
}

/// Per-step (outside, inside) allocation counts from consecutive snapshots.
fn steps(snaps: &[(u64, u64)]) -> Vec<(u64, u64)> {
    snaps
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1))
        .collect()
}

fn mean(v: &[(u64, u64)], inside: bool) -> f64 {
    let sum: u64 = v.iter().map(|s| if inside { s.1 } else { s.0 }).sum();
    sum as f64 / v.len().max(1) as f64
}

/// Each request of [`requests`] alone, on `backend`: the steps' allocations outside the
/// backend must be none; returns the report's lines.
fn alone(fixture: &str, pkg: &std::path::Path, backend: BackendChoice) -> Vec<String> {
    let mut report = Vec::new();
    let mut engine = engine(pkg, backend);
    assert!(engine.model().tokenizer.has_piece_table());
    for (name, req) in requests() {
        // One decode step runs between two calls of `keep_going`.
        let snaps = RefCell::new(Vec::with_capacity(64));
        let text = Cell::new(0usize);
        let prompt = engine.prompt_ids(&req).unwrap();
        let c = engine
            .generate_with(
                &req,
                prompt,
                &mut |e| {
                    let (Event::Delta(t) | Event::Reasoning(t)) = e;
                    text.set(text.get() + t.len());
                    ControlFlow::Continue(())
                },
                &|| {
                    snaps.borrow_mut().push(tally());
                    true
                },
            )
            .unwrap();
        assert_eq!(c.token_ids.len(), 48, "{fixture} {name}");
        let per_step = steps(&snaps.borrow());
        assert_eq!(
            per_step.len(),
            46,
            "{name}: 47 decode steps, 46 between them"
        );
        let outside: Vec<u64> = per_step.iter().map(|s| s.0).collect();
        assert!(
            outside.iter().all(|&n| n == 0),
            "{fixture} {} / {name}: allocations outside the backend per decode step: {outside:?}",
            backend.as_str()
        );
        report.push(format!(
            "{fixture:7} {:5} {name:10} alone: engine 0, backend {:.1} per step ({} bytes of text)",
            backend.as_str(),
            mean(&per_step, true),
            text.get()
        ));
    }
    report
}

#[test]
fn a_decode_step_allocates_nothing_outside_the_backend() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = edgellm_tests::export_fixture("qwen2", Precision::Fp32, false);
    let pkg = tmp.path().join("pkg");
    // A second architecture and vocabulary (the gpt-oss fixture's layers; its tokenizer has
    // no harmony tokens, so the plain text path: harmony headers are decoded with
    // `tokenizers`, once per message, which allocates).
    let harmony = edgellm_tests::export_fixture("gptoss", Precision::Fp32, false);
    let mut report = Vec::new();
    for backend in edgellm_tests::backends() {
        report.extend(alone("qwen2", &pkg, backend));
        report.extend(alone("gptoss", &harmony.path().join("pkg"), backend));
        let mut engine = engine(&pkg, backend);

        // Batched: three sequences in slots, one graph run per step.
        if engine.enable_slots(3).is_err() {
            report.push(format!(
                "{:5} (no slots: one sequence at a time)",
                backend.as_str()
            ));
            continue;
        }
        let mut items: Vec<Item> = Vec::with_capacity(3);
        for (slot, (_, req)) in requests().into_iter().enumerate() {
            let prompt = engine.prompt_ids(&req).unwrap();
            let mut seq = engine.begin(&req, prompt).unwrap();
            let sink = Sink::default();
            while !engine
                .prefill_step(&mut seq, usize::MAX, &mut |e| sink.send(e))
                .unwrap()
            {}
            engine.store_slot(&mut seq, slot).unwrap();
            items.push(Item { seq, sink });
        }
        let mut snaps = Vec::with_capacity(64);
        snaps.push(tally());
        while engine.decode_slots(&mut items).unwrap() > 0 {
            snaps.push(tally());
            if items.iter().all(|i| i.seq.finished().is_some()) {
                break;
            }
        }
        assert!(items.iter().all(|i| i.sink.bytes.get() > 0));
        let per_step = steps(&snaps);
        assert_eq!(
            per_step.len(),
            47,
            "each sequence decodes 47 tokens after its first"
        );
        let outside: Vec<u64> = per_step.iter().map(|s| s.0).collect();
        assert!(
            outside.iter().all(|&n| n == 0),
            "{} batched: allocations outside the backend per step: {outside:?}",
            backend.as_str()
        );
        report.push(format!(
            "{:5} 3 batched:   engine 0, backend {:.1} per step (3 tokens)",
            backend.as_str(),
            mean(&per_step, true)
        ));
    }
    println!("Rust heap allocations per decode step (qwen2 fixture, fp32):");
    for line in report {
        println!("  {line}");
    }
}

/// What the whole daemon allocates per streamed token over each transport: requests of two
/// lengths, so that per-request costs cancel; the clients' own allocations are not counted.
#[test]
fn each_transport_reports_its_allocations_per_token() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = edgellm_tests::export_fixture("qwen2", Precision::Fp32, false);
    let pkg = tmp.path().join("pkg");
    let backend = edgellm_tests::backends()[0].as_str();
    let dbus = DbusBus::start();
    let broker = Mosquitto::start();
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| CLIENT.set(true))
        .build()
        .unwrap();
    CLIENT.set(true);
    let config = config(
        backend,
        &pkg,
        Some(dbus.address()),
        Some(&broker.url()),
        "alloc",
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = daemon_rt.spawn(edgellm::run(config, shutdown.clone()));

    let report = client_rt.block_on(async {
        let c = loop {
            if let Ok(c) = bus(dbus.address()).await
                && get_property(&c, "State").await.is_ok()
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // D-Bus answering says nothing of MQTT: wait for the node's `online` too.
        mqtt_online(&broker.url(), "alloc").await;
        let mut mqtt = MqttClient::connect(&broker.url()).await;
        mqtt.subscribe("edgellm/alloc/response/#").await;
        let options = |n: u32| {
            opts(&[
                ("max_tokens", zbus::OwnedVariant::from(n)),
                ("temperature", zbus::OwnedVariant::from(0.0f64)),
            ])
        };
        // (allocations, tokens) of one streamed request over each transport. A first request
        // on each, not counted, takes the one-off costs (first runs, the MQTT session's
        // set-up); then three rounds of a short and a long request, the median per-token
        // figure of the three.
        let mut dbus_runs = Vec::new();
        let mut mqtt_runs = Vec::new();
        for (i, n) in [8u32, 8, 72, 8, 72, 8, 72].into_iter().enumerate() {
            let before = PROCESS.load(Ordering::Relaxed);
            let mut s = start_chat(&c, &user("Tell me about the sea"), &options(n))
                .await
                .unwrap();
            let (deltas, _, stats) = s.finish().await;
            let allocs = PROCESS.load(Ordering::Relaxed) - before;
            assert!(!deltas.is_empty());
            dbus_runs.push((allocs, stat_u32(&stats, "completion_tokens")));

            let before = PROCESS.load(Ordering::Relaxed);
            mqtt.publish(
                "edgellm/alloc/request",
                json!({"id": format!("a{i}"), "prompt": "Tell me about the sea",
                    "max_tokens": n, "temperature": 0, "stream": true})
                .to_string(),
            )
            .await;
            let (chunks, fin) = mqtt.until_done().await;
            let allocs = PROCESS.load(Ordering::Relaxed) - before;
            assert!(!chunks.is_empty());
            let tokens = fin.json["usage"]["completion_tokens"].as_u64().unwrap() as u32;
            mqtt_runs.push((allocs, tokens));
        }
        let per_token = |runs: &[(u64, u32)]| {
            let mut per: Vec<f64> = runs[1..]
                .chunks_exact(2)
                .map(|pair| {
                    let (a, b) = (pair[0], pair[1]);
                    assert!(
                        b.1 >= a.1 + 32,
                        "the long request must generate more tokens: {runs:?}"
                    );
                    (b.0 as f64 - a.0 as f64) / f64::from(b.1 - a.1)
                })
                .collect();
            per.sort_by(f64::total_cmp);
            per[per.len() / 2]
        };
        vec![
            (
                "D-Bus StartChat (streamed)",
                per_token(&dbus_runs),
                dbus_runs,
            ),
            ("MQTT (streamed)", per_token(&mqtt_runs), mqtt_runs),
        ]
    });
    shutdown.cancel();
    daemon_rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .expect("the daemon stopped")
        .expect("the daemon task")
        .expect("the daemon's result");
    println!(
        "Rust heap allocations of the whole daemon per streamed token ({backend}, qwen2 fixture; \
         engine 0, the rest is the backend, the event's copy to the transport, and the transport):"
    );
    for (name, per, runs) in &report {
        println!("  {name:28} {per:.1} per token   (runs: {runs:?} = (allocations, tokens))");
        // A ceiling ten times today's figure (about 40): a transport that started allocating
        // per byte of text, or a per-token leak into a growing structure, would break it.
        assert!(
            *per > 0.0 && *per < 400.0,
            "{name}: {per:.1} allocations per token"
        );
    }
}
