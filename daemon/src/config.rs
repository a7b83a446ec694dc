//! The daemon's configuration: one TOML file (`/etc/edgellm/edgellm.toml`), the key names of
//! DESIGN.md's "Configuration" section, unknown keys rejected, every default defined once here
//! ([`Default`] impls), and [`Config::default_file`] printing them as a commented file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendChoice, BackendOptions, ExecutionProvider};

/// Paths that may be unset: `""` in the file (the default file shows every key, so an unset
/// path is written as an empty string) is `None`.
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((!s.is_empty()).then(|| PathBuf::from(s)))
    }
}

/// Which D-Bus bus edgellmd serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// The system bus (production; the policy file admits edgellm and its clients).
    System,
    /// The session bus (`DBUS_SESSION_BUS_ADDRESS`; development).
    Session,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::System => "system",
            Bus::Session => "session",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub onnxruntime: OnnxRuntimeConfig,
    pub limits: LimitsConfig,
    pub dbus: DbusConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
}

/// Where the HTTP transport listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (`127.0.0.1:8080`, `[::]:8080`).
    Tcp(std::net::SocketAddr),
    /// A Unix socket (`unix:/run/edgellm/http.sock`).
    Unix(PathBuf),
}

impl Listen {
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a Unix socket needs an absolute path (unix:/run/...)"
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!("{s:?}: expected HOST:PORT with an IP address (127.0.0.1:8080) or unix:/PATH")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Listen::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: Listen,
    /// Bearer tokens, one per line; unset: no key is asked for.
    #[serde(with = "optional_path")]
    pub api_key_file: Option<PathBuf>,
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: false,
            listen: Listen::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_key_file: None,
            max_body_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model package folder.
    pub path: PathBuf,
    pub backend: BackendChoice,
    /// KV capacity: prompt + generated tokens.
    pub max_length: usize,
    /// 0 = all cores.
    pub threads: usize,
    /// System messages computed at start-up and kept in the KV cache: a request whose
    /// conversation starts with one skips its prefill (`usage.cached_tokens`).
    pub system_prompts: Vec<String>,
    /// A folder where the system prompts' KV rows are saved and restored from on the next
    /// start (when package, backend, max_length and prompt still match). Empty: not saved.
    #[serde(with = "optional_path")]
    pub prefix_cache_dir: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::from("/usr/share/edgellm/models/default"),
            backend: BackendChoice::Auto,
            max_length: 4096,
            threads: 0,
            system_prompts: Vec::new(),
            prefix_cache_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxRuntimeConfig {
    /// `libonnxruntime.so`; unset: `ORT_DYLIB_PATH`, then the system library.
    #[serde(with = "optional_path")]
    pub library: Option<PathBuf>,
    pub execution_providers: Vec<ExecutionProvider>,
    /// Let ONNX Runtime's threads spin between operators during a request (faster decoding;
    /// they park once the request is done).
    pub allow_spinning: bool,
}

impl Default for OnnxRuntimeConfig {
    fn default() -> Self {
        OnnxRuntimeConfig {
            library: None,
            execution_providers: vec![ExecutionProvider::Cpu],
            allow_spinning: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub queue_depth: usize,
    /// Sequences decoded together (continuous batching); 1: one request at a time.
    pub parallel: usize,
    pub max_new_tokens: usize,
    pub request_timeout_s: u64,
    /// On SIGTERM: how long the running request and the transports get to finish.
    pub shutdown_grace_s: u64,
    /// A streamed answer goes out in chunks of this many pieces of text (about one per token)
    /// after the first, which goes at once; 1: each as it is decoded (vLLM's and SGLang's
    /// `stream_interval`). Fewer socket writes and wake-ups per token on a board whose cores
    /// the engine fills, at the cost of text arriving in bursts.
    pub stream_interval: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            queue_depth: 8,
            parallel: 1,
            max_new_tokens: 1024,
            request_timeout_s: 300,
            shutdown_grace_s: 10,
            stream_interval: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbusConfig {
    pub enabled: bool,
    pub bus: Bus,
    /// A bus address (`unix:path=...`) to use instead of `bus`; empty: `bus` decides.
    pub address: String,
}

impl Default for DbusConfig {
    fn default() -> Self {
        DbusConfig {
            enabled: true,
            bus: Bus::System,
            address: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub url: String,
    /// Empty: the host name.
    pub node_id: String,
    pub topic_prefix: String,
    pub username: String,
    #[serde(with = "optional_path")]
    pub password_file: Option<PathBuf>,
    #[serde(with = "optional_path")]
    pub ca_file: Option<PathBuf>,
    pub max_payload_bytes: usize,
    /// Also take requests from `<topic_prefix>/<share_group>/request` through the shared
    /// subscription `$share/<share_group>/...`: the broker gives each to one daemon of the group.
    pub share_group: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            node_id: String::new(),
            topic_prefix: "edgellm".into(),
            username: String::new(),
            password_file: None,
            ca_file: None,
            max_payload_bytes: 65536,
            share_group: String::new(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, msg: String| Err(ConfigError::Invalid { key, msg });
        if self.model.max_length == 0 {
            return bad("model.max_length", "must be positive".into());
        }
        if !(1..=64).contains(&self.limits.parallel) {
            return bad("limits.parallel", "must be 1 to 64".into());
        }
        if self.limits.queue_depth == 0 {
            return bad("limits.queue_depth", "must be positive".into());
        }
        if !(1..=64).contains(&self.limits.stream_interval) {
            return bad("limits.stream_interval", "must be 1 to 64".into());
        }
        if self.limits.max_new_tokens == 0 {
            return bad("limits.max_new_tokens", "must be positive".into());
        }
        if self.limits.shutdown_grace_s == 0 {
            return bad("limits.shutdown_grace_s", "must be positive".into());
        }
        if self.limits.request_timeout_s == 0 {
            return bad("limits.request_timeout_s", "must be positive".into());
        }
        if !(self.mqtt.url.starts_with("mqtt://") || self.mqtt.url.starts_with("mqtts://")) {
            return bad(
                "mqtt.url",
                format!(
                    "{:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT",
                    self.mqtt.url
                ),
            );
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) {
            return bad(
                "mqtt.topic_prefix",
                "must be non-empty and free of MQTT wildcards (+, #)".into(),
            );
        }
        if self.mqtt.node_id.contains(['+', '#', '/']) {
            return bad(
                "mqtt.node_id",
                "must be free of MQTT wildcards and '/'".into(),
            );
        }
        if self.mqtt.share_group.contains(['+', '#', '/']) {
            return bad(
                "mqtt.share_group",
                "must be free of MQTT wildcards and '/'".into(),
            );
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return bad("mqtt.max_payload_bytes", "must be at least 1024".into());
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes", "must be at least 1024".into());
        }
        Ok(())
    }

    /// How to build the backend this configuration describes.
    pub fn backend_options(&self) -> (BackendChoice, BackendOptions) {
        (
            self.model.backend,
            BackendOptions {
                library: self.onnxruntime.library.clone(),
                threads: self.model.threads,
                max_length: self.model.max_length,
                allow_spinning: self.onnxruntime.allow_spinning,
                execution_providers: self.onnxruntime.execution_providers.clone(),
                ..BackendOptions::default()
            },
        )
    }

    /// The default configuration as a commented TOML file (`edgellmd --print-default-config`).
    /// The values come from the [`Default`] impls, so file and code cannot disagree.
    pub fn default_file() -> String {
        let d = Config::default();
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let opt_path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let list = |v: &[String]| {
            format!(
                "[{}]",
                v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
            )
        };
        format!(
            r#"# edgellmd configuration (/etc/edgellm/edgellm.toml). Every key is optional; the values
# below are the defaults. Unknown keys are rejected: check a file with `edgellmd --check-config FILE`.

[model]
# Model package folder (genai_config.json, model.onnx, tokenizer.json, ...).
path = {path}
# auto: ONNX Runtime when its library loads and the session builds, else tract. Or: ort, tract.
backend = {backend}
# KV-cache capacity in tokens, prompt plus answer. Memory grows with it.
max_length = {max_length}
# Intra-op threads; 0 = all cores.
threads = {threads}
# System messages computed once at start-up and kept in the KV cache: a conversation that starts
# with one of them skips its prefill (reported as usage.cached_tokens). Each keeps a copy of its
# KV rows in memory (logged at start). Example: ["You are a helpful assistant."]
system_prompts = {system_prompts}
# A folder for the system prompts' KV rows: saved after start-up computed them, restored on the
# next start instead of computing them again (when the package, backend, max_length and prompt
# still match; the files are checked). The unit gives edgellmd /var/cache/edgellm for this.
# Empty: not saved.
prefix_cache_dir = {prefix_cache_dir}

[onnxruntime]
# libonnxruntime.so to load; empty: ORT_DYLIB_PATH, then the system library.
library = {library}
# cpu, or cuda (Jetson, with NVIDIA's CUDA-enabled ONNX Runtime).
execution_providers = {eps}
# Threads spin between operators while a request runs (faster decoding); they park afterwards.
allow_spinning = {spin}

[limits]
# Requests waiting behind the running ones; more are answered `busy`.
queue_depth = {queue}
# Requests decoded together, one token each per forward pass (continuous batching: a new
# request joins at the next step, its prompt prefilled in chunks between the others' steps).
# 1 runs one request at a time. ONNX Runtime only, and packages without sliding-window layers;
# tract runs one at a time (the log says why). Each slot holds a KV cache of max_length.
parallel = {parallel}
# Upper bound on generated tokens per request.
max_new_tokens = {max_new}
# A request running longer than this ends with its partial answer.
request_timeout_s = {timeout}
# On SIGTERM the running request ends (reason `shutdown`), queued ones are answered
# `shutting_down`; this bounds the wait for that. Keep it below the unit's TimeoutStopSec.
shutdown_grace_s = {grace}
# A streamed answer's text goes out this many pieces (about one per token) at a time, the
# first at once; 1 (to 64) sends each as it is decoded. Each chunk is a socket write and a
# wake-up that, where the engine fills every core, comes out of decoding (0.15-0.2 ms of CPU
# per chunk on a 2-core machine, docs/http-api.md); 2 halves that, the text arriving in pairs.
stream_interval = {stream_interval}

[dbus]
enabled = {dbus_enabled}
# system, or session (uses DBUS_SESSION_BUS_ADDRESS; for development).
bus = {bus}
# A bus address (unix:path=...) used instead of `bus`; empty: `bus` decides.
address = {dbus_address}

[mqtt]
enabled = {mqtt_enabled}
# mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS.
url = {url}
# Topics are <topic_prefix>/<node_id>/...; empty node_id: the host name.
node_id = {node}
topic_prefix = {prefix}
username = {user}
# File holding the password (not the password itself).
password_file = {pw}
# CA certificate for mqtts://; empty: the system's roots.
ca_file = {ca}
# Larger request payloads are refused with an error reply.
max_payload_bytes = {max_payload}
# Fleets: also take requests published to <topic_prefix>/<share_group>/request, shared by every
# daemon of the group through `$share/<share_group>/...` (one daemon answers each). Empty: off.
share_group = {share}

[http]
# OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) and /health.
# Off unless enabled: the device exposes nothing new by default. No TLS: put a reverse proxy in
# front for that (docs/http-api.md).
enabled = {http_enabled}
# HOST:PORT (an IP address), or unix:/PATH for a Unix socket.
listen = {listen}
# A file of API keys (bearer tokens), one per line; when set, every route but /health requires
# `Authorization: Bearer <key>`. Empty: no key required.
api_key_file = {api_keys}
# Larger request bodies are refused (413).
max_body_bytes = {max_body}
"#,
            path = q(&d.model.path.display().to_string()),
            backend = q(d.model.backend.as_str()),
            max_length = d.model.max_length,
            threads = d.model.threads,
            system_prompts = list(&d.model.system_prompts),
            prefix_cache_dir = q(&opt_path(&d.model.prefix_cache_dir)),
            library = q(&opt_path(&d.onnxruntime.library)),
            eps = list(
                &d.onnxruntime
                    .execution_providers
                    .iter()
                    .map(|ep| ep.as_str().to_string())
                    .collect::<Vec<_>>()
            ),
            spin = d.onnxruntime.allow_spinning,
            queue = d.limits.queue_depth,
            parallel = d.limits.parallel,
            max_new = d.limits.max_new_tokens,
            timeout = d.limits.request_timeout_s,
            grace = d.limits.shutdown_grace_s,
            stream_interval = d.limits.stream_interval,
            dbus_address = q(&d.dbus.address),
            share = q(&d.mqtt.share_group),
            dbus_enabled = d.dbus.enabled,
            bus = q(d.dbus.bus.as_str()),
            mqtt_enabled = d.mqtt.enabled,
            url = q(&d.mqtt.url),
            node = q(&d.mqtt.node_id),
            prefix = q(&d.mqtt.topic_prefix),
            user = q(&d.mqtt.username),
            pw = q(&opt_path(&d.mqtt.password_file)),
            ca = q(&opt_path(&d.mqtt.ca_file)),
            max_payload = d.mqtt.max_payload_bytes,
            http_enabled = d.http.enabled,
            listen = q(&d.http.listen.to_string()),
            api_keys = q(&opt_path(&d.http.api_key_file)),
            max_body = d.http.max_body_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_back_to_the_defaults() {
        assert_eq!(
            Config::parse(&Config::default_file()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn the_installed_config_is_the_default_file() {
        // systemd/edgellm.toml is what the Debian package and the Yocto recipe install as
        // /etc/edgellm/edgellm.toml: every key, commented, at the code's default. Regenerate it
        // with `edgellmd --print-default-config > systemd/edgellm.toml`.
        let installed = include_str!("../../systemd/edgellm.toml");
        assert!(
            installed == Config::default_file(),
            "systemd/edgellm.toml differs from `edgellmd --print-default-config`"
        );
        assert_eq!(Config::parse(installed).unwrap(), Config::default());
    }

    #[test]
    fn the_default_file_sets_every_key() {
        // Every field of every section appears in the printed file, so it documents them all.
        let printed: toml::Table = toml::from_str(&Config::default_file()).unwrap();
        let full: toml::Table =
            toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
        for (section, keys) in &full {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    printed[section].get(key).is_some(),
                    "{section}.{key} is missing from the default file"
                );
            }
        }
    }

    #[test]
    fn an_empty_file_is_the_defaults_and_partial_files_keep_the_rest() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c =
            Config::parse("[model]\nmax_length = 2048\n[mqtt]\nnode_id = \"cell-7\"\n").unwrap();
        assert_eq!(c.model.max_length, 2048);
        assert_eq!(c.model.backend, BackendChoice::Auto);
        assert_eq!(c.mqtt.node_id, "cell-7");
        assert_eq!(c.mqtt.topic_prefix, "edgellm");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = |text: &str| Config::parse(text).unwrap_err().to_string();
        assert!(err("[model]\nmax_lenght = 5\n").contains("max_lenght"));
        assert!(err("[modle]\n").contains("modle"));
        let e = err("[model]\nbackend = \"gpu\"\n");
        assert!(
            e.contains("backend = \"gpu\"") && e.contains("`auto`, `ort`"),
            "{e}"
        );
        assert!(err("[model]\nmax_length = 0\n").contains("model.max_length"));
        assert!(err("[model]\nmax_length = \"big\"\n").contains("max_length"));
        let e = err("[dbus]\nbus = \"user\"\n");
        assert!(
            e.contains("bus = \"user\"") && e.contains("expected `system` or `session`"),
            "{e}"
        );
        assert!(err("[mqtt]\nurl = \"http://x\"\n").contains("mqtt.url"));
        assert!(err("[mqtt]\ntopic_prefix = \"a/#\"\n").contains("mqtt.topic_prefix"));
        assert!(err("[limits]\nqueue_depth = 0\n").contains("limits.queue_depth"));
        assert!(err("[limits]\nstream_interval = 0\n").contains("limits.stream_interval"));
        assert!(err("[limits]\nstream_interval = 65\n").contains("limits.stream_interval"));
        assert!(
            err("[onnxruntime]\nexecution_providers = [\"tpu\"]\n").contains("execution_providers")
        );
    }

    #[test]
    fn backend_options_follow_the_file() {
        let c = Config::parse("[model]\nbackend = \"ort\"\nthreads = 2\n[onnxruntime]\nlibrary = \"/opt/ort/libonnxruntime.so\"\nallow_spinning = false\n").unwrap();
        let (choice, opts) = c.backend_options();
        assert_eq!(choice, BackendChoice::Ort);
        assert_eq!(opts.threads, 2);
        assert_eq!(
            opts.library.as_deref(),
            Some(Path::new("/opt/ort/libonnxruntime.so"))
        );
        assert!(!opts.allow_spinning);
        assert_eq!(Config::default().backend_options().1.library, None);
    }
}
