//! The web UI as the binary serves it: the embedded page and assets at `/`, the single-page
//! app's fallback for client routes, caching and compression headers, and API paths that
//! keep their JSON errors. (The browser test of the UI itself is static/tests/e2e.mjs.)

mod common;

use common::Server;

#[tokio::test]
async fn the_ui_is_served_without_shadowing_the_api() {
    let server = Server::start(&[]);
    let c = server.client();

    // The page, with a content security policy; client routes get the same page.
    let (status, body, headers) = c.get_bytes("/").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(headers["cache-control"], "no-cache");
    assert!(headers.contains_key("content-security-policy"));
    assert!(headers.contains_key("etag"));
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains("<div id=\"app\">"), "{html}");
    for route in ["/tasks/some-task", "/chat", "/login?next=%2Fdatasets"] {
        let (status, page, _) = c.get_bytes(route).await;
        assert_eq!(status, 200, "{route}");
        assert_eq!(String::from_utf8(page).unwrap(), html, "{route}");
    }

    // The hashed assets the page names: cacheable forever, gzip when asked for.
    let script = html
        .split('"')
        .find(|s| s.starts_with("/assets/") && s.ends_with(".js"))
        .expect("a script in the page")
        .to_string();
    let (status, plain, headers) = c.get_bytes(&script).await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(
        headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let gz = c
        .http
        .get(c.base.clone() + &script)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    let compressed = gz.bytes().await.unwrap();
    assert!(compressed.len() * 2 < plain.len(), "gzip should pay off");
    let mut inflated = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&compressed[..]),
        &mut inflated,
    )
    .unwrap();
    assert_eq!(inflated, plain);

    // Revalidation: the same ETag is a 304.
    let etag = headers["etag"].clone();
    let again = c
        .http
        .get(c.base.clone() + &script)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);

    // A missing file is a 404, not the page (a stale script must not get HTML).
    assert_eq!(c.get_bytes("/assets/gone-1234.js").await.0, 404);

    // The API keeps its JSON errors (OpenAI's shape under /v1).
    for path in ["/api/nope", "/api", "/v1/nope"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 404, "{path}");
        let message = if path.starts_with("/v1") {
            r.body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        } else {
            r.error().to_string()
        };
        assert!(!message.is_empty(), "{path}: {:?}", r.body);
    }
    let r = c.post("/", serde_json::json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(c.get("/health").await.body["status"], "ok");
}

#[tokio::test]
async fn the_upload_limit_is_published_for_the_ui() {
    let server = Server::start(&[("FERROTUNE_MAX_UPLOAD_BYTES", "12345")]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let s = alice.get("/api/system/status").await;
    assert_eq!(s.status, 200);
    assert_eq!(s.body["limits"]["max_upload_bytes"], 12345);
}
