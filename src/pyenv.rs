//! The managed Python training environment: a virtual environment holding the pinned
//! LlamaFactory stack (`python/requirements-train.txt`), created with the very interpreter
//! whose libpython the worker embeds, kept outside the work tree (the user's cache dir) and
//! keyed by a hash of the requirements, so fresh clones reuse it and a change of pins builds
//! a new one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The pinned requirements, compiled in so the binary knows its environment.
pub const REQUIREMENTS: &str = include_str!("../python/requirements-train.txt");
/// Installed after them, against their torch (see the file).
pub const REQUIREMENTS_DEEPSPEED: &str = include_str!("../python/requirements-deepspeed.txt");
/// The interpreter pyo3 was configured with (see build.rs).
pub const BUILD_PYTHON: &str = env!("FERROTUNE_BUILD_PYTHON");
/// Its `major.minor` version.
pub const BUILD_PYTHON_VERSION: &str = env!("FERROTUNE_BUILD_PYTHON_VERSION");

/// Written once the environment is installed and its imports were checked.
const READY_MARKER: &str = ".ferrotune-ready";
/// Lines of installer output kept for the status endpoint.
const LOG_TAIL_LINES: usize = 40;

/// Where ferrotune keeps caches that survive fresh clones: `$FERROTUNE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/ferrotune`, else `~/.cache/ferrotune`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERROTUNE_CACHE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("ferrotune");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("ferrotune")
}

/// The environment's cache key: requirements and interpreter version.
pub fn env_key() -> String {
    let mut h = Sha256::new();
    h.update(REQUIREMENTS.as_bytes());
    h.update(b"\0deepspeed");
    h.update(REQUIREMENTS_DEEPSPEED.as_bytes());
    h.update(b"\0python");
    h.update(BUILD_PYTHON_VERSION.as_bytes());
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Clone)]
pub struct PyEnv {
    /// The virtual environment's root.
    pub dir: PathBuf,
    /// The interpreter that creates it (the one the worker embeds).
    pub base_python: PathBuf,
}

impl PyEnv {
    /// The environment for this build: `dir` when configured, else
    /// `<cache_root>/pyenv/<key>`.
    pub fn locate(configured: Option<&Path>) -> PyEnv {
        let dir = match configured {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => cache_root().join("pyenv").join(env_key()),
        };
        PyEnv {
            dir,
            base_python: PathBuf::from(BUILD_PYTHON),
        }
    }

