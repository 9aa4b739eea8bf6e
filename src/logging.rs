//! Process-wide logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, with
//! `pingora_load_balancing` at `error`: gopush logs health changes itself, in one line).
//!
//! Pingora logs through the `log` crate; `tracing-subscriber` bridges those records, so operators
//! get one stream. In the foreground the writer is non-blocking (a background thread does the
//! I/O, so the access log costs the request path only the formatting). A daemon forks after this
//! runs and would lose that thread, so there the writer is plain stderr (which Pingora points at
//! `error_log`).

use crate::config::LogFormat;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `daemon` selects the fork-safe writer, `format` text lines or
/// JSON lines (`access_log.format`; one stream, so every line switches). Calling it twice is
/// harmless (the second call does nothing).
pub fn init(daemon: bool, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_load_balancing=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(false);
    let (writer, guard) = if daemon {
        (BoxMakeWriter::new(std::io::stderr), None)
    } else {
        let (w, g) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .finish(std::io::stderr());
        (BoxMakeWriter::new(w), Some(g))
    };
    let installed = match format {
        LogFormat::Text => builder.with_writer(writer).try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .try_init()
            .is_ok(),
    };
    if installed {
        // The server runs until the process exits; the guard must live as long.
        std::mem::forget(guard);
    }
}

/// Handles SIGUSR1 (sent by logrotate): in daemon mode, where Pingora pointed stderr at
/// `server.error_log`, that file is opened again and put in place of fd 2, so every writer
/// follows it without a restart. Without a file to reopen (foreground, or no `error_log`) the
/// signal is logged and ignored: its default action would kill the process.
pub struct ReopenOnUsr1 {
    /// The error log file, when stderr is that file.
    pub path: Option<std::path::PathBuf>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ReopenOnUsr1 {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGUSR1, log reopen disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = usr1.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let Some(path) = &self.path else {
                        tracing::info!("SIGUSR1: no error log file to reopen (server.error_log is used in daemon mode only); ignored");
                        continue;
                    };
                    match reopen_stderr(path) {
                        Ok(()) => tracing::info!(file = %path.display(), "error log reopened"),
                        Err(e) => tracing::error!(file = %path.display(), "cannot reopen the error log: {e}"),
                    }
                }
            }
        }
    }
}

fn reopen_stderr(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    nix::unistd::dup2_stderr(&file).map_err(std::io::Error::from)
}
