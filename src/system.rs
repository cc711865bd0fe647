//! What the machine has and how busy it is: GPUs through `nvidia-smi` (absent on CPU-only
//! machines), CPU and memory from `/proc` (always).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub utilization_pct: Option<f64>,
    pub memory_used_mib: Option<f64>,
    pub memory_total_mib: Option<f64>,
    pub temperature_c: Option<f64>,
}

/// GPU memory used by a process, in MiB, by pid.
pub type GpuProcesses = HashMap<u32, f64>;

fn nvidia_smi(args: &[&str]) -> Option<String> {
    let out = Command::new("nvidia-smi").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn num(s: &str) -> Option<f64> {
    s.trim().parse().ok()
}

/// The GPUs `nvidia-smi` reports; empty without a driver.
pub fn gpus() -> Vec<Gpu> {
    let Some(text) = nvidia_smi(&[
        "--query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu",
        "--format=csv,noheader,nounits",
    ]) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            (f.len() >= 6).then(|| Gpu {
                index: f[0].parse().unwrap_or(0),
                name: f[1].to_string(),
                utilization_pct: num(f[2]),
                memory_used_mib: num(f[3]),
                memory_total_mib: num(f[4]),
                temperature_c: num(f[5]),
            })
        })
        .collect()
}

/// Each GPU's compute capability (`8.0` for an A100, `7.5` for a T4), by index, as
/// `nvidia-smi` reports it once per process (cached: it does not change while we run).
/// Empty without a driver, or with one too old to report it.
pub fn compute_capabilities() -> &'static HashMap<u32, f32> {
    static CAPS: std::sync::OnceLock<HashMap<u32, f32>> = std::sync::OnceLock::new();
    CAPS.get_or_init(|| {
        nvidia_smi(&["--query-gpu=index,compute_cap", "--format=csv,noheader"])
            .map(|text| parse_compute_caps(&text))
            .unwrap_or_default()
    })
}

fn parse_compute_caps(text: &str) -> HashMap<u32, f32> {
    text.lines()
        .filter_map(|line| {
            let (i, cap) = line.split_once(',')?;
            Some((i.trim().parse().ok()?, cap.trim().parse().ok()?))
        })
        .collect()
}

/// Whether all of `gpus` compute in bfloat16 (compute capability 8.0 or later: Ampere,
/// Hopper…). A GPU whose capability is unknown is taken to support it.
pub fn bf16_supported(gpus: &[u32]) -> bool {
    let caps = compute_capabilities();
    gpus.iter().all(|g| caps.get(g).is_none_or(|&c| c >= 8.0))
}

/// GPU memory per process.
pub fn gpu_processes() -> GpuProcesses {
    let mut out = HashMap::new();
    if let Some(text) = nvidia_smi(&[
        "--query-compute-apps=pid,used_memory",
        "--format=csv,noheader,nounits",
    ]) {
        for line in text.lines() {
            if let Some((pid, mem)) = line.split_once(',')
                && let (Ok(pid), Some(mem)) = (pid.trim().parse::<u32>(), num(mem))
            {
                *out.entry(pid).or_insert(0.0) += mem;
            }
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub cores: usize,
    pub utilization_pct: Option<f64>,
    pub load_avg: Option<[f64; 3]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
}

fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((v.iter().sum(), idle))
}

/// CPU usage sampled over `window`.
pub async fn cpu(window: Duration) -> Cpu {
    let a = cpu_times();
    tokio::time::sleep(window).await;
    let b = cpu_times();
    let utilization_pct = match (a, b) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
            Some(((1.0 - (i1 - i0) as f64 / (t1 - t0) as f64) * 1000.0).round() / 10.0)
        }
        _ => None,
    };
    let load_avg = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| {
        let v: Vec<f64> = s
            .split_whitespace()
            .take(3)
            .filter_map(|x| x.parse().ok())
            .collect();
        (v.len() == 3).then(|| [v[0], v[1], v[2]])
    });
    Cpu {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        utilization_pct,
        load_avg,
    }
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Size and free space of a disk, in bytes.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct DiskSpace {
    pub total_bytes: u64,
    /// Available to this process's user (`f_bavail`).
    pub free_bytes: u64,
}

/// The disk holding `dir`, from `statvfs` (blocking); `None` when it cannot be read.
pub fn disk_space(dir: &std::path::Path) -> Option<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a statvfs the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 || st.f_blocks == 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some(DiskSpace {
        total_bytes: st.f_blocks as u64 * unit,
        free_bytes: st.f_bavail as u64 * unit,
    })
}

pub fn memory() -> Option<Memory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = meminfo_kib(&text, "MemTotal:")? * 1024;
    let available = meminfo_kib(&text, "MemAvailable:")? * 1024;
    Some(Memory {
        total_bytes: total,
        available_bytes: available,
        used_bytes: total.saturating_sub(available),
    })
}

/// Resident memory of a process, in bytes.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    meminfo_kib(&status, "VmRSS:").map(|k| k * 1024)
}

/// Whether a process exists (one of ours, or one we may not signal).
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// Sends `signal` to one process; false when there is none.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) -> bool {
    i32::try_from(pid)
        .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok())
}

/// Sends `signal` to a process group (a worker leads its own); false when there is none.
pub fn signal_group(pgid: u32, signal: nix::sys::signal::Signal) -> bool {
    i32::try_from(pgid).is_ok_and(|pgid| {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capabilities_parse() {
        let caps = parse_compute_caps("0, 9.0\n1, 7.5\nbad line\n");
        assert_eq!(caps.get(&0), Some(&9.0));
        assert_eq!(caps.get(&1), Some(&7.5));
        assert_eq!(caps.len(), 2);
    }

    #[tokio::test]
    async fn reads_this_machine() {
        let c = cpu(Duration::from_millis(50)).await;
        assert!(c.cores >= 1);
        assert!(c.utilization_pct.is_some());
        let m = memory().unwrap();
        assert!(m.total_bytes > m.available_bytes);
        assert!(process_rss(std::process::id()).unwrap() > 0);
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX), "no such process");
        let _ = gpus(); // empty here, listed on GPU machines
    }
}
