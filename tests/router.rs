//! The HTTP rules, in process: the router driven with `tower::ServiceExt::oneshot`, no socket
//! and no server process. Authentication on every documented route, administrators' routes,
//! isolation between users, and validation of bodies and queries.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use ferrotune::config::Config;
use ferrotune::http::{AppState, router};
use ferrotune::store::Store;
use serde_json::{Value, json};
use tower::ServiceExt;

struct App {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        models_dir: dir.path().join("models"),
        register_max_per_ip: 1000,
        auto_setup: false,
        default_model: String::new(),
        max_upload_bytes: 4096,
        max_json_bytes: 4096,
        ..Config::default()
    };
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let store = Store::open(&config.store_dir()).unwrap();
    let state = AppState::new(config, store).unwrap();
    App {
        router: router(state),
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    body: Value,
}

impl App {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    async fn raw(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// Registers and signs in; returns the access token.
    async fn user(&self, name: &str) -> String {
        let r = self
            .call(
                Method::POST,
                "/api/auth/register",
                None,
                Some(json!({"username": name, "email": format!("{name}@x.io"), "password": "password-1"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let r = self
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({"username_or_email": name, "password": "password-1"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body["access_token"].as_str().unwrap().to_string()
    }
}

/// Every operation of the served document, with its path parameters filled in.
fn operations() -> Vec<(Method, String, bool)> {
    let doc = serde_json::to_value(ferrotune::http::openapi::document()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            // An empty security requirement means "no credentials needed".
            let public = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
            });
            let filled: String = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "0000" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            out.push((m, filled, public));
        }
    }
    out
}

#[tokio::test]
async fn every_documented_route_needs_credentials_unless_marked_public() {
    let app = app();
    let ops = operations();
    assert!(ops.len() > 40, "{} operations", ops.len());
    let mut public: Vec<String> = ops
        .iter()
        .filter(|(_, _, p)| *p)
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    public.sort();
    assert_eq!(
        public,
        [
            "GET /health",
            "POST /api/auth/login",
            "POST /api/auth/password-reset",
            "POST /api/auth/password-reset/confirm",
            "POST /api/auth/refresh",
            "POST /api/auth/register",
        ],
        "only these are public"
    );
    for (method, path, is_public) in &ops {
        if *is_public {
            continue;
        }
        for token in [None, Some("garbage"), Some("ft-not-a-key")] {
            let r = app.call(method.clone(), path, token, Some(json!({}))).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {:?}",
                r.body
            );
        }
    }
}

#[tokio::test]
async fn administrators_routes_refuse_users() {
    let app = app();
    let admin = app.user("admin1").await; // the first account is the administrator
    let user = app.user("user1").await;
    for (method, path, _) in operations() {
        if !path.starts_with("/api/admin") {
            continue;
        }
        let r = app
            .call(method.clone(), &path, Some(&user), Some(json!({})))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    let r = app
        .call(Method::GET, "/api/admin/users", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .call(Method::GET, "/api/tasks?all=true", Some(&user), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn another_users_objects_are_not_found() {
    let app = app();
    let _admin = app.user("admin1").await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;

    // Alice's dataset (a multipart upload), chat session and API key.
    let boundary = "XyZ";
    let rows = r#"[{"instruction": "q", "output": "a"}]"#;
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.json\"\r\nContent-Type: application/json\r\n\r\n{rows}\r\n--{boundary}--\r\n"
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/files/datasets")
        .header("authorization", format!("Bearer {alice}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(form))
        .unwrap();
    let up = app.raw(req).await;
    assert_eq!(up.status, StatusCode::CREATED, "{:?}", up.body);
    let ds = up.body["file_id"].as_str().unwrap().to_string();
    let s = app
        .call(
            Method::POST,
            "/api/chat/sessions",
            Some(&alice),
            Some(json!({"title": "t"})),
        )
        .await;
    let session = s.body["session_id"].as_str().unwrap().to_string();
    let k = app
        .call(
            Method::POST,
            "/api/keys",
            Some(&alice),
            Some(json!({"name": "k"})),
        )
        .await;
    let key = k.body["key_id"].as_str().unwrap().to_string();

    let probes = [
        (Method::GET, format!("/api/files/datasets/{ds}")),
        (Method::GET, format!("/api/files/datasets/{ds}/preview")),
        (Method::GET, format!("/api/files/datasets/{ds}/download")),
        (Method::DELETE, format!("/api/files/datasets/{ds}")),
        (Method::GET, format!("/api/chat/sessions/{session}")),
        (Method::PATCH, format!("/api/chat/sessions/{session}")),
        (
            Method::POST,
            format!("/api/chat/sessions/{session}/messages"),
        ),
        (Method::GET, format!("/api/chat/sessions/{session}/export")),
        (Method::DELETE, format!("/api/chat/sessions/{session}")),
        (Method::DELETE, format!("/api/keys/{key}")),
    ];
    for (method, path) in &probes {
        let body = match *method {
            Method::PATCH => Some(json!({"title": "mine"})),
            Method::POST => Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
            _ => None,
        };
        let r = app.call(method.clone(), path, Some(&bob), body).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "bob: {method} {path}: {:?}",
            r.body
        );
    }
    // Still alice's, untouched.
    for (method, path) in &probes[..1] {
        let r = app.call(method.clone(), path, Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK, "alice: {method} {path}");
    }
    let r = app
        .call(
            Method::GET,
            &format!("/api/chat/sessions/{session}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.body["title"], "t");
    // Bob's lists do not show alice's objects.
    let r = app
        .call(Method::GET, "/api/files/datasets", Some(&bob), None)
        .await;
    assert_eq!(r.body["files"].as_array().unwrap().len(), 0);
    let r = app.call(Method::GET, "/api/keys", Some(&bob), None).await;
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn bad_bodies_and_queries_get_our_error_shape() {
    let app = app();
    let alice = app.user("alice").await;
    let app = Arc::new(app);
    // Malformed JSON: 400; well-formed but wrong: 422; too large: 413 — always {error, code}.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/tasks")
        .header("authorization", format!("Bearer {alice}"))
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let r = app.raw(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], "malformed_body");
    let cases = [
        (json!({"name": "t"}), "invalid_body"),
        (
            json!({"name": "t", "model_name": "m", "dataset_id": "d", "bogus": 1}),
            "invalid_body",
        ),
        (
            json!({"name": "t", "model_name": "m", "dataset_id": "d", "epochs": 0}),
            "invalid_spec",
        ),
        (
            json!({"name": "t", "model_name": "m", "dataset_id": "d", "seed": u64::MAX}),
            "invalid_spec",
        ),
        (
            json!({"name": "t", "model_name": "m", "dataset_id": "d", "output_dir": "../x"}),
            "invalid_spec",
        ),
        (
            json!({"name": "t", "model_name": "m", "dataset_id": "d", "template": "nope"}),
            "invalid_spec",
        ),
    ];
    for (body, code) in cases {
        let r = app
            .call(Method::POST, "/api/tasks", Some(&alice), Some(body.clone()))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {:?}",
            r.body
        );
        assert_eq!(r.body["code"], code, "{body}: {:?}", r.body);
        assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let big = json!({"title": "x".repeat(8000)});
    let r = app
        .call(Method::POST, "/api/chat/sessions", Some(&alice), Some(big))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = app
        .call(
            Method::GET,
            "/api/files/models?kind=wizard",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], "bad_query");
    let r = app
        .call(
            Method::GET,
            "/api/files/models?kind=adapter",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for (username, email, password) in [
        ("ab", "a@x.io", "password-1"),
        ("abc", "nope", "password-1"),
        ("abc", "a@x.io", "short"),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/auth/register",
                None,
                Some(json!({"username": username, "email": email, "password": password})),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{username} {email}"
        );
    }
    // Unknown routes and methods keep the JSON shape.
    let r = app.call(Method::GET, "/api/nope", Some(&alice), None).await;
    assert_eq!(
        (r.status, r.body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("no_route"))
    );
    let r = app
        .call(Method::PUT, "/api/tasks", Some(&alice), None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // /v1 answers in OpenAI's shape.
    let r = app
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some(&alice),
            Some(json!({"model": "m", "messages": []})),
        )
        .await;
    assert!(r.body["error"]["message"].is_string(), "{:?}", r.body);
}

#[tokio::test]
async fn the_document_is_served() {
    let app = app();
    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["openapi"], "3.1.0");
    assert!(r.body["paths"]["/api/tasks/{id}/events"]["get"].is_object());
    assert!(r.body["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn an_administrator_registers_a_model_folder_already_on_the_server() {
    let app = app();
    let admin = app.user("admin1").await;
    let user = app.user("user1").await;
    let elsewhere = app._dir.path().join("elsewhere");
    let folder = elsewhere.join("My-Model");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::create_dir_all(elsewhere.join("empty")).unwrap();
    std::fs::write(folder.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let post = async |token: &str, body: Value| {
        app.call(Method::POST, "/api/files/models", Some(token), Some(body))
            .await
    };
    let path = folder.to_string_lossy().to_string();
    assert_eq!(
        post(&user, json!({"path": path})).await.status,
        StatusCode::FORBIDDEN
    );
    for (body, why) in [
        (json!({"path": "My-Model"}), "a relative path"),
        (json!({"path": elsewhere.join("nope")}), "no folder"),
        (json!({"path": elsewhere.join("empty")}), "no model in it"),
        (json!({"path": path, "name": ".hidden"}), "a hidden name"),
        (json!({"path": path, "name": "a/b"}), "a slash"),
        (json!({"path": path, "extra": 1}), "an unknown field"),
    ] {
        let r = post(&admin, body).await;
        assert!(
            r.status == StatusCode::UNPROCESSABLE_ENTITY || r.status == StatusCode::BAD_REQUEST,
            "{why}: {} {:?}",
            r.status,
            r.body
        );
        assert!(r.body["error"].is_string(), "{why}: {:?}", r.body);
    }
    let r = post(&admin, json!({"path": path})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["name"], "My-Model");
    assert_eq!(r.body["kind"], "base");
    assert!(
        !r.body
            .to_string()
            .contains(&*app._dir.path().to_string_lossy()),
        "no absolute server path in the answer: {:?}",
        r.body
    );
    // At once in everyone's lists.
    let r = app
        .call(
            Method::GET,
            "/api/files/models?kind=base",
            Some(&user),
            None,
        )
        .await;
    assert!(
        r.body["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "My-Model"),
        "{:?}",
        r.body
    );
    // A burst of registrations of one name at once: exactly one wins, the rest are 409s.
    let mut folders = Vec::new();
    for i in 0..16 {
        let f = elsewhere.join(format!("burst-{i}"));
        std::fs::create_dir_all(&f).unwrap();
        std::fs::write(f.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        folders.push(f);
    }
    let burst = futures_util::future::join_all(
        folders
            .iter()
            .map(|f| post(&admin, json!({"path": f, "name": "Burst"}))),
    )
    .await;
    let created = burst
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(
        created,
        1,
        "{:?}",
        burst.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &burst {
        assert!(
            r.status == StatusCode::CREATED || r.body["code"] == "name_taken",
            "{} {:?}",
            r.status,
            r.body
        );
    }
    let second = elsewhere.join("second");
    std::fs::create_dir_all(&second).unwrap();
    std::fs::write(second.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let again = post(&admin, json!({"path": second, "name": "My-Model"})).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);
    assert_eq!(again.body["code"], "name_taken");
    // The same folder under another name, or a folder inside the models folder: there
    // already.
    let r = post(&admin, json!({"path": path, "name": "Other"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(r.body["code"], "already_registered");
    let inside = app._dir.path().join("models").join("Real");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::write(inside.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let r = post(&admin, json!({"path": inside, "name": "Other"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(r.body["code"], "already_registered");
}
