//! edgellm: run int4 ONNX language-model packages on edge devices.
//!
//! # Layout
//! Following a request's path (pieces arrive issue by issue; see DESIGN.md):
//! - [`package`]: a model package folder: `genai_config.json`, checksums, the KV-cache layout.
//! - [`backend`]: the small synchronous seam the engine drives ([`backend::Backend`]), and its
//!   implementations (`backend/ort.rs`: ONNX Runtime through `ort`, loaded at run time).

pub mod backend;
pub mod package;
