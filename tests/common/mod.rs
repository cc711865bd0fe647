//! Starts the real `ferrotune` binary on a loopback port with a temporary data dir, and talks
//! HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use serde_json::{Value, json};

pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
}

impl Server {
    /// A server with a fresh data dir and the given extra `FERROTUNE_*` settings.
    pub fn start(env: &[(&str, &str)]) -> Server {
        Self::start_with(None, env)
    }

    /// Like [`Server::start`], with a given models dir (default: an empty temporary one).
    /// Unless `env` says otherwise, the server neither installs the Python environment nor
    /// pulls a default model.
    pub fn start_with(models_dir: Option<&Path>, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let models_dir = models_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("models"));
        let mut env: Vec<(&str, &str)> = env.to_vec();
        for (k, v) in [
            ("FERROTUNE_AUTO_SETUP", "false"),
            ("FERROTUNE_DEFAULT_MODEL", ""),
        ] {
            if !env.iter().any(|(key, _)| *key == k) {
                env.push((k, v));
            }
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut s = Server {
            child: None,
            base: String::new(),
            data_dir,
            models_dir,
            _dir: Some(dir),
            env,
        };
        s.spawn();
        s
    }

    /// A server on an existing data dir (left in place when the server stops), with an empty
    /// temporary models dir.
    pub fn start_at(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in [
            ("FERROTUNE_AUTO_SETUP", "false"),
            ("FERROTUNE_DEFAULT_MODEL", ""),
        ] {
            if !env.iter().any(|(key, _)| key == k) {
                env.push((k.to_string(), v.to_string()));
            }
        }
        let mut s = Server {
            child: None,
            base: String::new(),
            data_dir: data_dir.to_path_buf(),
            models_dir: dir.path().join("models"),
            _dir: Some(dir),
            env,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let models = self.models_dir.clone();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
        cmd.arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--models-dir")
            .arg(&models)
            .env("RUST_LOG", "info")
            .env_remove("FERROTUNE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ferrotune");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("FERROTUNE_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
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
            .expect("server did not report its address within 60 s");
        self.base = base;
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGKILL, no chance to flush: what a crash or `kill -9` does.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        None
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn client(&self) -> Client {
        Client {
            http: reqwest::Client::builder()
                .cookie_store(true)
                .build()
                .expect("client"),
            base: self.base.clone(),
            token: None,
        }
    }

    /// The server process's id (for its memory figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_path(&self) -> &Path {
        &self.data_dir
    }

    /// Where a task's outputs are on disk (answers show `output_dir` relative to the task's
    /// folder).
    pub fn task_output(&self, task: &Value) -> PathBuf {
        let id = task["task_id"].as_str().expect("task_id");
        let rel = task["output_dir"].as_str().expect("output_dir");
        assert!(!rel.starts_with('/'), "output_dir is relative: {rel}");
        self.data_dir.join("tasks").join(id).join(rel)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

/// A response's status and JSON body (Null when the body is not JSON).
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

impl Client {
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Some(token.to_string()),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    pub async fn send(rb: reqwest::RequestBuilder) -> Reply {
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::send(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn get_bytes(&self, path: &str) -> (u16, Vec<u8>, reqwest::header::HeaderMap) {
        let resp = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, resp.bytes().await.expect("body").to_vec(), headers)
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Self::send(self.req(reqwest::Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        Self::send(self.req(reqwest::Method::POST, path).json(&body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        Self::send(self.req(reqwest::Method::PATCH, path).json(&body)).await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        Self::send(
            self.req(reqwest::Method::POST, path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// Uploads `bytes` as the multipart field `file` named `name`.
    pub async fn upload(&self, name: &str, bytes: Vec<u8>) -> Reply {
        self.upload_to("/api/files/datasets", name, bytes, &[])
            .await
    }

    /// A multipart form to `path`: text `fields`, then the `file`.
    pub async fn upload_to(
        &self,
        path: &str,
        name: &str,
        bytes: Vec<u8>,
        fields: &[(&str, &str)],
    ) -> Reply {
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_string());
        form = form.part("file", part);
        Self::send(self.req(reqwest::Method::POST, path).multipart(form)).await
    }

    /// Registers and signs in; returns a client carrying the access token, and the login reply.
    pub async fn signup(&self, username: &str) -> (Client, Reply) {
        let password = format!("{username}-password");
        let r = self
            .post(
                "/api/auth/register",
                json!({"username": username, "email": format!("{username}@example.com"), "password": password}),
            )
            .await;
        assert_eq!(r.status, 201, "register {username}: {:?}", r.body);
        let login = self
            .post(
                "/api/auth/login",
                json!({"username_or_email": username, "password": password}),
            )
            .await;
        assert_eq!(login.status, 200, "login {username}: {:?}", login.body);
        let token = login.body["access_token"]
            .as_str()
            .expect("token")
            .to_string();
        (self.with_token(&token), login)
    }
}

// ---- training helpers ------------------------------------------------------------------

/// Models shared by test runs (the pull is cached; the folder survives fresh clones).
pub fn test_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERROTUNE_TEST_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    ferrotune::pyenv::cache_root().join("test-models")
}

pub const MODEL: &str = "SmolLM2-135M-Instruct";

pub fn arithmetic_dataset() -> Vec<u8> {
    let rows: Vec<Value> = (1..=16)
        .map(|i| {
            let (a, b) = (i % 7 + 1, i % 5 + 2);
            json!({"instruction": format!("What is {a} plus {b}?"), "input": "", "output": format!("{a} plus {b} is {}.", a + b)})
        })
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

pub async fn wait_until<F>(what: &str, timeout: Duration, mut check: F) -> Value
where
    F: AsyncFnMut() -> Option<Value>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn wait_for_environment_and_model(c: &Client) {
    wait_until(
        "the training environment and the default model",
        Duration::from_secs(1200),
        async || {
            let s = c.get("/api/system/status").await;
            let env = s.body["environment"]["state"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert_ne!(
                env, "failed",
                "environment install failed: {:?}",
                s.body["environment"]
            );
            assert_ne!(
                s.body["model_pull"]["state"], "failed",
                "model pull failed: {:?}",
                s.body["model_pull"]
            );
            let has_model = s.body["models"]
                .as_array()
                .is_some_and(|m| m.iter().any(|n| n == MODEL));
            (env == "ready" && has_model).then_some(s.body)
        },
    )
    .await;
}

/// A server on the shared test models dir that installs the environment and pulls the
/// default model if needed.
pub fn training_server(extra: &[(&str, &str)]) -> Server {
    let models = test_models_dir();
    std::fs::create_dir_all(&models).expect("models dir");
    let mut env = vec![
        ("FERROTUNE_AUTO_SETUP", "true"),
        ("FERROTUNE_DEFAULT_MODEL", "smollm2-135m-instruct"),
        // The tests' webhook receivers listen on loopback.
        ("FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(Some(&models), &env)
}

/// Uploads the arithmetic dataset; returns its id.
pub async fn upload_arithmetic(c: &Client) -> String {
    let up = c.upload("arith.json", arithmetic_dataset()).await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    up.body["file_id"].as_str().expect("file_id").to_string()
}

/// Submits a small LoRA task; returns its id.
pub async fn submit_task(c: &Client, dataset_id: &str, extra: Value) -> String {
    let mut body = json!({
        "name": "t", "model_name": MODEL, "dataset_id": dataset_id,
        "epochs": 1, "learning_rate": 0.001, "batch_size": 4, "cutoff_len": 64,
        "logging_steps": 1, "save_steps": 2, "lora_rank": 4,
    });
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            body[k] = v.clone();
        }
    }
    let r = c.post("/api/tasks", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["task_id"].as_str().expect("task_id").to_string()
}

/// The process id of a running task's worker, as `/api/system/resources` shows it to an
/// administrator (task answers do not carry it).
pub async fn worker_pid(admin: &Client, task_id: &str) -> u64 {
    wait_until("the worker's pid", Duration::from_secs(60), async || {
        let r = admin.get("/api/system/resources").await;
        r.body["running_tasks"]
            .as_array()
            .and_then(|tasks| tasks.iter().find(|t| t["task_id"] == task_id))
            .and_then(|t| t["pid"].as_u64())
            .map(Value::from)
    })
    .await
    .as_u64()
    .expect("pid")
}

/// Waits for a task to reach one of `statuses`; returns its detail.
pub async fn wait_status(c: &Client, id: &str, statuses: &[&str], timeout: Duration) -> Value {
    let want: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    wait_until(
        &format!("task {id} to be {statuses:?}"),
        timeout,
        async || {
            let t = c.get(&format!("/api/tasks/{id}")).await.body;
            let s = t["status"].as_str().unwrap_or("").to_string();
            want.contains(&s).then_some(t)
        },
    )
    .await
}

/// One server-sent event, with the wall-clock time it arrived (Unix seconds).
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
    pub received: f64,
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Subscribes to an SSE endpoint; events arrive on the returned channel until the stream
/// ends or the receiver is dropped.
pub async fn sse(
    c: &Client,
    path: &str,
    last_event_id: Option<u64>,
) -> tokio::sync::mpsc::UnboundedReceiver<SseEvent> {
    use futures_util::StreamExt;
    let mut req = c
        .http
        .get(format!("{}{}", c.base, path))
        .header("accept", "text/event-stream");
    if let Some(t) = &c.token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = req.send().await.expect("sse request");
    assert_eq!(resp.status().as_u16(), 200, "sse status");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        while let Some(Ok(chunk)) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find('\n') {
                let line = buf[..pos].trim_end_matches('\r').to_string();
                buf.drain(..=pos);
                if line.is_empty() {
                    if !data.is_empty() {
                        let ev = SseEvent {
                            id,
                            event: if event.is_empty() {
                                "message".into()
                            } else {
                                event.clone()
                            },
                            data: serde_json::from_str(&data)
                                .unwrap_or(Value::String(data.clone())),
                            received: unix_now(),
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    id = None;
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
        }
    });
    rx
}

/// Whether a process exists.
pub fn process_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// A `.zip` of `files` (name, bytes).
pub fn zip_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in files {
        w.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut w, data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

// ---- a webhook receiver ----------------------------------------------------------------

/// What a loopback webhook receiver saw: one entry per request (path, headers, body, when).
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    pub at: std::time::Instant,
    /// The same moment on the wall clock (to compare with the server's times).
    pub wall: time::OffsetDateTime,
}

/// A real HTTP server on loopback that records the webhooks it gets. `/ok` answers 204,
/// `/flaky` answers 500 to its first two requests and 204 after, `/down` always 503.
pub async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    use axum::http::{HeaderMap, StatusCode, Uri};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Received>::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: String| {
        let log = log.clone();
        async move {
            let h = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let mut log = log.lock().unwrap();
            log.push(Received {
                path: uri.path().to_string(),
                id: h("webhook-id"),
                timestamp: h("webhook-timestamp"),
                signature: h("webhook-signature"),
                body,
                at: std::time::Instant::now(),
                wall: time::OffsetDateTime::now_utc(),
            });
            let flaky_seen = log.iter().filter(|r| r.path == "/flaky").count();
            match uri.path() {
                "/flaky" if flaky_seen <= 2 => StatusCode::INTERNAL_SERVER_ERROR,
                "/down" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::NO_CONTENT,
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// Checks a request's signature the way a receiver would (Standard Webhooks).
pub fn verify(secret: &str, r: &Received) -> bool {
    ferrotune::webhooks::sign(secret, &r.id, r.timestamp.parse().unwrap_or(0), &r.body)
        .is_ok_and(|s| s == r.signature)
}

/// One message an SMTP server took: the envelope and the message as sent.
#[derive(Clone, Debug)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

impl Mail {
    /// The first run of `n` digits in the message (a code).
    pub fn code(&self, n: usize) -> Option<String> {
        let b = self.data.as_bytes();
        (0..b.len().saturating_sub(n - 1))
            .find(|&i| {
                b[i..i + n].iter().all(u8::is_ascii_digit)
                    && (i == 0 || !b[i - 1].is_ascii_digit())
                    && b.get(i + n).is_none_or(|c| !c.is_ascii_digit())
            })
            .map(|i| self.data[i..i + n].to_string())
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.data
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_string())
            })
    }
}

/// A real SMTP server on loopback (RFC 5321's plain dialogue: EHLO, MAIL, RCPT, DATA with
/// dot-unstuffing, RSET, NOOP, QUIT) that keeps the messages it is given. Returns its
/// `smtp://` URL.
pub async fn smtp_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Mail>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mails = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Mail>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kept = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 localhost ESMTP test\r\n").await;
                let (mut from, mut to) = (String::new(), Vec::new());
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-localhost\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
                        b"250 OK\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        from = line[10..].trim().trim_matches(['<', '>']).to_string();
                        b"250 OK\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        to.push(line[8..].trim().trim_matches(['<', '>']).to_string());
                        b"250 OK\r\n"
                    } else if upper.starts_with("RSET") {
                        from.clear();
                        to.clear();
                        b"250 OK\r\n"
                    } else if upper == "DATA" {
                        let _ = write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await;
                        let mut data = String::new();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            data.push_str(l.strip_prefix('.').unwrap_or(&l));
                            data.push('\n');
                        }
                        kept.lock().unwrap().push(Mail {
                            from: std::mem::take(&mut from),
                            to: std::mem::take(&mut to),
                            data,
                        });
                        b"250 OK queued\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"502 not implemented\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("smtp://{addr}"), mails)
}
