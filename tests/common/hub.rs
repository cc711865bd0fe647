//! A Hugging Face–compatible hub on loopback: the URL layout and headers the hub serves
//! (`/api/models/{repo}/revision/{rev}?blobs=true`, `HEAD`/`GET /{repo}/resolve/{rev}/{file}`
//! with `X-Repo-Commit`, `ETag`/`X-Linked-Etag`, `X-Linked-Size`, Range requests, `X-Error-Code`
//! on errors), so the real client (huggingface_hub) talks to it as it would to the hub. It can
//! require a token (a gated model), corrupt a file, or cut a download short once; it records
//! every request.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::Digest;

/// One file of a repository: its bytes come from a file on disk or from memory.
#[derive(Clone)]
pub enum Content {
    Disk(PathBuf),
    Bytes(Vec<u8>),
}

impl Content {
    fn read(&self) -> Vec<u8> {
        match self {
            Content::Disk(p) => std::fs::read(p).expect("hub fixture file"),
            Content::Bytes(b) => b.clone(),
        }
    }
}

/// A repository on the fixture hub.
#[derive(Clone)]
pub struct Repo {
    pub files: BTreeMap<String, Content>,
    /// Requests must carry `Authorization: Bearer <token>` (a gated model).
    pub token: Option<String>,
}

struct File {
    bytes: bytes::Bytes,
    /// Files over 1 KB are LFS files (sha256), like the hub's.
    sha256: Option<String>,
    blob_id: String,
}

struct HubRepo {
    commit: String,
    files: BTreeMap<String, File>,
    token: Option<String>,
}

/// One request the hub saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorized: bool,
}

#[derive(Default)]
struct Faults {
    /// Files served with one byte changed.
    corrupt: Vec<String>,
    /// (file, bytes): the next full GET of the file stops after that many bytes.
    cut_once: Option<(String, usize)>,
}

struct Inner {
    repos: Mutex<BTreeMap<String, HubRepo>>,
    seen: Mutex<Vec<Seen>>,
    faults: Mutex<Faults>,
}

pub struct Hub {
    pub base: String,
    inner: Arc<Inner>,
    _thread: std::thread::JoinHandle<()>,
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

fn git_blob_id(b: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    format!("{:x}", h.finalize())
}

impl Hub {
    pub fn start() -> Hub {
        let inner = Arc::new(Inner {
            repos: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let state = inner.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("hub runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("hub bind");
                let addr = listener.local_addr().expect("hub addr");
                tx.send(format!("http://{addr}")).expect("hub address");
                let app = axum::Router::new()
                    .route(
                        "/api/models/{org}/{name}/revision/{rev}",
                        axum::routing::get(model_info),
                    )
                    .route(
                        "/api/models/{org}/{name}",
                        axum::routing::get(model_info_main),
                    )
                    .route(
                        "/{org}/{name}/resolve/{rev}/{*file}",
                        axum::routing::get(resolve).head(resolve),
                    )
                    .with_state(state);
                axum::serve(listener, app).await.expect("hub serve");
            });
        });
        let base = rx.recv().expect("hub started");
        Hub {
            base,
            inner,
            _thread: thread,
        }
    }

    /// Publishes `repo` (`org/name`) at a commit; returns the commit.
    pub fn publish(&self, repo: &str, r: Repo) -> String {
        let mut files = BTreeMap::new();
        let mut h = sha2::Sha256::new();
        for (name, c) in &r.files {
            let bytes = c.read();
            h.update(name.as_bytes());
            h.update(&bytes);
            let sha256 = (bytes.len() > 1024).then(|| sha256_hex(&bytes));
            files.insert(
                name.clone(),
                File {
                    blob_id: git_blob_id(&bytes),
                    sha256,
                    bytes: bytes::Bytes::from(bytes),
                },
            );
        }
        let commit = format!("{:x}", h.finalize())[..40].to_string();
        self.inner.repos.lock().unwrap().insert(
            repo.to_string(),
            HubRepo {
                commit: commit.clone(),
                files,
                token: r.token,
            },
        );
        commit
    }

    pub fn corrupt(&self, file: &str, on: bool) {
        let mut f = self.inner.faults.lock().unwrap();
        f.corrupt.retain(|x| x != file);
        if on {
            f.corrupt.push(file.to_string());
        }
    }

    pub fn cut_once(&self, file: &str, after: usize) {
        self.inner.faults.lock().unwrap().cut_once = Some((file.to_string(), after));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    pub fn forget_seen(&self) {
        self.inner.seen.lock().unwrap().clear();
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "error": message }))).into_response();
    r.headers_mut()
        .insert("X-Error-Code", HeaderValue::from_str(code).unwrap());
    r.headers_mut()
        .insert("X-Error-Message", HeaderValue::from_str(message).unwrap());
    r
}

