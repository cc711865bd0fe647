//! `ferrotune worker`: the child side of training. One process runs one job (an embedded
//! interpreter cannot be restarted): it moves its stdout to a private events descriptor,
//! sends its own stdout/stderr (and so everything Python and C code print) to the task's
//! log, embeds CPython through pyo3 with the managed environment's site-packages on
//! `sys.path`, checks the interpreter matches the environment, and runs `worker.py`, which
//! calls LlamaFactory's `run_exp` in-process and reports events as JSON lines.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyModule;
use serde::{Deserialize, Serialize};

const WORKER_PY: &str = include_str!("worker.py");

/// What the supervisor hands the worker, as `job.json` in the task folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub task_id: String,
    /// LlamaFactory `run_exp` arguments.
    pub args: serde_json::Map<String, serde_json::Value>,
    /// The managed environment's root and site-packages.
    pub env_dir: PathBuf,
    pub site_packages: PathBuf,
    /// Where Python's output goes.
    pub log_file: PathBuf,
}

/// Exit codes of the worker, besides what `worker.py` returns (0 done, 1 training failed,
/// 3 import failed).
pub const EXIT_SETUP: i32 = 4;

/// Runs a job; returns the process exit code. Events go to the original stdout.
pub fn run(job_file: &Path) -> i32 {
    let job: Job = match std::fs::read(job_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(j) => j,
        Err(e) => return fail_early(&format!("cannot read job {}: {e}", job_file.display())),
    };
    // SAFETY: dup/dup2 on descriptors this process owns, before any other thread starts.
    let events_fd = unsafe { libc::dup(1) };
    if events_fd < 0 {
        return fail_early("dup(stdout) failed");
    }
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(&job.log_file)
    {
        Ok(f) => f,
        Err(e) => return fail_early(&format!("cannot open log {}: {e}", job.log_file.display())),
    };
    // SAFETY: as above; fds 1 and 2 now write to the log.
    unsafe {
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    drop(log);
    let mut events = unsafe_file(events_fd);
    match run_python(&job, events_fd) {
        Ok(code) => code,
        Err(message) => {
            let line = serde_json::json!({"type": "error", "stage": "setup", "message": message});
            let _ = writeln!(events, "{line}");
            eprintln!("ferrotune worker: {message}");
            EXIT_SETUP
        }
    }
}

fn unsafe_file(fd: i32) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was returned by dup() above and is owned here. Python gets its own dup.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

fn fail_early(message: &str) -> i32 {
    let line = serde_json::json!({"type": "error", "stage": "setup", "message": message});
    println!("{line}");
    EXIT_SETUP
}

fn run_python(job: &Job, events_fd: i32) -> Result<i32, String> {
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
    // Python gets its own descriptor, so closing its file object leaves ours valid.
    // SAFETY: dup of a descriptor this process owns.
    let py_fd = unsafe { libc::dup(events_fd) };
    if py_fd < 0 {
        return Err("dup(events) failed".into());
    }
    let args_json = serde_json::to_string(&job.args).map_err(|e| e.to_string())?;
    Python::attach(|py| -> Result<i32, String> {
        let sys = py.import("sys").map_err(|e| e.to_string())?;
        let version: String = sys
            .getattr("version")
            .and_then(|v| v.extract())
            .map_err(|e| e.to_string())?;
        let running = version.split_whitespace().next().unwrap_or("").to_string();
        if let Some(expected) = &expected {
            if expected != &running {
                return Err(format!(
                    "the embedded Python is {running} but the environment at {} was made with {expected}; \
                     rebuild ferrotune against that interpreter (PYO3_PYTHON) or re-run `ferrotune setup`",
                    job.env_dir.display()
                ));
            }
        }
        let path = sys.getattr("path").map_err(|e| e.to_string())?;
        path.call_method1(
            "insert",
            (0, job.site_packages.to_string_lossy().to_string()),
        )
        .map_err(|e| e.to_string())?;
        // Make `sys.prefix`-relative lookups (e.g. package data) see the environment.
        let _ = sys.setattr(
            "executable",
            job.env_dir.join("bin/python").to_string_lossy().to_string(),
        );
        let code = CString::new(WORKER_PY).map_err(|e| e.to_string())?;
        let module = PyModule::from_code(py, &code, c"ferrotune_worker.py", c"ferrotune_worker")
            .map_err(|e| format!("loading worker.py: {e}"))?;
        let result = module
            .getattr("main")
            .and_then(|f| f.call1((args_json, py_fd)))
            .map_err(|e| {
                e.print(py);
                format!("worker.py: {e}")
            })?;
        result.extract::<i32>().map_err(|e| e.to_string())
    })
}
