//! Administration, restart durability and start-up behaviour, against the real binary.

mod common;

use common::Server;
use serde_json::json;

#[tokio::test]
async fn admins_manage_accounts_and_see_counts() {
    let server = Server::start(&[]);
    let c = server.client();
    let (admin, _) = c.signup("root").await;
    let (bob, _) = c.signup("bob").await;
    let bob_id = bob.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let admin_id = admin.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Non-admins are forbidden.
    assert_eq!(bob.get("/api/admin/users").await.status, 403);
    assert_eq!(bob.get("/api/admin/stats").await.status, 403);
    assert_eq!(
        bob.patch(
            &format!("/api/admin/users/{admin_id}"),
            json!({"disabled": true})
        )
        .await
        .status,
        403
    );

    let users = admin.get("/api/admin/users").await;
    assert_eq!(users.status, 200);
    assert_eq!(users.body["users"].as_array().unwrap().len(), 2);
    assert!(
        !users.body.to_string().contains("argon2"),
        "no password hashes"
    );

    bob.upload("d.json", br#"[{"instruction":"a","output":"b"}]"#.to_vec())
        .await;
    let stats = admin.get("/api/admin/stats").await;
    assert_eq!(stats.status, 200);
    assert_eq!(stats.body["users"]["total"], 2);
    assert_eq!(stats.body["users"]["admins"], 1);
    assert_eq!(stats.body["datasets"]["total"], 1);
    assert_eq!(stats.body["tasks"]["total"], 0);
    assert_eq!(stats.body["models"]["trained"], 0);

    // Disabling ends bob's tokens at once and blocks his login.
    let r = admin
        .patch(
            &format!("/api/admin/users/{bob_id}"),
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["disabled"], true);
    assert_eq!(bob.get("/api/auth/me").await.status, 401);
    let login = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "bob-password"}),
        )
        .await;
    assert_eq!(login.status, 401);
    assert_eq!(login.code(), "account_disabled");

    // Re-enable and promote.
    let r = admin
        .patch(
            &format!("/api/admin/users/{bob_id}"),
            json!({"disabled": false, "role": "admin"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["role"], "admin");
    // Disabling ended bob's sessions for good: re-enabled, he signs in again.
    assert_eq!(bob.get("/api/auth/me").await.status, 401);
    let login = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "bob-password"}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    let bob = c.with_token(login.body["access_token"].as_str().unwrap());
    assert_eq!(
        bob.get("/api/admin/users").await.status,
        200,
        "role read per request"
    );

    // Invalid input.
    assert_eq!(
        admin
            .patch(
                &format!("/api/admin/users/{bob_id}"),
                json!({"role": "god"})
            )
            .await
            .status,
        422
    );
    assert_eq!(
        admin
            .patch("/api/admin/users/nope", json!({"disabled": true}))
            .await
            .status,
        404
    );

    // Delete bob: his account, tokens and files go.
    let r = admin.delete(&format!("/api/admin/users/{bob_id}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(bob.get("/api/auth/me").await.status, 401);
    assert!(!server.data_path().join("datasets").join(&bob_id).exists());
    assert_eq!(
        admin.get("/api/admin/stats").await.body["datasets"]["total"],
        0
    );

    // The last admin cannot remove themselves.
    let r = admin
        .patch(
            &format!("/api/admin/users/{admin_id}"),
            json!({"role": "user"}),
        )
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.code(), "last_admin");
    assert_eq!(
        admin
            .delete(&format!("/api/admin/users/{admin_id}"))
            .await
            .status,
        409
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let mut server = Server::start(&[]);
    let c = server.client();
    let (alice, login) = c.signup("alice").await;
    let refresh = login.body["refresh_token"].as_str().unwrap().to_string();
    let key = alice.post("/api/keys", json!({"name": "k"})).await.body["key"]
        .as_str()
        .unwrap()
        .to_string();
    let up = alice
        .upload(
            "d.jsonl",
            b"{\"instruction\":\"a\",\"output\":\"b\"}\n".to_vec(),
        )
        .await;
    assert_eq!(up.status, 201);
    let id = up.body["file_id"].as_str().unwrap().to_string();

    server.kill9();
    server.restart();

    let c = server.client();
    // The signing secret persisted, so the old access token is still valid.
    let alice = c.with_token(alice.token.as_deref().unwrap());
    assert_eq!(alice.get("/api/auth/me").await.status, 200);
    assert_eq!(c.with_token(&key).get("/api/auth/me").await.status, 200);
    let files = alice.get("/api/files/datasets").await;
    assert_eq!(files.body["files"][0]["file_id"], id.as_str());
    let (status, bytes, _) = alice
        .get_bytes(&format!("/api/files/datasets/{id}/download"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"{\"instruction\":\"a\",\"output\":\"b\"}\n");
    let r = c
        .post("/api/auth/refresh", json!({"refresh_token": refresh}))
        .await;
    assert_eq!(r.status, 200, "refresh token survived: {:?}", r.body);
    // Registration state too: the name is still taken and the next account is not admin.
    let r = c
        .post(
            "/api/auth/register",
            json!({"username": "alice", "email": "x@example.com", "password": "password1"}),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = c
        .post(
            "/api/auth/register",
            json!({"username": "bob", "email": "bob@example.com", "password": "password1"}),
        )
        .await;
    assert_eq!(r.body["role"], "user");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut server = Server::start(&[]);
    assert_eq!(server.client().get("/health").await.status, 200);
    assert_eq!(server.terminate(), Some(0));
}

#[test]
fn cli_creates_admins_and_reports_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_ferrotune");
    let out = std::process::Command::new(bin)
        .args([
            "users",
            "create",
            "--admin",
            "--username",
            "ops",
            "--email",
            "ops@example.com",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("FERROTUNE_PASSWORD", "ops-password")
        .env_remove("FERROTUNE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args([
            "users",
            "create",
            "--username",
            "dev",
            "--email",
            "dev@example.com",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("FERROTUNE_PASSWORD", "dev-password")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = std::process::Command::new(bin)
        .args(["users", "list"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains("ops") && l.contains("admin")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.contains("dev") && l.ends_with("user")),
        "{listing}"
    );

    let out = std::process::Command::new(bin)
        .args([
            "users",
            "create",
            "--username",
            "x",
            "--email",
            "bad",
            "--password",
            "p",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "no_such_setting = 1\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_setting"));

    let out = std::process::Command::new(bin)
        .args(["config"])
        .env("FERROTUNE_MAX_UPLOAD_BYTES", "12345")
        .env("FERROTUNE_JWT_SECRET", "s".repeat(40))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("max_upload_bytes = 12345"), "{shown}");
    assert!(!shown.contains(&"s".repeat(40)), "secret masked: {shown}");
}