fn authorized(headers: &HeaderMap, token: &Option<String>) -> bool {
    match token {
        None => true,
        Some(t) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {t}")),
    }
}

fn record(inner: &Inner, req: &Request, headers: &HeaderMap) {
    inner.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        range: headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        authorized: headers.contains_key("authorization"),
    });
}

async fn model_info_main(
    state: State<Arc<Inner>>,
    UrlPath((org, name)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    model_info(state, UrlPath((org, name, "main".into())), req).await
}

async fn model_info(
    State(inner): State<Arc<Inner>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    record(&inner, &req, &headers);
    let repo_id = format!("{org}/{name}");
    let repos = inner.repos.lock().unwrap();
    let Some(repo) = repos.get(&repo_id) else {
        return error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        );
    };
    if rev != "main" && rev != repo.commit {
        return error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        );
    }
    let siblings: Vec<_> = repo
        .files
        .iter()
        .map(|(n, f)| {
            let mut s = json!({"rfilename": n, "size": f.bytes.len(), "blobId": f.blob_id});
            if let Some(sha) = &f.sha256 {
                s["lfs"] = json!({"sha256": sha, "size": f.bytes.len(), "pointerSize": 134});
            }
            s
        })
        .collect();
    axum::Json(json!({
        "_id": "fixture", "id": repo_id, "modelId": repo_id, "sha": repo.commit,
        "private": false, "gated": if repo.token.is_some() { json!("manual") } else { json!(false) },
        "disabled": false, "tags": ["safetensors"], "siblings": siblings,
        "lastModified": "2026-01-01T00:00:00.000Z",
    }))
    .into_response()
}

async fn resolve(
    State(inner): State<Arc<Inner>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    record(&inner, &req, &headers);
    let repo_id = format!("{org}/{name}");
    let (bytes, etag, linked, commit) = {
        let repos = inner.repos.lock().unwrap();
        let Some(repo) = repos.get(&repo_id) else {
            return error(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "Repository not found",
            );
        };
        if !authorized(&headers, &repo.token) {
            return error(
                StatusCode::UNAUTHORIZED,
                "GatedRepo",
                &format!(
                    "Access to model {repo_id} is restricted. You must have access to it and be \
                     authenticated to access it. Please log in."
                ),
            );
        }
        if rev != "main" && rev != repo.commit {
            return error(
                StatusCode::NOT_FOUND,
                "RevisionNotFound",
                &format!("Invalid rev id: {rev}"),
            );
        }
        let Some(f) = repo.files.get(&file) else {
            return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
        };
        let etag = f.sha256.clone().unwrap_or_else(|| f.blob_id.clone());
        (
            f.bytes.clone(),
            etag,
            f.sha256.is_some(),
            repo.commit.clone(),
        )
    };
    let (corrupt, cut) = {
        let mut faults = inner.faults.lock().unwrap();
        let corrupt = faults.corrupt.contains(&file);
        let cut = match &faults.cut_once {
            Some((f, n)) if *f == file && req.method() == Method::GET => {
                let n = *n;
                faults.cut_once = None;
                Some(n)
            }
            _ => None,
        };
        (corrupt, cut)
    };
    let total = bytes.len();
    let start = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|s| *s <= total);
    let mut resp = Response::builder()
        .header("X-Repo-Commit", &commit)
        .header("ETag", format!("\"{etag}\""))
        .header("Accept-Ranges", "bytes");
    if linked {
        resp = resp
            .header("X-Linked-Etag", format!("\"{etag}\""))
            .header("X-Linked-Size", total.to_string());
    }
    let from = start.unwrap_or(0);
    if start.is_some() {
        resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
            "Content-Range",
            format!("bytes {from}-{}/{total}", total.saturating_sub(1)),
        );
    }
    resp = resp.header("Content-Length", (total - from).to_string());
    if req.method() == Method::HEAD {
        return resp.body(Body::empty()).unwrap();
    }
    let mut body = bytes.slice(from..);
    if corrupt && !body.is_empty() {
        let mut b = body.to_vec();
        let i = b.len() / 2;
        b[i] ^= 0x5a;
        body = bytes::Bytes::from(b);
    }
    match cut {
        // Sends `n` bytes, then fails the stream: the connection closes mid-body.
        Some(n) => {
            let head = body.slice(..n.min(body.len()));
            let stream = futures_util::stream::unfold(Some(head), |head| async move {
                match head {
                    Some(h) => Some((Ok::<_, std::io::Error>(h), None)),
                    None => {
                        // Let the bytes reach the client before the connection drops.
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        Some((Err(std::io::Error::other("cut short")), None))
                    }
                }
            });
            resp.body(Body::from_stream(stream)).unwrap()
        }
        None => resp.body(Body::from(body)).unwrap(),
    }
}
