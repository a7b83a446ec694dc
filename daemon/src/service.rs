//! The daemon: [`run`] loads the model, starts the engine thread and the transports, tells
//! systemd it is ready, keeps the watchdog fed while the engine and the transports live, and on
//! shutdown drains within the grace period. `edgellmd`'s `main` and the end-to-end tests both
//! call it. The transports get a narrow handle ([`Inference`]: submit, status, facts), never
//! the scheduler's controls.
//!
//! Start-up: load the package and build the backend (off the async threads), start the
//! [`Scheduler`], run one forward pass through it (the heartbeat), then D-Bus (fatal if the bus
//! cannot be reached: systemd restarts us), MQTT (a broker that is down is retried with
//! backoff, never fatal) and HTTP when enabled (fatal if its address cannot be bound), then
//! `READY=1`.
//!
//! Shutdown (the `shutdown` token, cancelled on SIGTERM by `edgellmd`): `STOPPING=1`; new
//! requests get `shutting_down`; the running request ends with `shutdown` and queued ones with
//! `shutting_down`; the transports deliver those terminal messages; HTTP stops accepting and
//! finishes its open answers; MQTT publishes the retained `offline` status and disconnects;
//! D-Bus releases its name. All within `limits.shutdown_grace_s`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::Engine;
use crate::model::Model;
use crate::scheduler::{Limits, Scheduler, Status};
use crate::systemd::Notifier;
use crate::transport::dbus::DbusServer;
use crate::transport::http::HttpServer;
use crate::transport::{Inference, Info, mqtt};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("loading the model {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("the engine did not answer its start-up heartbeat: {0}")]
    Heartbeat(String),
    #[error("D-Bus: {0}")]
    Dbus(#[from] zbus::Error),
    #[error("D-Bus: {0}; exiting so that the service manager restarts the daemon")]
    DbusLost(String),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("HTTP: {0}")]
    Http(#[from] crate::transport::http::HttpError),
}

/// The package folder's own name, after resolving symlinks (`models/default` -> `qwen2.5-0.5b`).
pub fn model_name(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    real.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| real.display().to_string())
}

fn load_engine(config: &Config) -> Result<(Engine, crate::backend::Reason), RunError> {
    let path = &config.model.path;
    let fail = |msg: String| RunError::Load {
        path: path.display().to_string(),
        msg,
    };
    let model = Model::load(path).map_err(|e| fail(e.to_string()))?;
    let (choice, opts) = config.backend_options();
    // The KV capacity: the configured max_length, or the model's context if smaller.
    let layout = model.package.kv_layout(opts.max_length);
    let max_length = layout.max_length;
    check_memory(
        &model.package,
        &layout,
        config.model.max_length,
        config.limits.parallel,
    )
    .map_err(fail)?;
    let loaded =
        crate::backend::load(&model.package, choice, &opts).map_err(|e| fail(e.to_string()))?;
    let mut engine = Engine::new(model, loaded.backend, max_length);
    // Saved prefixes need the package's identity, read once.
    let dir = config.model.prefix_cache_dir.as_deref();
    let package = dir.and(crate::prefix_cache::package_digest(&config.model.path));
    if let (Some(dir), None, false) = (dir, &package, config.model.system_prompts.is_empty()) {
        tracing::warn!(
            "system prompts are not saved in {}: the package has no SHA256SUMS to tell it from \
             a changed one",
            dir.display()
        );
    }
    for (i, system) in config.model.system_prompts.iter().enumerate() {
        let what = |e: String| fail(format!("model.system_prompts[{i}]: {e}"));
        let ids = engine
            .model()
            .system_prefix_ids(system)
            .map_err(|e| what(e.to_string()))?;
        let key = package.as_deref().map(|package| {
            crate::prefix_cache::Key::new(package, engine.backend_name(), max_length, &ids)
        });
        if let (Some(key), Some(dir)) = (&key, dir) {
            match crate::prefix_cache::load(dir, key) {
                Ok(Some(snapshot)) => {
                    let bytes = snapshot.bytes();
                    if engine.adopt_prefix(&ids, snapshot) {
                        tracing::info!(
                            "kept system prompt {i}: {} tokens restored from {}, {:.1} MiB of KV rows",
                            ids.len(),
                            key.path(dir).display(),
                            bytes as f64 / MIB
                        );
                        continue;
                    }
                    tracing::warn!(
                        "{}: the backend refused the saved rows; computing system prompt {i}",
                        key.path(dir).display()
                    );
                }
                Ok(None) => {}
                Err(why) => tracing::warn!("{why}; computing system prompt {i}"),
            }
        }
        let bytes = engine.keep_prefix(&ids).map_err(|e| what(e.to_string()))?;
        tracing::info!(
            "kept system prompt {i}: {} tokens computed, {:.1} MiB of KV rows",
            ids.len(),
            bytes as f64 / MIB
        );
        if let (Some(key), Some(dir), Some(snapshot)) = (&key, dir, engine.kept(&ids)) {
            match crate::prefix_cache::save(dir, key, snapshot) {
                Ok(path) => tracing::info!("saved system prompt {i} to {}", path.display()),
                Err(e) => {
                    tracing::warn!("could not save system prompt {i} in {}: {e}", dir.display())
                }
            }
        }
    }
    Ok((engine, loaded.reason))
}

