//! The daemon's metrics, in the Prometheus/OpenMetrics text format (`GET /metrics` on the HTTP
//! transport), with the Prometheus project's own Rust client (`prometheus-client`).
//!
//! Requests are counted where they end, once each: refused at admission
//! ([`Metrics::refused`], by the scheduler) or answered by the engine thread
//! ([`Metrics::finished`]: the finish reason or error code, the tokens, the time to first token
//! and the time per output token). Every count carries the transport the request came through
//! ([`Origin`]). Gauges that describe the present (queue length, running sequences, KV slots in
//! use, the process's RSS) are read when the metrics are scraped.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{Completion, ErrorCode, Status};

/// The transport a request came through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values, as they appear in the metrics
pub enum Origin {
    dbus,
    mqtt,
    http,
    /// In-process (the CLI, benchmarks, tests).
    #[default]
    local,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    transport: Origin,
    /// The finish reason (`stop`, `length`, `cancelled`, `shutdown`) or the error code
    /// (`busy`, `invalid_request`, `prompt_too_long`, `shutting_down`, `internal`).
    outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InfoLabels {
    model: String,
    backend: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    completion_tokens: Counter,
    ttft: Histogram,
    per_token: Histogram,
    queue: Gauge,
    running: Gauge,
    slots_in_use: Gauge,
    parallel: Gauge,
    info: Family<InfoLabels, Gauge>,
    load_seconds: Gauge<f64, AtomicU64>,
    rss: Gauge,
    /// Requests ended, every transport and outcome together (the MQTT status, D-Bus).
    ended: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgellm");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests ended, by transport and outcome (finish reason or error code)",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            prompt_tokens.clone(),
        );
        let cached_tokens = Counter::default();
        registry.register(
            "cached_tokens",
            "Prompt tokens reused from the KV cache instead of computed",
            cached_tokens.clone(),
        );
        let completion_tokens = Counter::default();
        registry.register(
            "completion_tokens",
            "Generated tokens of finished requests",
            completion_tokens.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "time_to_first_token_seconds",
            "From the start of a request's prefill to its first token",
            ttft.clone(),
        );
        let per_token = Histogram::new(exponential_buckets(0.002, 2.0, 11));
        registry.register(
            "time_per_output_token_seconds",
            "A request's decode time per token after the first",
            per_token.clone(),
        );
        let queue = Gauge::default();
        registry.register("queue_length", "Requests waiting", queue.clone());
        let running = Gauge::default();
        registry.register(
            "running_sequences",
            "Requests prefilling or decoding",
            running.clone(),
        );
        let slots_in_use = Gauge::default();
        registry.register(
            "kv_slots_in_use",
            "Batching slots of KV cache holding a running sequence",
            slots_in_use.clone(),
        );
        let parallel = Gauge::default();
        registry.register(
            "parallel",
            "Sequences that can decode together ([limits] parallel as served)",
            parallel.clone(),
        );
        let info = Family::<InfoLabels, Gauge>::default();
        registry.register(
            "model_info",
            "The model served and its backend",
            info.clone(),
        );
        let load_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "model_load_seconds",
            "Time to load the model and answer the start-up heartbeat",
            load_seconds.clone(),
        );
        let rss = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident set size of edgellmd",
            rss.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            ttft,
            per_token,
            queue,
            running,
            slots_in_use,
            parallel,
            info,
            load_seconds,
            rss,
            ended: AtomicU64::new(0),
        }
    }

    /// Requests ended so far (any transport, any outcome) and tokens generated: what the MQTT
    /// status and D-Bus's `RequestsTotal` and `CompletionTokensTotal` report.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.ended.load(std::sync::atomic::Ordering::Relaxed),
            self.completion_tokens.get(),
        )
    }

    /// The facts of the model served, once it is loaded.
    pub fn loaded(&self, model: &str, backend: &str, parallel: usize, seconds: f64) {
        self.info
            .get_or_create(&InfoLabels {
                model: model.to_owned(),
                backend: backend.to_owned(),
            })
            .set(1);
        self.parallel.set(parallel as i64);
        self.load_seconds.set(seconds);
    }

    /// A request refused before it was queued.
    pub fn refused(&self, origin: Origin, code: ErrorCode) {
        self.count(origin, code.as_str());
    }

    /// A request the engine ended: its answer (finish reason, tokens, latencies) or its error.
    pub fn finished(&self, origin: Origin, result: Result<&Completion, ErrorCode>) {
        let c = match result {
            Ok(c) => c,
            Err(code) => return self.count(origin, code.as_str()),
        };
        self.count(origin, c.finish_reason.as_str());
        let u = &c.usage;
        self.prompt_tokens.inc_by(u.prompt_tokens as u64);
        self.cached_tokens.inc_by(u.cached_tokens as u64);
        self.completion_tokens.inc_by(u.completion_tokens as u64);
        if u.completion_tokens > 0 {
            self.ttft.observe(u.ttft_ms / 1e3);
        }
        if u.decode_tok_s > 0.0 {
            self.per_token.observe(1.0 / u.decode_tok_s);
        }
    }

    fn count(&self, origin: Origin, outcome: &str) {
        self.ended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.requests
            .get_or_create(&RequestLabels {
                transport: origin,
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Requests ended through `origin` with `outcome`, so far (the MQTT status and tests).
    pub fn requests(&self, origin: Origin, outcome: &str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                transport: origin,
                outcome: outcome.to_owned(),
            })
            .get()
    }

    /// The text exposition, with the gauges of the present read from `status`.
    pub fn encode(&self, status: Status, batching: bool) -> String {
        self.queue.set(status.queue_length as i64);
        self.running.set(status.running as i64);
        self.slots_in_use
            .set(if batching { status.running as i64 } else { 0 });
        if let Some(rss) = resident_bytes() {
            self.rss.set(rss as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// This process's resident set size, from `/proc/self/statm` (pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FinishReason, State, Usage};

    #[test]
    fn counts_carry_transport_and_outcome_and_gauges_read_the_status() {
        let m = Metrics::new();
        m.loaded("smollm2", "ort", 4, 1.5);
        m.refused(Origin::http, ErrorCode::Busy);
        let c = Completion {
            text: "hi".into(),
            token_ids: vec![1, 2, 3],
            finish_reason: FinishReason::Length,
            tool_calls: Vec::new(),
            usage: Usage {
                prompt_tokens: 10,
                cached_tokens: 4,
                completion_tokens: 3,
                ttft_ms: 40.0,
                prefill_tok_s: 150.0,
                decode_tok_s: 50.0,
                ..Usage::default()
            },
        };
        m.finished(Origin::mqtt, Ok(&c));
        m.finished(Origin::dbus, Err(ErrorCode::Internal));
        assert_eq!(m.requests(Origin::mqtt, "length"), 1);
        assert_eq!(m.totals(), (3, 3));
        let text = m.encode(
            Status {
                state: State::Busy,
                queue_length: 2,
                running: 3,
            },
            true,
        );
        for line in [
            "edgellm_requests_total{transport=\"http\",outcome=\"busy\"} 1",
            "edgellm_requests_total{transport=\"mqtt\",outcome=\"length\"} 1",
            "edgellm_requests_total{transport=\"dbus\",outcome=\"internal\"} 1",
            "edgellm_prompt_tokens_total 10",
            "edgellm_cached_tokens_total 4",
            "edgellm_completion_tokens_total 3",
            "edgellm_time_to_first_token_seconds_count 1",
            "edgellm_time_per_output_token_seconds_count 1",
            "edgellm_queue_length 2",
            "edgellm_running_sequences 3",
            "edgellm_kv_slots_in_use 3",
            "edgellm_parallel 4",
            "edgellm_model_info{model=\"smollm2\",backend=\"ort\"} 1",
            "edgellm_model_load_seconds 1.5",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.contains("edgellm_process_resident_memory_bytes "));
        assert!(text.ends_with("# EOF\n"));
    }
}
