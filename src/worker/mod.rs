//! `ferrotune worker`: the child side of training. One process runs one job (an embedded
//! interpreter cannot be restarted). The supervisor starts it in its own process group with
//! stdout and stderr on the task's log, so everything Python and native code print lands
//! there; the worker then routes both through a pipe into that log rotated by size
//! ([`crate::logs::capture_std_streams`]). The worker embeds CPython through pyo3 with the managed environment's
//! site-packages on `sys.path`, checks the interpreter matches the environment, and runs
//! `worker.py`, which calls LlamaFactory's `run_exp` in-process and appends events as JSON
//! lines to the task's events file. At the end it writes `exit.json` next to it, so a
//! supervisor that re-attaches after a server restart (and so cannot `wait` for it) still
//! learns how it ended.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyModule;
use serde::{Deserialize, Serialize};

/// The Python side, also written to the task folder as `launch.py` for torchrun launches.
pub const WORKER_PY: &str = include_str!("worker.py");

/// What the supervisor hands the worker, as `job.json` in the task folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub task_id: String,
    /// LlamaFactory `run_exp` arguments.
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Further `run_exp` calls after the first, in the same process (an evaluation's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<serde_json::Map<String, serde_json::Value>>,
    /// The managed environment's root and site-packages.
    pub env_dir: PathBuf,
    pub site_packages: PathBuf,
    /// Where events are appended (JSON lines).
    pub events_file: PathBuf,
    /// Where the exit code is written at the end.
    pub exit_file: PathBuf,
    /// Seconds between heartbeat events.
    pub heartbeat_secs: f64,
    /// Also save a checkpoint when this many seconds have passed since the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_every_s: Option<f64>,
    /// The task's log, rotated by size: the worker sends its stdout and stderr there through
    /// a pipe. Absent (older jobs): they stay on the file the supervisor opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<crate::logs::Rotation>,
}

/// Exit codes: 0 done, 1 training failed, 3 import failed, 5 stopped on request (from
/// `worker.py`); 4 the worker could not set up.
pub const EXIT_SETUP: i32 = 4;
pub const EXIT_STOPPED: i32 = 5;

/// Runs a job; returns the process exit code.
pub fn run(job_file: &Path) -> i32 {
    let job: Job = match std::fs::read(job_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(j) => j,
        Err(e) => {
            eprintln!(
                "ferrotune worker: cannot read job {}: {e}",
                job_file.display()
            );
            return EXIT_SETUP;
        }
    };
    let captured =
        job.log.as_ref().and_then(
            |rotation| match crate::logs::capture_std_streams(rotation) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("ferrotune worker: cannot rotate the log, writing it whole: {e}");
                    None
                }
            },
        );
    let code = match run_python(&job) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("ferrotune worker: {message}");
            append_event(
                &job.events_file,
                &serde_json::json!({"type": "error", "stage": "setup", "message": message}),
            );
            EXIT_SETUP
        }
    };
    if let Some(captured) = captured {
        // The last lines reach the log before the exit is recorded.
        captured.finish(std::time::Duration::from_secs(3));
    }
    let _ = std::fs::write(
        &job.exit_file,
        serde_json::json!({ "code": code }).to_string(),
    );
    code
}

fn append_event(path: &Path, event: &serde_json::Value) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{event}\n").as_bytes());
    }
}

fn run_python(job: &Job) -> Result<i32, String> {
    if !job.site_packages.is_dir() {
        return Err(format!(
            "the training environment is missing ({} does not exist); run `ferrotune setup`",
            job.site_packages.display()
        ));
    }
    let expected = crate::pyenv::PyEnv {
        dir: job.env_dir.clone(),
        base_python: PathBuf::new(),
    }
    .recorded_version();
    let passes: Vec<&serde_json::Map<String, serde_json::Value>> =
        std::iter::once(&job.args).chain(job.then.iter()).collect();
    let args_json = serde_json::to_string(&passes).map_err(|e| e.to_string())?;
    Python::attach(|py| -> Result<i32, String> {
        let sys = py.import("sys").map_err(|e| e.to_string())?;
        let version: String = sys
            .getattr("version")
            .and_then(|v| v.extract())
            .map_err(|e| e.to_string())?;
        let running = version.split_whitespace().next().unwrap_or("").to_string();
        if let Some(expected) = &expected
            && expected != &running
        {
            return Err(format!(
                "the embedded Python is {running} but the environment at {} was made with {expected}; \
                     rebuild ferrotune against that interpreter (PYO3_PYTHON) or re-run `ferrotune setup`",
                job.env_dir.display()
            ));
        }
        let path = sys.getattr("path").map_err(|e| e.to_string())?;
        path.call_method1(
            "insert",
            (0, job.site_packages.to_string_lossy().to_string()),
        )
        .map_err(|e| e.to_string())?;
        // Child processes Python code starts (e.g. via sys.executable) must be the
        // environment's interpreter, not this binary.
        let _ = sys.setattr(
            "executable",
            job.env_dir.join("bin/python").to_string_lossy().to_string(),
        );
        let code = CString::new(WORKER_PY).map_err(|e| e.to_string())?;
        let module = PyModule::from_code(py, &code, c"ferrotune_worker.py", c"ferrotune_worker")
            .map_err(|e| format!("loading worker.py: {e}"))?;
        let result = module
            .getattr("main")
            .and_then(|f| {
                f.call1((
                    args_json,
                    job.events_file.to_string_lossy().to_string(),
                    job.heartbeat_secs,
                    job.save_every_s,
                ))
            })
            .map_err(|e| {
                e.print(py);
                format!("worker.py: {e}")
            })?;
        result.extract::<i32>().map_err(|e| e.to_string())
    })
}
