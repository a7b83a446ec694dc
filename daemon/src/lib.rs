//! edgellm: run int4 ONNX language-model packages on edge devices.
//!
//! # Layout
//! Following a request's path (DESIGN.md):
//! - [`config`]: the daemon's TOML configuration and its defaults.
//! - [`api`]: transport-neutral request, event and completion types.
//! - [`model`]: a loaded package: [`package`] (genai_config.json, checksums, KV layout),
//!   [`tokenizer`] (ids <-> text, incremental detokenizer), [`chat`] (chat templates, harmony).
//! - [`scheduler`]: admission (validate, tokenize, length check), the bounded queue, per-request
//!   cancellation and deadlines; runs the engine on its own OS thread.
//! - [`engine`]: the generation loop that owns a backend: prefill, sample, detokenize, stop.
//! - [`backend`]: the small synchronous seam ([`backend::Backend`]) and its implementations
//!   (`backend/ort.rs`: ONNX Runtime through `ort`, loaded at run time).
//! - [`service`]: the daemon ([`run`]): start-up, systemd notifications and watchdog
//!   ([`systemd`]), the transports ([`transport`]: D-Bus, MQTT and HTTP, wire <-> [`api`]),
//!   shutdown; [`metrics`] counts what they serve (Prometheus text at `/metrics`).
//! - [`sampler`]: logits -> next token (greedy, temperature, top-k/p, min-p, repetition
//!   penalty, seeded), and stop strings.

pub mod api;
pub mod backend;
pub mod chat;
pub mod config;
pub mod engine;
pub mod grammar;
pub mod metrics;
pub mod model;
pub mod package;
pub mod prefix_cache;
pub mod sampler;
pub mod scheduler;
pub mod service;
pub mod systemd;
pub mod tokenizer;
pub mod tools;
pub mod transport;

pub use service::run;