const MIB: f64 = (1 << 20) as f64;

/// The memory this process may use: its cgroup's `memory.max` (cgroup v2) when set, else the
/// machine's RAM (`MemTotal`). `None` when neither can be read.
pub fn memory_limit() -> Option<(u64, String)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            let rel = s
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim()
                .to_string();
            let file = format!("/sys/fs/cgroup{}/memory.max", rel.trim_end_matches('/'));
            let v = std::fs::read_to_string(&file).ok()?;
            v.trim()
                .parse::<u64>()
                .ok()
                .map(|b| (b, format!("cgroup limit {file}")))
        });
    cgroup.or_else(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kb: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some((kb * 1024, "RAM (MemTotal)".to_string()))
    })
}

/// Logs the effective KV capacity and its size, and refuses one that cannot fit next to the
/// weights in the memory this process may use (a package with a huge context would otherwise
/// allocate until the kernel kills the daemon).
fn check_memory(
    pkg: &crate::package::Package,
    layout: &crate::package::KvLayout,
    configured: usize,
    parallel: usize,
) -> Result<(), String> {
    // With continuous batching, each slot is a full-length cache of its own besides the single
    // one that prefills (a backend without slots allocates less).
    let slots = if parallel > 1 {
        parallel as u64
            * layout.capacity.len() as u64
            * 2
            * (layout.kv_heads * layout.head_dim * 4) as u64
            * layout.max_length as u64
    } else {
        0
    };
    let kv = layout.total_bytes() + slots;
    let weights = std::fs::read_dir(&pkg.dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("model.onnx"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .unwrap_or(0);
    let context = pkg.config.model.context_length;
    let clamp = if configured > layout.max_length {
        format!(" (configured {configured}, clamped to the package's context_length {context})")
    } else {
        String::new()
    };
    let per_slot = if parallel > 1 {
        format!(
            " (parallel = {parallel}: {:.1} MiB of it in slots)",
            slots as f64 / MIB
        )
    } else {
        String::new()
    };
    tracing::info!(
        "KV cache: max_length {}{clamp}, {:.1} MiB allocated up front{per_slot}; weights {:.1} MiB",
        layout.max_length,
        kv as f64 / MIB,
        weights as f64 / MIB
    );
    if let Some((limit, what)) = memory_limit()
        && kv + weights > limit
    {
        return Err(format!(
            "the KV cache for max_length {} needs {:.1} MiB, which with the weights' {:.1} MiB \
             exceeds the {:.1} MiB this process may use ({what}); lower [model] max_length",
            layout.max_length,
            kv as f64 / MIB,
            weights as f64 / MIB,
            limit as f64 / MIB
        ));
    }
    Ok(())
}

/// The transports' part of the watchdog: a D-Bus round trip to ourselves and an answer from the
/// MQTT event loop, each within `within`.
async fn transports_alive(
    dbus: Option<&DbusServer>,
    mqtt: Option<&mqtt::MqttProber>,
    within: Duration,
) -> Result<(), String> {
    if let Some(d) = dbus {
        d.ping(within).await?;
    }
    if let Some(m) = mqtt {
        m.probe(within).await?;
    }
    Ok(())
}

fn status_line(info: &Info, s: Status) -> String {
    format!(
        "STATUS={} {} ({}), {} running, {} queued",
        s.state.as_str(),
        info.model,
        info.backend,
        s.running,
        s.queue_length
    )
}

/// Runs the daemon until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let notifier = Notifier::from_env();
    let loading = std::time::Instant::now();
    notifier.notify("STATUS=loading the model");
    tracing::info!("loading {}", config.model.path.display());

    let (engine, backend_reason) = {
        let config = config.clone();
        let path = config.model.path.display().to_string();
        // A thread of its own, named for what it leaves behind: ONNX Runtime's intra-op
        // threads are started while the session is made and inherit the creating thread's name,
        // so `top -H` (and scripts/bench-transports.sh's CPU account) tells them, as
        // "edgellm-backend", from the transports' "edgellmd-io" threads.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("edgellm-backend".into())
            .spawn(move || {
                let _ = tx.send(load_engine(&config));
            });
        let failed = |msg: String| RunError::Load {
            path: path.clone(),
            msg,
        };
        spawned.map_err(|e| failed(format!("starting the loading thread: {e}")))?;
        rx.await.map_err(|_| {
            failed("the loading thread ended without a result (it panicked; see above)".into())
        })??
    };
    let backend = engine.backend_name();
    let limits = Limits {
        queue_depth: config.limits.queue_depth,
        parallel: config.limits.parallel,
        max_new_tokens: config.limits.max_new_tokens,
        request_timeout: Duration::from_secs(config.limits.request_timeout_s),
        stream_interval: config.limits.stream_interval,
    };
    let scheduler = Arc::new(Scheduler::start(engine, limits, CancellationToken::new()));
    scheduler.ping().await.map_err(RunError::Heartbeat)?;
    let info = Info {
        model: model_name(&config.model.path),
        backend,
        backend_reason: backend_reason.to_string(),
        max_context: scheduler.max_length(),
        parallel: scheduler.parallel(),
    };
    scheduler.metrics().loaded(
        &info.model,
        info.backend,
        info.parallel,
        loading.elapsed().as_secs_f64(),
    );
    let tasks = TaskTracker::new();
    let svc = Arc::new(Inference::new(
        scheduler.clone(),
        info.clone(),
        tasks.clone(),
    ));
    tracing::info!(
        "model {} on {} (max_length {})",
        info.model,
        info.backend,
        info.max_context
    );
    if matches!(backend_reason, crate::backend::Reason::Fallback(_)) {
        tracing::warn!("backend {backend}: {backend_reason}");
    } else {
        tracing::info!("backend {backend}: {backend_reason}");
    }

    let dbus = if config.dbus.enabled {
        let server = DbusServer::start(svc.clone(), &config.dbus).await?;
        tracing::info!(
            "D-Bus: {} on the {} bus",
            crate::transport::dbus::BUS_NAME,
            {
                if config.dbus.address.is_empty() {
                    config.dbus.bus.as_str()
                } else {
                    config.dbus.address.as_str()
                }
            }
        );
        Some(server)
    } else {
        None
    };
    let mqtt_close = CancellationToken::new();
    let mut mqtt_prober = None;
    let mut mqtt = if config.mqtt.enabled {
        let client = mqtt::MqttTransport::new(svc.clone(), &config.mqtt)
            .map_err(|e| RunError::Mqtt(e.to_string()))?;
        mqtt_prober = Some(client.prober());
        Some(tokio::spawn(client.run(mqtt_close.clone())))
    } else {
        None
    };

    let http = if config.http.enabled {
        let server = HttpServer::start(svc.clone(), &config.http).await?;
        tracing::info!(
            "HTTP: OpenAI-compatible API on {}{}",
            server.listen(),
            if config.http.api_key_file.is_some() {
                " (API keys required)"
            } else {
                ""
            }
        );
        Some(server)
    } else {
        None
    };

    let dbus_lost = dbus
        .as_ref()
        .map_or_else(CancellationToken::new, DbusServer::lost);
    let mut fatal = None;
    let mut status = scheduler.status();
    notifier.notify(&format!(
        "READY=1\n{}",
        status_line(&info, *status.borrow_and_update())
    ));
    tracing::info!("ready");

    // Ping at half the watchdog timeout, and only while the engine thread and the transports are
    // healthy: a wedged backend (no progress within the whole timeout) gets us restarted; a long
    // generation, which makes progress token by token, does not. D-Bus must answer a round trip
    // to our own object and the MQTT event loop a probe, each within a quarter of the timeout: a
    // hung bus daemon or a wedged transport stops the pings too. (A connection that is gone
    // ends the daemon at once, below; a broker outage does not stop the pings.)
    let watchdog = notifier.watchdog();
    let mut unfed: Option<String> = None;
    let mut tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| {
        (w / 2).max(Duration::from_millis(50))
    }));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            // A dead bus connection: stop (systemd restarts us) rather than run deaf.
            () = dbus_lost.cancelled() => {
                let why = dbus.as_ref().map(DbusServer::why_lost).unwrap_or_default();
                fatal = Some(RunError::DbusLost(why));
                break;
            }
            // The MQTT transport reconnects on its own and only returns when closed: an early
            // end (a panic) is fatal too.
            ended = async { mqtt.as_mut().expect("guarded").await }, if mqtt.is_some() => {
                mqtt = None;
                fatal = Some(RunError::Mqtt(format!("the MQTT transport stopped: {ended:?}")));
                break;
            }
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                notifier.notify(&status_line(&info, *status.borrow_and_update()));
            }
            _ = tick.tick(), if watchdog.is_some() => {
                if let Some(w) = watchdog {
                    let alive = transports_alive(dbus.as_ref(), mqtt_prober.as_ref(), w / 4).await;
                    match (scheduler.health().healthy(w), alive) {
                        (true, Ok(())) => {
                            notifier.notify("WATCHDOG=1");
                            unfed = None;
                        }
                        (engine, alive) => {
                            let why = if engine {
                                alive.err().unwrap_or_default()
                            } else {
                                "the engine thread made no progress".to_string()
                            };
                            if unfed.as_ref() != Some(&why) {
                                tracing::warn!("watchdog not fed: {why}");
                            }
                            unfed = Some(why);
                        }
                    }
                }
            }
        }
    }

    notifier.notify("STOPPING=1\nSTATUS=stopping: finishing requests");
    tracing::info!("stopping");
    let grace = Duration::from_secs(config.limits.shutdown_grace_s);
    let deadline = tokio::time::Instant::now() + grace;
    scheduler.shutdown();
    let drained = tokio::time::timeout_at(deadline, async {
        let s = scheduler.clone();
        let _ = tokio::task::spawn_blocking(move || s.join()).await;
        tasks.close();
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace of {grace:?} ran out with requests still running");
    }
    if let Some(server) = http {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(left.max(Duration::from_secs(1)), server.stop()).await;
    }
    mqtt_close.cancel();
    if let Some(task) = mqtt {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(left.max(Duration::from_secs(1)), task).await;
    }
    if let Some(server) = dbus {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(left.max(Duration::from_secs(1)), server.stop()).await;
    }
    tracing::info!("stopped");
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
