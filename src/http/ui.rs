//! The web UI: the files build.rs built from `static/` and embedded in the binary, served at `/`
//! with the single-page app's fallback (any other path that does not look like a file gets
//! `index.html`, so client routes survive a reload). API paths (`/api`, `/v1`, `/health`) are
//! never shadowed: unknown ones keep the JSON 404.
//!
//! `FERROTUNE_STATIC_DIR=static/dist` serves the files from disk instead (development: rebuild
//! with `npm run build` without rebuilding the binary, or use `npm run dev` with its proxy).

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file.
pub struct Asset {
    /// Relative to the UI's root, e.g. `index.html`, `assets/index-1a2b3c.js`.
    pub path: &'static str,
    pub content_type: &'static str,
    /// A quoted content hash.
    pub etag: &'static str,
    /// Vite's content-hashed output (`assets/`): cacheable forever.
    pub immutable: bool,
    pub body: &'static [u8],
    /// The gzip-compressed body, when that is smaller.
    pub gzip: Option<&'static [u8]>,
}

static ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));

/// Whether this binary carries the real UI (false: a placeholder page, built without npm).
pub const BUILT: bool = matches!(env!("FERROTUNE_UI_BUILT").as_bytes(), b"1");

/// Content-Security-Policy of the UI's pages: its own scripts and styles only (Vue sets
/// style attributes, hence `'unsafe-inline'` for styles), no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; \
                   base-uri 'self'; frame-ancestors 'none'; form-action 'self'";

/// Paths that belong to the API, never to the UI.
pub fn is_api_path(path: &str) -> bool {
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    under("/api") || under("/v1") || path == "/health"
}

/// Where the UI comes from.
#[derive(Clone)]
pub enum Source {
    Embedded,
    /// Files on disk (development).
    Dir(PathBuf),
}

impl Source {
    /// `FERROTUNE_STATIC_DIR` when set, else the embedded files.
    pub fn from_env() -> Source {
        match std::env::var_os("FERROTUNE_STATIC_DIR").filter(|v| !v.is_empty()) {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                tracing::info!(dir = %dir.display(), "serving the web UI from disk (FERROTUNE_STATIC_DIR)");
                Source::Dir(dir)
            }
            None => {
                if !BUILT {
                    tracing::warn!(
                        "this binary was built without the web UI (npm missing or FERROTUNE_SKIP_UI)"
                    );
                }
                Source::Embedded
            }
        }
    }
}

/// The router's fallback: the UI for GET/HEAD outside the API, else `api_fallback`.
pub async fn serve(source: Source, req: Request, api_fallback: Response) -> Response {
    let path = req.uri().path().to_string();
    if is_api_path(&path) || !(req.method() == Method::GET || req.method() == Method::HEAD) {
        return api_fallback;
    }
    match source {
        Source::Embedded => embedded(&path, req.method() == Method::HEAD, req.headers()),
        Source::Dir(dir) => from_dir(dir, req).await,
    }
}

/// A request path that names a file (its last segment has an extension) gets a 404 when
/// missing, instead of the app's page (a missing script must not be answered with HTML).
fn looks_like_file(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|last| last.contains('.'))
}

fn find(rel: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == rel)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

fn not_found_file() -> Response {
    (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        "not found",
    )
        .into_response()
}

fn embedded(path: &str, head: bool, headers: &HeaderMap) -> Response {
    let rel = path.trim_start_matches('/');
    let asset = match find(rel) {
        Some(a) => a,
        None if looks_like_file(rel) => return not_found_file(),
        None => match find("index.html") {
            Some(a) => a,
            None => return not_found_file(),
        },
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let gzip = asset.gzip.filter(|_| accepts_gzip(headers));
    let body = gzip.unwrap_or(asset.body);

    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body))
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    if asset.gzip.is_some() {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if fresh {
        return response;
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if gzip.is_some() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    security_headers(h, asset.content_type);
    response
}

fn security_headers(h: &mut HeaderMap, content_type: &str) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if content_type.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
}

/// Development: the files from a folder, with the same fallback to `index.html`.
async fn from_dir(dir: PathBuf, req: Request) -> Response {
    use tower::ServiceExt;
    use tower_http::services::{ServeDir, ServeFile};

    let rel = req.uri().path().trim_start_matches('/').to_string();
    if rel.split('/').any(|seg| seg == "..") {
        return not_found_file();
    }
    if looks_like_file(&rel) && !dir.join(&rel).is_file() {
        return not_found_file();
    }
    // Anything else that is not a file is a client route: its page is index.html.
    let service = ServeDir::new(&dir).fallback(ServeFile::new(dir.join("index.html")));
    let mut response = match service.oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(never) => match never {},
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    security_headers(h, &ct);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_are_never_the_ui() {
        for p in ["/api", "/api/tasks", "/v1", "/v1/models", "/health"] {
            assert!(is_api_path(p), "{p}");
        }
        for p in ["/", "/tasks/abc", "/apis", "/v1x", "/healthz", "/chat"] {
            assert!(!is_api_path(p), "{p}");
        }
    }

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br;q=1.0, gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("*"));
        assert!(accepts_gzip(&h));
    }

    #[test]
    fn files_and_routes() {
        assert!(looks_like_file("assets/index-abc.js"));
        assert!(looks_like_file("favicon.ico"));
        assert!(!looks_like_file("tasks/0192-abc"));
        assert!(!looks_like_file(""));
    }

    #[test]
    fn index_is_embedded_with_a_policy() {
        let r = embedded("/", false, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let client_route = embedded("/tasks/some-id", false, &HeaderMap::new());
        assert_eq!(client_route.status(), StatusCode::OK);
        assert_eq!(
            embedded("/assets/missing.js", false, &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
        let etag = r.headers()[header::ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            embedded("/index.html", false, &h).status(),
            StatusCode::NOT_MODIFIED
        );
    }
}
