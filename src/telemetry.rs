//! Logging: tracing to stderr and, for the server, to rotating files in the log folder (see
//! [`crate::logs`]), each text or JSON, filtered by `RUST_LOG` or the `log` setting.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use crate::logs::Rotation;

/// A log file to write besides stderr.
pub struct FileLog {
    pub rotation: Rotation,
    pub format: LogFormat,
}

/// Installs the subscriber. The returned guard flushes the file's background writer when
/// dropped: keep it for the life of the process. A file that cannot be opened is reported on
/// stderr and logging goes on to stderr alone.
pub fn init(filter: &str, format: LogFormat, file: Option<FileLog>) -> Option<WorkerGuard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Text => stderr.boxed(),
        LogFormat::Json => stderr.json().boxed(),
    };
    let mut guard = None;
    let file_layer = file.and_then(|f| match f.rotation.open() {
        Ok(writer) => {
            // Lossless: under a burst the logging thread waits for the disk rather than
            // dropping lines an operator may need.
            let (writer, g) = NonBlockingBuilder::default()
                .lossy(false)
                .thread_name("log-writer")
                .finish(writer);
            guard = Some(g);
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer);
            Some(match f.format {
                LogFormat::Text => layer.boxed(),
                LogFormat::Json => layer.json().boxed(),
            })
        }
        Err(e) => {
            eprintln!(
                "ferrotune: cannot write the log file {}: {e}; logging to stderr only",
                f.rotation.path.display()
            );
            None
        }
    });
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file_layer)
        .try_init();
    guard
}
