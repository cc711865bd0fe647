//! Load and attack figures of a ferrotune server binary, optionally side by side with
//! another build (say, the previous release), in one run:
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench load -- --server target/release/ferrotune [--baseline OTHER_BINARY]
//! ```
//!
//! Each scenario runs on a fresh server with a fresh data dir:
//! - `logins`: 100 concurrent sign-ins with the right password (100 accounts made first);
//! - `sessions`: 100 concurrent `POST /api/chat/sessions`;
//! - `tasks`: 200 clients calling `GET /api/tasks` in a loop for 10 s;
//!
//! and reports, per scenario, how many requests were answered (within 60 s), the errors, the
//! wall time, and the server's peak resident memory (`VmHWM`). A server that stops answering
//! (the sled deadlock this was written for) shows as unanswered requests, not a hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ANSWER_WITHIN: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(binary: &Path) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(binary)
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--models-dir")
            .arg(dir.path().join("models"))
            .env("FERROTUNE_AUTO_SETUP", "false")
            .env("FERROTUNE_DEFAULT_MODEL", "")
            .env("FERROTUNE_REGISTER_MAX_PER_IP", "100000")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if !sent && let Some(i) = line.find("listening on http://") {
                    let addr = line[i + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server reports its address");
        Server {
            child,
            base,
            _dir: dir,
        }
    }

    fn peak_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default, Clone)]
struct Outcome {
    sent: u64,
    answered: u64,
    errors: u64,
    seconds: f64,
    peak_mb: f64,
    /// Median and 99th percentile latency of answered requests, in ms.
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sends the requests `make(i)` for i in 0..n at once; counts answers within the limit.
async fn concurrent<F>(server: &Server, n: u64, make: F) -> Outcome
where
    F: Fn(u64) -> reqwest::RequestBuilder,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let rb = make(i);
            tokio::spawn(async move {
                let t = Instant::now();
                let r = tokio::time::timeout(ANSWER_WITHIN, rb.send()).await;
                (r, t.elapsed())
            })
        })
        .collect();
    let mut out = Outcome {
        sent: n,
        ..Outcome::default()
    };
    let mut latencies = Vec::new();
    for h in handles {
        match h.await {
            Ok((Ok(Ok(resp)), took)) => {
                out.answered += 1;
                latencies.push(took.as_secs_f64() * 1000.0);
                if !resp.status().is_success() {
                    out.errors += 1;
                }
            }
            Ok((Ok(Err(_)), _)) => {
                out.answered += 1;
                out.errors += 1;
            }
            _ => {}
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    out.p50_ms = percentile(&latencies, 0.5);
    out.p99_ms = percentile(&latencies, 0.99);
    out.peak_mb = server.peak_mb();
    out
}

/// Registers `n` accounts (`load0`…), ten at a time.
async fn register(http: &reqwest::Client, base: &str, n: u64) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let mut hs = Vec::new();
        for &i in chunk {
            let rb = http.post(format!("{base}/api/auth/register")).json(&json!({
                "username": format!("load{i}"), "email": format!("load{i}@example.com"),
                "password": format!("password-{i}")}));
            hs.push(tokio::spawn(async move {
                tokio::time::timeout(ANSWER_WITHIN, rb.send()).await
            }));
        }
        for h in hs {
            let _ = h.await;
        }
    }
}

/// An access token for `load0`, if the server answers.
async fn token(http: &reqwest::Client, base: &str) -> Option<String> {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http.post(format!("{base}/api/auth/login"))
            .json(&json!({"username_or_email": "load0", "password": "password-0"}))
            .send(),
    )
    .await
    .ok()?
    .ok()?;
    r.json::<Value>()
        .await
        .ok()
        .and_then(|v| v["access_token"].as_str().map(str::to_string))
}

