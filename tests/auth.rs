//! Accounts, tokens and API keys, over HTTP against the real server.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::Server;
use serde_json::json;

#[tokio::test]
async fn registration_rules() {
    let server = Server::start(&[]);
    let c = server.client();
    let reg = |u: &str, e: &str, p: &str| json!({"username": u, "email": e, "password": p});
    let r = c
        .post(
            "/api/auth/register",
            reg("alice", "alice@example.com", "password1"),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(r.body["user_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(r.body["role"], "admin", "the first account is admin");
    assert!(r.body["message"].is_string());

    let r = c
        .post(
            "/api/auth/register",
            reg("bob", "bob@example.com", "password1"),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["role"], "user");

    for (body, status, code) in [
        (
            reg("ALICE", "x@example.com", "password1"),
            409,
            "username_taken",
        ),
        (
            reg("carol", "Alice@Example.com", "password1"),
            409,
            "email_taken",
        ),
        (
            reg("ab", "c@example.com", "password1"),
            422,
            "invalid_username",
        ),
        (
            reg("a".repeat(21).as_str(), "c@example.com", "password1"),
            422,
            "invalid_username",
        ),
        (
            reg("bad name", "c@example.com", "password1"),
            422,
            "invalid_username",
        ),
        (
            reg("carol", "not-an-email", "password1"),
            422,
            "invalid_email",
        ),
        (reg("carol", "c@example.com", "short"), 422, "weak_password"),
        (json!({"username": "carol"}), 422, "invalid_body"),
    ] {
        let r = c.post("/api/auth/register", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        assert_eq!(r.code(), code, "{body}");
        assert!(!r.error().is_empty());
    }
    let r = c
        .post_raw(
            "/api/auth/register",
            "application/json",
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "malformed_body");
}

#[tokio::test]
async fn login_me_and_wrong_credentials() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, login) = c.signup("alice").await;
    assert_eq!(login.body["token_type"], "bearer");
    assert!(login.body["expires_in"].as_u64().is_some_and(|s| s > 0));
    assert!(login.body["refresh_token"].is_string());
    assert_eq!(login.body["user"]["username"], "alice");
    assert_eq!(login.body["user"]["role"], "admin");
    let cookie = login
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("ferrotune_refresh="))
        .expect("refresh cookie")
        .to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");

    let me = alice.get("/api/auth/me").await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["username"], "alice");
    assert_eq!(me.body["email"], "alice@example.com");
    assert_eq!(me.body["role"], "admin");
    assert!(me.body["created_at"].is_string());
    assert!(me.body.get("password_hash").is_none());

    // By email too, case-insensitively.
    let r = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "ALICE@example.com", "password": "alice-password"}),
        )
        .await;
    assert_eq!(r.status, 200);

    let wrong_pw = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "nope-nope"}),
        )
        .await;
    let unknown = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "nobody", "password": "nope-nope"}),
        )
        .await;
    assert_eq!(wrong_pw.status, 401);
    assert_eq!(unknown.status, 401);
    assert_eq!(
        wrong_pw.body, unknown.body,
        "same answer for unknown user and wrong password"
    );

    assert_eq!(c.get("/api/auth/me").await.status, 401, "no token");
    assert_eq!(
        c.with_token("garbage").get("/api/auth/me").await.status,
        401
    );
}