    pub fn python(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    pub fn site_packages(&self) -> PathBuf {
        self.dir
            .join("lib")
            .join(format!("python{BUILD_PYTHON_VERSION}"))
            .join("site-packages")
    }

    pub fn is_ready(&self) -> bool {
        self.dir.join(READY_MARKER).is_file()
    }

    /// The `version` recorded in the environment's `pyvenv.cfg` (e.g. `3.11.7`).
    pub fn recorded_version(&self) -> Option<String> {
        let cfg = std::fs::read_to_string(self.dir.join("pyvenv.cfg")).ok()?;
        cfg.lines().find_map(|line| {
            let (k, v) = line.split_once('=')?;
            let k = k.trim();
            (k == "version" || k == "version_info").then(|| v.trim().to_string())
        })
    }

    /// Creates the environment and installs the pins, sending progress lines to `progress`.
    /// Idempotent: an environment already marked ready is only re-verified.
    pub async fn install(&self, progress: &(dyn Fn(&str) + Send + Sync)) -> anyhow::Result<()> {
        if self.is_ready() {
            progress(&format!("environment ready at {}", self.dir.display()));
            return Ok(());
        }
        if BUILD_PYTHON.is_empty() {
            anyhow::bail!(
                "this build does not know its Python interpreter (set PYO3_PYTHON and rebuild)"
            );
        }
        if let Some(parent) = self.dir.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        if !self.python().is_file() {
            progress(&format!(
                "creating a virtual environment at {} with {}",
                self.dir.display(),
                self.base_python.display()
            ));
            run_logged(
                &self.base_python,
                &["-m", "venv", &self.dir.to_string_lossy()],
                progress,
            )
            .await?;
        }
        let requirements = self.dir.join("requirements-train.txt");
        tokio::fs::write(&requirements, REQUIREMENTS).await?;
        progress("installing the training stack (first time: a few minutes, several GB)");
        run_logged(
            &self.python(),
            &[
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-r",
                &requirements.to_string_lossy(),
            ],
            progress,
        )
        .await?;
        let deepspeed = self.dir.join("requirements-deepspeed.txt");
        tokio::fs::write(&deepspeed, REQUIREMENTS_DEEPSPEED).await?;
        progress("installing DeepSpeed (built against the installed torch)");
        run_logged(
            &self.python(),
            &[
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "--no-build-isolation",
                "-r",
                &deepspeed.to_string_lossy(),
            ],
            progress,
        )
        .await?;
        progress("checking that the stack imports");
        run_logged(
            &self.python(),
            &[
                "-c",
                "import torch, transformers, peft, trl, llamafactory, bitsandbytes, deepspeed, nltk, jieba, rouge_chinese; \
                 from llamafactory.train.tuner import run_exp; \
                 print('torch', torch.__version__, '| transformers', transformers.__version__, \
                 '| llamafactory', llamafactory.__version__, '| cuda', torch.cuda.is_available())",
            ],
            progress,
        )
        .await?;
        tokio::fs::write(self.dir.join(READY_MARKER), env_key()).await?;
        progress(&format!("environment ready at {}", self.dir.display()));
        Ok(())
    }
}

/// Runs a command, streaming its stdout and stderr lines to `progress`; an error names the
/// command and carries its last lines.
async fn run_logged(
    program: &Path,
    args: &[&str],
    progress: &(dyn Fn(&str) + Send + Sync),
) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", program.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut tail = std::collections::VecDeque::new();
    while let Some(line) = rx.recv().await {
        progress(&line);
        tail.push_back(line);
        if tail.len() > 20 {
            tail.pop_front();
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        anyhow::bail!(
            "{} {} failed ({status}):\n{}",
            program.display(),
            args.first().copied().unwrap_or(""),
            tail.into_iter().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The environment's state as the server sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EnvState {
    Missing,
    Installing,
    Ready,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvStatus {
    pub state: EnvState,
    pub path: String,
    pub log_tail: Vec<String>,
    pub error: Option<String>,
}

/// Shared, observable status of the environment, driven by [`EnvTracker::ensure`].
#[derive(Clone)]
pub struct EnvTracker {
    env: PyEnv,
    status: Arc<RwLock<EnvStatus>>,
    ready: Arc<tokio::sync::Notify>,
}

impl EnvTracker {
    pub fn new(env: PyEnv) -> EnvTracker {
        let state = if env.is_ready() {
            EnvState::Ready
        } else {
            EnvState::Missing
        };
        EnvTracker {
            status: Arc::new(RwLock::new(EnvStatus {
                state,
                path: env.dir.display().to_string(),
                log_tail: Vec::new(),
                error: None,
            })),
            env,
            ready: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn env(&self) -> &PyEnv {
        &self.env
    }

    pub fn status(&self) -> EnvStatus {
        self.status
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn is_ready(&self) -> bool {
        self.status().state == EnvState::Ready
    }

    /// Woken whenever the environment becomes ready.
    pub fn ready_signal(&self) -> Arc<tokio::sync::Notify> {
        self.ready.clone()
    }

    fn update(&self, f: impl FnOnce(&mut EnvStatus)) {
        let mut s = self.status.write().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// Installs the environment if needed (in the background when spawned), logging progress.
    pub async fn ensure(&self) {
        if self.is_ready() {
            self.ready.notify_waiters();
            return;
        }
        self.update(|s| {
            s.state = EnvState::Installing;
            s.error = None;
        });
        tracing::info!(path = %self.env.dir.display(), "installing the Python training environment in the background");
        let this = self.clone();
        let progress = move |line: &str| {
            tracing::info!(target: "ferrotune::pyenv", "{line}");
            this.update(|s| {
                s.log_tail.push(line.to_string());
                if s.log_tail.len() > LOG_TAIL_LINES {
                    let extra = s.log_tail.len() - LOG_TAIL_LINES;
                    s.log_tail.drain(..extra);
                }
            });
        };
        match self.env.install(&progress).await {
            Ok(()) => {
                self.update(|s| s.state = EnvState::Ready);
                self.ready.notify_waiters();
            }
            Err(e) => {
                tracing::error!(error = %e, "installing the Python training environment failed");
                self.update(|s| {
                    s.state = EnvState::Failed;
                    s.error = Some(e.to_string());
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_requirements_are_pinned() {
        assert_eq!(env_key(), env_key());
        assert_eq!(env_key().len(), 16);
        for line in REQUIREMENTS.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            assert!(line.contains("=="), "unpinned requirement: {line}");
        }
        assert!(REQUIREMENTS.contains("llamafactory==0.9.5"));
        let deepspeed: Vec<&str> = REQUIREMENTS_DEEPSPEED
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(deepspeed, ["deepspeed==0.19.8"]);
    }

    #[test]
    fn build_python_is_known() {
        assert!(!BUILD_PYTHON.is_empty());
        assert!(BUILD_PYTHON_VERSION.starts_with("3."));
    }

    #[test]
    fn layout() {
        let env = PyEnv::locate(Some(Path::new("/x/env")));
        assert_eq!(env.python(), PathBuf::from("/x/env/bin/python"));
        assert!(env.site_packages().ends_with("site-packages"));
        assert!(!env.is_ready());
        let default = PyEnv::locate(None);
        assert!(default.dir.ends_with(env_key()));
    }
}