/// Every scenario on a fresh server (one that freezes in one scenario does not hide the
/// others).
async fn run(binary: &Path) -> Vec<(&'static str, Outcome)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let mut results = Vec::new();

    {
        let server = Server::start(binary);
        let base = server.base.clone();
        register(&http, &base, 100).await;
        let logins = concurrent(&server, 100, |i| {
            http.post(format!("{base}/api/auth/login")).json(&json!({
                "username_or_email": format!("load{i}"), "password": format!("password-{i}")}))
        })
        .await;
        results.push(("logins (100 at once)", logins));
    }

    {
        let server = Server::start(binary);
        let base = server.base.clone();
        register(&http, &base, 1).await;
        let outcome = match token(&http, &base).await {
            Some(token) => {
                concurrent(&server, 100, |i| {
                    http.post(format!("{base}/api/chat/sessions"))
                        .bearer_auth(&token)
                        .json(&json!({"title": format!("s{i}")}))
                })
                .await
            }
            None => Outcome::default(),
        };
        results.push(("sessions (100 at once)", outcome));
    }

    {
        let server = Server::start(binary);
        let base = server.base.clone();
        register(&http, &base, 1).await;
        let outcome = match token(&http, &base).await {
            Some(token) => tasks_load(&server, &http, &token).await,
            None => Outcome::default(),
        };
        results.push(("GET /api/tasks (200 clients, 10 s)", outcome));
    }
    results
}

/// 200 clients calling `GET /api/tasks` in a loop for 10 s.
async fn tasks_load(server: &Server, http: &reqwest::Client, token: &str) -> Outcome {
    let answered = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(10);
    let mut clients = Vec::new();
    for _ in 0..200 {
        let rb = http
            .get(format!("{}/api/tasks", server.base))
            .bearer_auth(token);
        let (answered, errors) = (answered.clone(), errors.clone());
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let Some(rb) = rb.try_clone() else { break };
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), rb.send()).await {
                    Ok(Ok(r)) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        answered.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await.unwrap_or_default());
    }
    latencies.sort_by(f64::total_cmp);
    let n = answered.load(Ordering::Relaxed);
    let e = errors.load(Ordering::Relaxed);
    Outcome {
        sent: n + e,
        answered: n,
        errors: e,
        seconds: started.elapsed().as_secs_f64(),
        peak_mb: server.peak_mb(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

fn print(name: &str, results: &[(&'static str, Outcome)]) {
    println!("\n{name}");
    println!(
        "  {:<38} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "scenario", "answered", "errors", "secs", "p50 ms", "p99 ms", "peak MB"
    );
    for (scenario, o) in results {
        println!(
            "  {:<38} {:>4}/{:<4} {:>7} {:>8.2} {:>9.1} {:>9.1} {:>9.0}",
            scenario, o.answered, o.sent, o.errors, o.seconds, o.p50_ms, o.p99_ms, o.peak_mb
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut server: Option<PathBuf> = None;
    let mut baseline: Option<PathBuf> = None;
    let mut benching = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--server" => server = args.next().map(PathBuf::from),
            "--baseline" => baseline = args.next().map(PathBuf::from),
            "--bench" => benching = true,
            _ => {}
        }
    }
    if !benching {
        // `cargo test --all-targets` runs benches once without `--bench`: this one needs a
        // release build and a minute, so it only runs under `cargo bench`.
        println!("load: run it with `cargo bench --bench load -- --server BINARY`");
        return;
    }
    let server = server.unwrap_or_else(|| PathBuf::from("target/release/ferrotune"));
    if !server.is_file() {
        eprintln!(
            "load: {} does not exist; build it first (cargo build --release)",
            server.display()
        );
        std::process::exit(2);
    }
    let ours = run(&server).await;
    print(&format!("{} (this build)", server.display()), &ours);
    if let Some(b) = baseline {
        let theirs = run(&b).await;
        print(&format!("{} (baseline)", b.display()), &theirs);
        println!("\nthis build vs the baseline (answered requests, peak memory):");
        for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
            println!(
                "  {name:<38} answered {}/{} vs {}/{}; peak {:.0} MB vs {:.0} MB ({:.2}×)",
                a.answered,
                a.sent,
                b.answered,
                b.sent,
                a.peak_mb,
                b.peak_mb,
                if a.peak_mb > 0.0 {
                    b.peak_mb / a.peak_mb
                } else {
                    f64::NAN
                }
            );
        }
    }
}