#[tokio::test]
async fn changing_the_password_ends_other_sessions() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, login) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let old_refresh = login.body["refresh_token"].as_str().unwrap().to_string();
    let change =
        |current: &str, new: &str| json!({"current_password": current, "new_password": new});

    // The current password must be right, the new one valid and different.
    let r = alice
        .post(
            "/api/auth/password",
            change("wrong-password", "a-new-password"),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (422, "wrong_password"),
        "{:?}",
        r.body
    );
    let r = alice
        .post("/api/auth/password", change("alice-password", "short"))
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let r = alice
        .post(
            "/api/auth/password",
            change("alice-password", "alice-password"),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "same_password"));
    let r = c
        .post(
            "/api/auth/password",
            change("alice-password", "a-new-password"),
        )
        .await;
    assert_eq!(r.status, 401, "needs a session");
    // An API key cannot take over the account.
    let key = alice.post("/api/keys", json!({"name": "nb"})).await;
    let with_key = c.with_token(key.body["key"].as_str().unwrap());
    let r = with_key
        .post(
            "/api/auth/password",
            change("alice-password", "a-new-password"),
        )
        .await;
    assert_eq!(r.status, 403);

    let r = alice
        .post(
            "/api/auth/password",
            change("alice-password", "a-new-password"),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let fresh = c.with_token(r.body["access_token"].as_str().unwrap());
    assert_eq!(
        fresh.get("/api/auth/me").await.status,
        200,
        "the new session works"
    );
    // The old access token and refresh token are dead at once; the key still works.
    assert_eq!(alice.get("/api/auth/me").await.status, 401);
    let r = c
        .post("/api/auth/refresh", json!({"refresh_token": old_refresh}))
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(with_key.get("/api/auth/me").await.status, 200);
    // Only the new password signs in; other users are untouched.
    let login = |pw: &str| json!({"username_or_email": "alice", "password": pw});
    assert_eq!(
        c.post("/api/auth/login", login("alice-password"))
            .await
            .status,
        401
    );
    assert_eq!(
        c.post("/api/auth/login", login("a-new-password"))
            .await
            .status,
        200
    );
    assert_eq!(bob.get("/api/auth/me").await.status, 200);

    // An administrator can reset a forgotten password; it ends that user's sessions too.
    let bob_id = bob.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/admin/users/{bob_id}");
    let r = fresh.patch(&path, json!({"password": "short"})).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        bob.get("/api/auth/me").await.status,
        200,
        "nothing half-done"
    );
    let r = fresh
        .patch(&path, json!({"password": "bob-new-password"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(bob.get("/api/auth/me").await.status, 401);
    let r = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "bob-new-password"}),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn tampered_and_unsigned_tokens_are_refused() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let token = alice.token.clone().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();

    // Payload changed to another user, signature kept.
    let bob_id = bob.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut forged = payload.clone();
    forged["sub"] = json!(bob_id);
    let forged_b64 = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
    let tampered = format!("{}.{}.{}", parts[0], forged_b64, parts[2]);
    assert_eq!(
        c.with_token(&tampered).get("/api/auth/me").await.status,
        401
    );

    // alg: none, no signature.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    for t in [
        format!("{none_header}.{}.", parts[1]),
        format!("{none_header}.{}", parts[1]),
    ] {
        assert_eq!(
            c.with_token(&t).get("/api/auth/me").await.status,
            401,
            "{t}"
        );
    }

    // Signed with another key.
    let other = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &payload,
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-not-the-server-secret"),
    )
    .unwrap();
    assert_eq!(c.with_token(&other).get("/api/auth/me").await.status, 401);

    // Expired.
    let mut expired = payload.clone();
    expired["exp"] = json!(1_000_000);
    let forged_b64 = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&expired).unwrap());
    let t = format!("{}.{}.{}", parts[0], forged_b64, parts[2]);
    assert_eq!(c.with_token(&t).get("/api/auth/me").await.status, 401);

    // The secret is private to the server.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(server.data_path().join("jwt_secret")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}

#[tokio::test]
async fn refresh_rotates_and_detects_reuse() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, login) = c.signup("alice").await;
    let r1 = login.body["refresh_token"].as_str().unwrap().to_string();

    let r = c
        .post("/api/auth/refresh", json!({"refresh_token": r1}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r2 = r.body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2, "rotated");
    let access2 = r.body["access_token"].as_str().unwrap().to_string();
    assert_eq!(c.with_token(&access2).get("/api/auth/me").await.status, 200);

    // The old one no longer works.
    let again = c
        .post("/api/auth/refresh", json!({"refresh_token": r1}))
        .await;
    assert_eq!(again.status, 401);

    // The cookie works too (the client's cookie jar holds the latest one).
    let by_cookie = c
        .post_raw("/api/auth/refresh", "application/json", vec![])
        .await;
    assert_eq!(by_cookie.status, 200, "{:?}", by_cookie.body);
    let r3 = by_cookie.body["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();

    // Logout revokes the session's refresh tokens.
    let out = alice
        .post("/api/auth/logout", json!({"refresh_token": r3}))
        .await;
    assert_eq!(out.status, 200);
    let after = c
        .post("/api/auth/refresh", json!({"refresh_token": r3}))
        .await;
    assert_eq!(after.status, 401);
    let garbage = c
        .post("/api/auth/refresh", json!({"refresh_token": "nope"}))
        .await;
    assert_eq!(garbage.status, 401);
}

#[tokio::test]
async fn remember_me_lengthens_the_refresh_lifetime() {
    let server = Server::start(&[]);
    let c = server.client();
    c.signup("alice").await;
    let short = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "alice-password"}),
        )
        .await;
    let long = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "alice-password", "remember_me": true}),
        )
        .await;
    let s = short.body["refresh_expires_in"].as_u64().unwrap();
    let l = long.body["refresh_expires_in"].as_u64().unwrap();
    assert!(l > s, "{l} > {s}");
}

