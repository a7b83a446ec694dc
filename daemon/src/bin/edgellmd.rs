//! `edgellmd`: the edgellm service. Reads the configuration, logs to the journal when systemd
//! started it (`JOURNAL_STREAM`) or to stderr otherwise, turns SIGTERM/SIGINT into a graceful
//! shutdown, and runs [`edgellm::run`]. Exit codes: 0 after a clean stop, 1 when start-up
//! failed, 2 for bad arguments or a bad configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edgellm::config::Config;
use tokio_util::sync::CancellationToken;

const DEFAULT_CONFIG: &str = "/etc/edgellm/edgellm.toml";

#[derive(Debug, Parser)]
#[command(
    name = "edgellmd",
    version,
    about = "edgellm service: answers over D-Bus and MQTT"
)]
struct Cli {
    /// Configuration file (TOML). Default: /etc/edgellm/edgellm.toml if it exists, else the
    /// built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check a configuration file and exit (0: valid).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "print_default_config"])]
    check_config: Option<PathBuf>,
    /// Print the default configuration file, every key commented, and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGELLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zbus=warn,rumqttc=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald).init();
        return;
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", Config::default_file());
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edgellmd: {e}");
                ExitCode::from(2)
            }
        };
    }
    init_logging();
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG))
        }
        None => {
            tracing::info!("no {DEFAULT_CONFIG}: using the built-in defaults");
            Ok(Config::default())
        }
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    on_sigbus_exit();
    // One worker thread for all three transports. The engine's threads fill the cores while
    // they decode, so every wake-up of a transport thread preempts one of them. With two
    // workers each streamed token woke both (the notified worker wakes a second one to look
    // for more work: 2.09 voluntary switches per token on `edgellmd-io`, measured with
    // /proc/PID/task/*/status); with one, 1.08. Nothing heavy runs on it: tokenizing and
    // compiling a grammar go through `block_in_place` (Scheduler::submit_from_async), which
    // hands the worker's other tasks to a fresh thread meanwhile, and the engine and model
    // loading have threads of their own.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("edgellmd-io")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgellmd: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            signals.cancel();
        });
        edgellm::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status after a SIGBUS ([`on_sigbus_exit`]): EX_IOERR (sysexits.h).
const SIGBUS_EXIT: i32 = 74;

/// A SIGBUS in this process means a page of a mapped file could not be read: the model
/// package's weights (ONNX Runtime and tract map `model.onnx.data`) were truncated or rewritten
/// in place under the running daemon. Without a handler the process dies silently (exit 135,
/// nothing logged). This one writes a named reason to stderr (the journal under systemd) and
/// exits with [`SIGBUS_EXIT`], so `Restart=on-failure` brings the daemon back, and the
/// package's checksums then refuse a broken package. Only async-signal-safe calls (`write`,
/// `_exit`) run in it. Operators replace packages by renaming a new folder into place
/// (docs/model-package.md).
fn on_sigbus_exit() {
    extern "C" fn handler(_: libc::c_int) {
        const MSG: &[u8] = b"edgellmd: SIGBUS: a mapped file of the model package could not be \
read (truncated or rewritten while the daemon was serving?); exiting. Replace a package by \
renaming a new folder into place, never in place.\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(SIGBUS_EXIT);
        }
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has the
    // C signature sigaction expects for sa_handler (no SA_SIGINFO).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            eprintln!("edgellmd: cannot install the SIGBUS handler");
        }
    }
}