#[tokio::test]
async fn repeated_failures_are_throttled() {
    let server = Server::start(&[
        ("FERROTUNE_LOGIN_MAX_FAILURES", "3"),
        ("FERROTUNE_LOGIN_MAX_FAILURES_PER_IP", "6"),
    ]);
    let c = server.client();
    c.signup("alice").await;
    c.signup("bob").await;
    let login = |u: &str, p: &str| json!({"username_or_email": u, "password": p});
    for _ in 0..3 {
        let r = c
            .post("/api/auth/login", login("alice", "wrong-password"))
            .await;
        assert_eq!(r.status, 401);
    }
    // The account is locked, even with the right password.
    let r = c
        .post("/api/auth/login", login("alice", "alice-password"))
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert!(r.headers.get("retry-after").is_some());
    // Another account from the same address still works until the address limit.
    let r = c
        .post("/api/auth/login", login("bob", "bob-password"))
        .await;
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        let r = c
            .post("/api/auth/login", login("nobody", "wrong-password"))
            .await;
        assert_eq!(r.status, 401);
    }
    // Six failures from this address: the address is throttled for every account.
    let r = c
        .post("/api/auth/login", login("bob", "bob-password"))
        .await;
    assert_eq!(r.status, 429);
}

#[tokio::test]
async fn api_keys_work_as_bearer_tokens_and_can_be_revoked() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;

    let created = alice.post("/api/keys", json!({"name": "notebook"})).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let secret = created.body["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("ft-"));
    let key_id = created.body["key_id"].as_str().unwrap().to_string();

    let with_key = c.with_token(&secret);
    let me = with_key.get("/api/auth/me").await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["username"], "alice");

    let list = alice.get("/api/keys").await;
    assert_eq!(list.status, 200);
    let keys = list.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["name"], "notebook");
    assert!(
        !list.body.to_string().contains(&secret),
        "no secrets in the list"
    );
    assert!(
        !std::fs::read_dir(server.data_path().join("store"))
            .unwrap()
            .flatten()
            .any(|e| std::fs::read(e.path())
                .map(|b| b.windows(secret.len()).any(|w| w == secret.as_bytes()))
                .unwrap_or(false)),
        "the secret is not stored in clear"
    );

    assert_eq!(
        bob.get("/api/keys").await.body["keys"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        bob.delete(&format!("/api/keys/{key_id}")).await.status,
        404,
        "not bob's"
    );
    assert_eq!(
        alice.post("/api/keys", json!({"name": ""})).await.status,
        422
    );

    assert_eq!(
        alice.delete(&format!("/api/keys/{key_id}")).await.status,
        200
    );
    assert_eq!(with_key.get("/api/auth/me").await.status, 401, "revoked");
    assert_eq!(
        c.with_token("ft-made-up").get("/api/auth/me").await.status,
        401
    );
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let server = Server::start(&[]);
    let c = server.client();
    let h = c.get("/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "ok");
    assert!(h.body["version"].is_string());
    assert!(
        h.headers.get("x-request-id").is_some(),
        "request ids are returned"
    );
    let r = c.get("/api/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "no_route");
    let r = c.delete("/api/auth/me").await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn cors_is_configurable() {
    let server = Server::start(&[("FERROTUNE_CORS_ORIGINS", "http://ui.example")]);
    let c = server.client();
    let r = c
        .http
        .get(server.url("/health"))
        .header("origin", "http://ui.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "http://ui.example"
    );
    let r = c
        .http
        .get(server.url("/health"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let plain = Server::start(&[]);
    let r = c
        .http
        .get(plain.url("/health"))
        .header("origin", "http://ui.example")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers().get("access-control-allow-origin").is_none(),
        "off by default"
    );
}
