//! Operating the server: the audit log and webhooks, against the real binary over loopback.

mod common;

use common::Server;
use serde_json::{Value, json};

fn entries(v: &Value) -> Vec<Value> {
    v["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_audit_log_says_who_did_what_when_and_from_where() {
    let mut server = Server::start(&[]);
    let c = server.client();
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let alice_id = alice.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();

    let up = alice
        .upload("notes.jsonl", common::arithmetic_dataset())
        .await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    let ds = up.body["file_id"].as_str().unwrap().to_string();
    // Bob cannot delete it (not his): recorded as a failure, with Bob as the actor.
    let denied = bob.delete(&format!("/api/files/datasets/{ds}")).await;
    assert_eq!(denied.status, 404);
    // A wrong password: recorded with the name tried and no actor id.
    let bad = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "not-her-password"}),
        )
        .await;
    assert_eq!(bad.status, 401);
    let key = alice.post("/api/keys", json!({"name": "laptop"})).await;
    assert_eq!(key.status, 201);
    let del = alice.delete(&format!("/api/files/datasets/{ds}")).await;
    assert_eq!(del.status, 200, "{:?}", del.body);
    let request_id = del.headers["x-request-id"].to_str().unwrap().to_string();

    // Who deleted this dataset, when, from where.
    let r = root
        .get(&format!("/api/audit?action=dataset.delete&target={ds}"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let found = entries(&r.body);
    assert_eq!(found.len(), 2, "{found:?}");
    let done = &found[0];
    assert_eq!(done["actor_name"], "alice");
    assert_eq!(done["actor_id"], alice_id.as_str());
    assert_eq!(done["outcome"], "success");
    assert_eq!(done["status"], 200);
    assert_eq!(done["client"], "127.0.0.1");
    assert_eq!(done["request_id"], request_id.as_str());
    assert_eq!(done["method"], "DELETE");
    let at = time::OffsetDateTime::parse(
        done["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!((time::OffsetDateTime::now_utc() - at).whole_seconds() < 60);
    assert_eq!(found[1]["actor_name"], "bob");
    assert_eq!(found[1]["outcome"], "failure");
    assert_eq!(found[1]["status"], 404);

    // And what the server logged while doing it: the log viewer, by the entry's request id.
    let logged = common::wait_until(
        "the deletion in the server's log",
        std::time::Duration::from_secs(10),
        async || {
            let r = root
                .get(&format!(
                    "/api/admin/logs?level=trace&request_id={request_id}"
                ))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let found = entries(&r.body);
            found
                .iter()
                .any(|e| e["message"] == "dataset deleted")
                .then_some(r.body)
        },
    )
    .await;
    let lines = entries(&logged);
    assert!(
        lines.iter().all(|e| e["request_id"] == request_id.as_str()),
        "{lines:?}"
    );
    let line = lines
        .iter()
        .find(|e| e["message"] == "dataset deleted")
        .unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["target"], "ferrotune::datasets");
    assert_eq!(line["fields"]["file_id"], ds.as_str());
    assert_eq!(line["fields"]["method"], "DELETE");
    assert_eq!(logged["files"][0]["name"], "ferrotune.log");
    assert!(server.data_dir.join("logs/ferrotune.log").is_file());
    // Filters: by level and module; bad ones are named; users cannot read the log.
    let warn = entries(&root.get("/api/admin/logs?level=warn&limit=1000").await.body);
    assert!(
        warn.iter()
            .all(|e| matches!(e["level"].as_str(), Some("WARN" | "ERROR"))),
        "{warn:?}"
    );
    let http = entries(
        &root
            .get("/api/admin/logs?target=ferrotune::http&limit=1000")
            .await
            .body,
    );
    assert!(!http.is_empty());
    assert!(
        http.iter()
            .all(|e| e["target"].as_str().unwrap().starts_with("ferrotune::http")),
        "{http:?}"
    );
    let r = root.get("/api/admin/logs?level=loud").await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("level"), "{:?}", r.body);
    assert_eq!(root.get("/api/admin/logs?until=noon").await.status, 422);
    assert_eq!(alice.get("/api/admin/logs").await.status, 403);

    // The upload names the dataset it made; the key its id and name (never the secret).
    let up_entry = entries(&root.get("/api/audit?action=dataset.upload").await.body);
    assert_eq!(up_entry.len(), 1);
    assert_eq!(up_entry[0]["target_id"], ds.as_str());
    assert_eq!(up_entry[0]["detail"], "notes.jsonl");
    let key_entry = entries(&root.get("/api/audit?action=key.").await.body);
    assert_eq!(key_entry[0]["action"], "key.create");
    assert_eq!(
        key_entry[0]["target_id"],
        key.body["key_id"].as_str().unwrap()
    );
    assert!(
        !root
            .get("/api/audit")
            .await
            .body
            .to_string()
            .contains(key.body["key"].as_str().unwrap())
    );
    let failed = entries(
        &root
            .get("/api/audit?action=auth.login&outcome=denied")
            .await
            .body,
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["actor_name"], "alice");
    assert!(failed[0]["actor_id"].is_null());

    // An account change says what changed (not the new password).
    let bob_id = bob.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ch = root
        .patch(
            &format!("/api/admin/users/{bob_id}"),
            json!({"disabled": true, "password": "a-new-password-1"}),
        )
        .await;
    assert_eq!(ch.status, 200, "{:?}", ch.body);
    let upd = entries(&root.get("/api/audit?action=user.update").await.body);
    assert_eq!(upd[0]["target_id"], bob_id.as_str());
    assert_eq!(upd[0]["detail"], "disabled=true, password reset");
    assert_eq!(upd[0]["actor_name"], "root");
    assert!(
        !root
            .get("/api/audit")
            .await
            .body
            .to_string()
            .contains("a-new-password-1")
    );

    // Users see their own entries only; others' are refused.
    let own = entries(&alice.get("/api/audit?limit=1000").await.body);
    assert!(!own.is_empty());
    assert!(
        own.iter().all(|e| e["actor_id"] == alice_id.as_str()),
        "{own:?}"
    );
    let root_id = root.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        alice
            .get(&format!("/api/audit?actor={root_id}"))
            .await
            .status,
        403
    );
    // By default a webhook cannot point into the server's own network.
    for url in [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "http://localhost/x",
    ] {
        let r = alice.post("/api/webhooks", json!({"url": url})).await;
        assert_eq!(r.status, 422, "{url}: {:?}", r.body);
        assert!(r.error().contains("private"), "{:?}", r.body);
    }
    // Nothing edits or removes an entry.
    for r in [
        root.post("/api/audit", json!({})).await,
        root.delete("/api/audit").await,
        root.patch("/api/audit", json!({})).await,
    ] {
        assert_eq!(r.status, 405);
    }
    // Bad filters are named.
    let r = root.get("/api/audit?since=yesterday").await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("since"), "{:?}", r.body);
    assert_eq!(root.get("/api/audit?limit=0").await.status, 422);
    assert_eq!(root.get("/api/audit?outcome=maybe").await.status, 422);

    // A burst of parallel uploads: one entry each.
    let uploads = (0..12).map(|i| {
        let a = alice.clone();
        async move {
            a.upload(&format!("b{i}.jsonl"), common::arithmetic_dataset())
                .await
        }
    });
    let replies = futures_util::future::join_all(uploads).await;
    let made: std::collections::BTreeSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{:?}", r.body);
            r.body["file_id"].as_str().unwrap().to_string()
        })
        .collect();
    let logged: std::collections::BTreeSet<String> = entries(
        &root
            .get("/api/audit?action=dataset.upload&limit=1000")
            .await
            .body,
    )
    .iter()
    .filter_map(|e| e["target_id"].as_str().map(str::to_string))
    .filter(|id| *id != ds)
    .collect();
    assert_eq!(made, logged);

    // Paging: pages of 5 are disjoint, newest first, and together the whole log.
    let all = entries(&root.get("/api/audit?limit=1000").await.body);
    let mut paged = Vec::new();
    let mut before = String::new();
    loop {
        let page = root
            .get(&format!("/api/audit?limit=5&before={before}"))
            .await
            .body;
        paged.extend(entries(&page));
        match page["next"].as_str() {
            Some(n) => before = n.to_string(),
            None => break,
        }
    }
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&paged), ids(&all));
    assert!(all.len() > 20);

    // Entries are durable: the same after a restart.
    server.restart();
    let root = server.client().with_token(root.token.as_deref().unwrap());
    let again = entries(&root.get("/api/audit?limit=1000").await.body);
    assert_eq!(ids(&again), ids(&all));
}

/// The webhook's delivery log once it holds `n` attempts.
async fn attempts_logged(c: &common::Client, id: &str, n: usize) -> Value {
    common::wait_until(
        "the attempts",
        std::time::Duration::from_secs(10),
        async || {
            let d = c.get(&format!("/api/webhooks/{id}/deliveries")).await.body;
            (d["deliveries"].as_array().map_or(0, |v| v.len()) >= n).then_some(d)
        },
    )
    .await
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_logged() {
    let server = Server::start(&[
        ("FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true"),
        ("FERROTUNE_WEBHOOK_RETRY_BASE_MS", "200"),
        ("FERROTUNE_WEBHOOK_MAX_ATTEMPTS", "4"),
    ]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let (base, seen) = common::receiver().await;

    // Bad settings are named.
    for (body, field) in [
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (
            json!({"url": format!("{base}/ok"), "events": ["task.exploded"]}),
            "events",
        ),
        (json!({"url": format!("{base}/ok"), "events": []}), "events"),
    ] {
        let r = alice.post("/api/webhooks", body).await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert!(r.error().contains(field), "{:?}", r.body);
    }
    assert_eq!(
        alice
            .post(
                "/api/webhooks",
                json!({"url": format!("{base}/ok"), "color": "red"})
            )
            .await
            .status,
        422
    );

    let made = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/ok"), "events": ["task.*"], "description": "ci"}),
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let ok_id = made.body["webhook_id"].as_str().unwrap().to_string();
    let secret = made.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    // The secret is shown once.
    let listed = alice.get("/api/webhooks").await;
    assert_eq!(listed.body["webhooks"].as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(&secret));
    assert!(
        listed.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "task.succeeded")
    );
    // Others cannot see, test or delete it.
    assert_eq!(bob.get(&format!("/api/webhooks/{ok_id}")).await.status, 404);
    assert_eq!(
        bob.post(&format!("/api/webhooks/{ok_id}/test"), json!({}))
            .await
            .status,
        404
    );
    assert_eq!(
        bob.delete(&format!("/api/webhooks/{ok_id}")).await.status,
        404
    );
    assert!(
        bob.get("/api/webhooks").await.body["webhooks"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A test event: delivered, signed, logged with the receiver's status.
    let t0 = std::time::Instant::now();
    let test = alice
        .post(&format!("/api/webhooks/{ok_id}/test"), json!({}))
        .await;
    assert_eq!(test.status, 200, "{:?}", test.body);
    assert_eq!(test.body["succeeded"], true, "{:?}", test.body);
    assert_eq!(test.body["status"], 204);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/ok");
    assert!(
        common::verify(&secret, &got[0]),
        "the signature verifies with the secret"
    );
    assert!(!common::verify(
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        &got[0]
    ));
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["object"], "event");
    assert_eq!(body["id"], got[0].id.as_str());
    let ts: i64 = got[0].timestamp.parse().unwrap();
    assert!((ts - time::OffsetDateTime::now_utc().unix_timestamp()).abs() < 60);
    eprintln!(
        "test event delivered in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // A flaky receiver: two 500s, then taken; every attempt is in the log, one event id.
    let flaky = alice
        .post("/api/webhooks", json!({"url": format!("{base}/flaky")}))
        .await;
    let flaky_id = flaky.body["webhook_id"].as_str().unwrap().to_string();
    let first = alice
        .post(&format!("/api/webhooks/{flaky_id}/test"), json!({}))
        .await;
    assert_eq!(first.body["succeeded"], false);
    assert_eq!(first.body["status"], 500);
    assert!(first.body["next_attempt_at"].is_string());
    let log = attempts_logged(&alice, &flaky_id, 3).await;
    let attempts = log["deliveries"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(attempts[0]["attempt"], 3);
    assert_eq!(attempts[0]["succeeded"], true);
    assert_eq!(attempts[1]["status"], 500);
    assert_eq!(attempts[2]["attempt"], 1);
    let ids: std::collections::BTreeSet<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/flaky")
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "retries carry the event's id");
    // The backoff: 200 ms then 400 ms between attempts.
    let times: Vec<std::time::Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/flaky")
        .map(|r| r.at)
        .collect();
    assert!(times[1] - times[0] >= std::time::Duration::from_millis(190));
    assert!(times[2] - times[1] >= std::time::Duration::from_millis(390));

    // A receiver that never takes it: the attempts run out (4), each logged as failed.
    let down = alice
        .post("/api/webhooks", json!({"url": format!("{base}/down")}))
        .await;
    let down_id = down.body["webhook_id"].as_str().unwrap().to_string();
    alice
        .post(&format!("/api/webhooks/{down_id}/test"), json!({}))
        .await;
    let log = attempts_logged(&alice, &down_id, 4).await;
    let attempts = log["deliveries"].as_array().unwrap();
    assert!(
        attempts
            .iter()
            .all(|a| a["succeeded"] == false && a["status"] == 503)
    );
    assert!(
        attempts[0]["next_attempt_at"].is_null(),
        "no attempt after the last"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    assert_eq!(
        alice
            .get(&format!("/api/webhooks/{down_id}/deliveries"))
            .await
            .body["deliveries"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Switched off: nothing is sent; deleted: gone with its log. Both audited.
    let off = alice
        .patch(&format!("/api/webhooks/{ok_id}"), json!({"active": false}))
        .await;
    assert_eq!(off.body["active"], false);
    assert_eq!(
        alice
            .delete(&format!("/api/webhooks/{down_id}"))
            .await
            .status,
        200
    );
    assert_eq!(
        alice
            .get(&format!("/api/webhooks/{down_id}/deliveries"))
            .await
            .status,
        404
    );
    let audit = alice.get("/api/audit?action=webhook.").await.body;
    let actions: Vec<String> = entries(&audit)
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        ["webhook.create", "webhook.update", "webhook.delete"]
            .iter()
            .all(|a| actions.iter().any(|x| x == a)),
        "{actions:?}"
    );
}

#[tokio::test]
async fn a_crossed_disk_line_raises_an_alert_and_fires_the_admin_webhook() {
    // Every disk has less than 100 % free: the line is crossed at the first check.
    let mut server = Server::start(&[
        ("FERROTUNE_ALERT_DISK_FREE_PERCENT", "100"),
        ("FERROTUNE_ALERT_MEMORY_PERCENT", "0"),
        ("FERROTUNE_ALERT_CHECK_SECS", "1"),
        ("FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true"),
    ]);
    let c = server.client();
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;
    let (base, seen) = common::receiver().await;
    let hook = root
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/ok"), "events": ["alert.*"]}),
        )
        .await;
    assert_eq!(hook.status, 201, "{:?}", hook.body);
    let secret = hook.body["secret"].as_str().unwrap().to_string();
    // A non-administrator's webhook asking for everything gets no server alerts.
    let theirs = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/alice"), "events": ["*"]}),
        )
        .await;
    assert_eq!(theirs.status, 201);
    // The line was crossed at start, before these webhooks existed; a restart with them in
    // place (a server starting on a full disk) raises it again.
    server.restart();
    let alice = server.client().with_token(alice.token.as_deref().unwrap());

    let alerts = common::wait_until(
        "the disk alert",
        std::time::Duration::from_secs(10),
        async || {
            let a = alice.get("/api/system/alerts").await.body;
            (a["alerts"].as_array().is_some_and(|v| !v.is_empty())).then_some(a)
        },
    )
    .await;
    let disk = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "disk:data")
        .cloned()
        .expect("the data directory's disk");
    assert_eq!(disk["kind"], "disk_free");
    assert_eq!(disk["threshold"], 100.0);
    assert!(disk["value"].as_f64().unwrap() < 100.0);
    assert!(
        disk["message"].as_str().unwrap().contains("below 100 %"),
        "{disk}"
    );

    // The admin's webhook: alert.raised with the value and the line, signed; within a few
    // seconds (the check runs every second), once per alert.
    common::wait_until(
        "alert.raised at the webhook",
        std::time::Duration::from_secs(10),
        async || {
            let got = seen.lock().unwrap().clone();
            got.iter()
                .any(|r| r.path == "/ok" && r.body.contains("disk:data"))
                .then_some(Value::Null)
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let got = seen.lock().unwrap().clone();
    let raised: Vec<&common::Received> = got
        .iter()
        .filter(|r| r.path == "/ok" && r.body.contains("disk:data"))
        .collect();
    assert_eq!(raised.len(), 1, "raised once, not at every check");
    assert!(common::verify(&secret, raised[0]));
    let body: Value = serde_json::from_str(&raised[0].body).unwrap();
    assert_eq!(body["type"], "alert.raised");
    assert_eq!(body["data"]["threshold"], 100.0);
    assert!(
        got.iter().all(|r| r.path != "/alice"),
        "alerts go to administrators only"
    );
}

/// Signs `username` in from a program that calls itself `agent`; the login reply.
async fn sign_in_as(c: &common::Client, login: &str, password: &str, agent: &str) -> common::Reply {
    common::Client::send(
        c.http
            .post(format!("{}/api/auth/login", c.base))
            .header("user-agent", agent)
            .json(&json!({"username_or_email": login, "password": password})),
    )
    .await
}

#[tokio::test]
async fn users_edit_their_profile_see_their_sessions_and_sign_out_other_devices() {
    let server = Server::start(&[]);
    let c = server.client();
    let (_root, _) = c.signup("root").await;
    let (alice, first) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let laptop_ua = "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0";
    let phone_ua = "Mozilla/5.0 (Linux; Android 14) Chrome/131.0 Mobile Safari/537.36";
    let laptop = sign_in_as(&c, "alice", "alice-password", laptop_ua).await;
    assert_eq!(laptop.status, 200, "{:?}", laptop.body);
    let phone = sign_in_as(&c, "alice@example.com", "alice-password", phone_ua).await;
    assert_eq!(phone.status, 200);
    let phone_client = c.with_token(phone.body["access_token"].as_str().unwrap());
    // No mail relay here: no password reset by e-mail, said so.
    assert_eq!(c.get("/health").await.body["mail"], false);
    let r = c
        .post(
            "/api/auth/password-reset",
            json!({"email": "alice@example.com"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (503, "mail_not_configured"),
        "{:?}",
        r.body
    );
    let laptop_client = c.with_token(laptop.body["access_token"].as_str().unwrap());

    // Three sessions, the caller's marked, with where and what signed in.
    let list = phone_client.get("/api/auth/sessions").await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    let sessions = list.body["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    let current: Vec<&Value> = sessions.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["user_agent"], phone_ua);
    assert_eq!(sessions[0]["user_agent"], phone_ua, "newest sign-in first");
    assert!(sessions.iter().any(|s| s["user_agent"] == laptop_ua));
    assert!(sessions.iter().all(|s| s["client"] == "127.0.0.1"));
    let sign_ins = list.body["recent_sign_ins"].as_array().unwrap();
    assert_eq!(sign_ins.len(), 3, "{sign_ins:?}");
    assert!(sign_ins.iter().all(|s| s["client"] == "127.0.0.1"));
    assert!(list.body["last_login"]["at"].is_string(), "{:?}", list.body);
    // A refresh keeps the session's sign-in and program.
    let refreshed = c
        .post(
            "/api/auth/refresh",
            json!({"refresh_token": laptop.body["refresh_token"]}),
        )
        .await;
    assert_eq!(refreshed.status, 200);
    let laptop_client = laptop_client.with_token(refreshed.body["access_token"].as_str().unwrap());
    let again = laptop_client.get("/api/auth/sessions").await.body;
    let me_now: Vec<&Value> = again["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["current"] == true)
        .collect();
    assert_eq!(me_now[0]["user_agent"], laptop_ua);
    assert_eq!(again["sessions"].as_array().unwrap().len(), 3);

    // Profile: a display name (shown at sign-in too); an e-mail needs the password.
    let r = alice
        .patch("/api/auth/me", json!({"display_name": "  Alice A.  "}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["display_name"], "Alice A.");
    assert_eq!(
        alice.get("/api/auth/me").await.body["display_name"],
        "Alice A."
    );
    let r = alice
        .patch("/api/auth/me", json!({"email": "alice@new.example.com"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (422, "password_required"),
        "{:?}",
        r.body
    );
    let r = alice
        .patch(
            "/api/auth/me",
            json!({"email": "alice@new.example.com", "current_password": "nope-nope"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "wrong_password"));
    let r = alice
        .patch(
            "/api/auth/me",
            json!({"email": "BOB@example.com", "current_password": "alice-password"}),
        )
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(r.error().contains("email"), "{:?}", r.body);
    let r = alice
        .patch(
            "/api/auth/me",
            json!({"email": "not an address", "current_password": "alice-password"}),
        )
        .await;
    assert_eq!(r.status, 422);
    let r = alice
        .patch("/api/auth/me", json!({"display_name": "x".repeat(65)}))
        .await;
    assert_eq!(r.status, 422);
    let r = alice
        .patch("/api/auth/me", json!({"username": "mallory"}))
        .await;
    assert!(
        r.status == 400 || r.status == 422,
        "unknown fields are refused: {}",
        r.status
    );
    let r = alice
        .patch(
            "/api/auth/me",
            json!({"email": "alice@new.example.com", "current_password": "alice-password"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["email"], "alice@new.example.com");
    assert_eq!(r.body["display_name"], "Alice A.", "the other field stays");
    assert_eq!(
        sign_in_as(&c, "alice@example.com", "alice-password", "t")
            .await
            .status,
        401
    );
    let by_new = sign_in_as(&c, "alice@new.example.com", "alice-password", "t").await;
    assert_eq!(by_new.status, 200);
    assert_eq!(by_new.body["user"]["display_name"], "Alice A.");
    // Her old address is free for someone else now.
    let r = c
        .post(
            "/api/auth/register",
            json!({"username": "carol", "email": "alice@example.com", "password": "carol-password"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    // A burst of parallel profile saves: all answer, the account ends with one of them.
    let saves = (0..8).map(|i| {
        let a = alice.clone();
        async move {
            a.patch("/api/auth/me", json!({"display_name": format!("A{i}")}))
                .await
        }
    });
    for r in futures_util::future::join_all(saves).await {
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let me = alice.get("/api/auth/me").await.body;
    assert!(me["display_name"].as_str().unwrap().starts_with('A'));
    assert_eq!(me["email"], "alice@new.example.com");

    // An API key reads, but neither changes the e-mail nor ends sessions.
    let key = alice.post("/api/keys", json!({"name": "k"})).await.body["key"]
        .as_str()
        .unwrap()
        .to_string();
    let keyed = c.with_token(&key);
    assert_eq!(keyed.get("/api/auth/sessions").await.status, 200);
    let r = keyed
        .patch(
            "/api/auth/me",
            json!({"email": "k@example.com", "current_password": "alice-password"}),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(keyed.delete("/api/auth/sessions").await.status, 403);

    // Another user's session is not found; ending one of hers works on that one alone.
    let bob_sessions = bob.get("/api/auth/sessions").await.body;
    let bobs = bob_sessions["sessions"][0]["session_id"].as_str().unwrap();
    assert_eq!(
        alice
            .delete(&format!("/api/auth/sessions/{bobs}"))
            .await
            .status,
        404
    );
    assert_eq!(bob.get("/api/auth/me").await.status, 200);
    let laptop_sid = me_now[0]["session_id"].as_str().unwrap();
    let r = alice
        .delete(&format!("/api/auth/sessions/{laptop_sid}"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["ended"], 1);
    assert_eq!(laptop_client.get("/api/auth/me").await.status, 401);
    assert_eq!(
        c.post(
            "/api/auth/refresh",
            json!({"refresh_token": refreshed.body["refresh_token"]})
        )
        .await
        .status,
        401
    );
    assert_eq!(phone_client.get("/api/auth/me").await.status, 200);

    // Sign out other devices: everything but the caller's session ends at once.
    let r = alice.delete("/api/auth/sessions").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["ended"], 2,
        "the phone and the sign-in by the new address"
    );
    assert_eq!(phone_client.get("/api/auth/me").await.status, 401);
    assert_eq!(
        c.post(
            "/api/auth/refresh",
            json!({"refresh_token": phone.body["refresh_token"]})
        )
        .await
        .status,
        401
    );
    assert_eq!(alice.get("/api/auth/me").await.status, 200);
    assert_eq!(
        keyed.get("/api/auth/me").await.status,
        200,
        "keys are not sessions"
    );
    let left = alice.get("/api/auth/sessions").await.body;
    assert_eq!(left["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(left["sessions"][0]["current"], true);
    assert_eq!(alice.delete("/api/auth/sessions").await.body["ended"], 0);
    let _ = first;

    // All of it is in her activity.
    let mine = entries(&alice.get("/api/audit?action=auth.").await.body);
    let actions: Vec<&str> = mine.iter().filter_map(|e| e["action"].as_str()).collect();
    for want in ["auth.profile", "auth.sessions_end", "auth.session_end"] {
        assert!(actions.contains(&want), "{want} in {actions:?}");
    }
    let email_change = mine
        .iter()
        .find(|e| e["action"] == "auth.profile" && e["status"] == 200 && e["detail"] == "email")
        .expect("the e-mail change");
    assert_eq!(email_change["actor_name"], "alice");
}

#[tokio::test]
async fn disk_use_is_shown_per_user_and_free_space_per_directory() {
    let server = Server::start(&[]);
    let c = server.client();
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let mut sizes = 0;
    for i in 0..3 {
        let up = alice
            .upload(&format!("d{i}.jsonl"), common::arithmetic_dataset())
            .await;
        assert_eq!(up.status, 201, "{:?}", up.body);
        sizes += up.body["size"].as_u64().unwrap();
    }
    let on_disk: u64 = std::fs::read_dir(server.data_dir.join("datasets"))
        .unwrap()
        .flatten()
        .flat_map(|owner| std::fs::read_dir(owner.path()).unwrap().flatten())
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert_eq!(sizes, on_disk, "the sizes reported are the files'");

    // Users see their own use; an administrator everyone's, largest first.
    let mine = alice.get("/api/system/resources").await;
    assert_eq!(mine.status, 200, "{:?}", mine.body);
    let users = mine.body["disk"]["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0]["username"], "alice");
    assert_eq!(users[0]["datasets_bytes"].as_u64(), Some(sizes));
    assert_eq!(users[0]["total_bytes"].as_u64(), Some(sizes));
    let theirs = bob.get("/api/system/resources").await.body;
    assert_eq!(theirs["disk"]["users"][0]["total_bytes"], 0);
    let all = root.get("/api/system/resources").await.body;
    let names: Vec<&str> = all["disk"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "alice");
    assert_eq!(names.len(), 3);
    let dirs = all["disk"]["dirs"].as_array().unwrap();
    let dir_names: Vec<&str> = dirs.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(dir_names, ["data", "models"]);
    for d in dirs {
        let (total, free) = (
            d["total_bytes"].as_u64().unwrap(),
            d["free_bytes"].as_u64().unwrap(),
        );
        assert!(total > 0 && free <= total, "{d}");
    }
    // Polled in a burst, it answers from one walk.
    let polls = (0..8).map(|_| {
        let r = root.clone();
        async move { r.get("/api/system/resources").await }
    });
    for r in futures_util::future::join_all(polls).await {
        assert_eq!(r.status, 200);
        assert_eq!(r.body["disk"]["users"], all["disk"]["users"]);
    }
}

#[test]
fn a_worker_sends_what_it_prints_to_its_rotated_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("train.log");
    // An older run's rotated files stay numbered below the current one.
    std::fs::write(&log, "an earlier line\n").unwrap();
    let job = json!({
        "task_id": "t1",
        "args": {},
        "env_dir": dir.path().join("env"),
        // No environment: the worker says so on stderr and exits 4, before any Python.
        "site_packages": dir.path().join("env/lib/site-packages"),
        "events_file": dir.path().join("worker.jsonl"),
        "exit_file": dir.path().join("exit.json"),
        "heartbeat_secs": 10.0,
        "log": {"path": log, "max_bytes": 10, "keep": 2},
    });
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, job.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["worker", "--job"])
        .arg(&job_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    // Nothing reached the process's own stderr: it all went through the pipe to the log.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let current = std::fs::read_to_string(&log).unwrap();
    assert!(
        current.contains("the training environment is missing"),
        "{current:?}"
    );
    // The old content was past 10 bytes: it was rotated away, whole, before the new line.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("train.log.1")).unwrap(),
        "an earlier line\n"
    );
    let exit: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("exit.json")).unwrap())
            .unwrap();
    assert_eq!(exit["code"], 4);
}

/// The mails sent to `to` so far.
fn mails_to(mails: &std::sync::Mutex<Vec<common::Mail>>, to: &str) -> Vec<common::Mail> {
    mails
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.to.iter().any(|t| t == to))
        .cloned()
        .collect()
}

#[tokio::test]
async fn with_a_mail_relay_passwords_reset_addresses_confirm_and_notices_arrive() {
    let (smtp, mails) = common::smtp_server().await;
    let mut server = Server::start(&[
        ("FERROTUNE_SMTP_URL", smtp.as_str()),
        ("FERROTUNE_SMTP_FROM", "ferrotune <noreply@ferrotune.test>"),
        // Alerts by e-mail: a disk line no disk passes.
        ("FERROTUNE_ALERT_DISK_FREE_PERCENT", "100"),
        ("FERROTUNE_ALERT_CHECK_SECS", "1"),
    ]);
    let c = server.client();
    assert_eq!(c.get("/health").await.body["mail"], true);
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;

    // A reset code goes to the account's address; an unknown one gets the same answer.
    let r = c
        .post(
            "/api/auth/password-reset",
            json!({"email": "ALICE@example.com"}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let unknown = c
        .post(
            "/api/auth/password-reset",
            json!({"email": "nobody@example.com"}),
        )
        .await;
    assert_eq!((unknown.status, &unknown.body), (202, &r.body));
    let mail = common::wait_until(
        "the reset e-mail",
        std::time::Duration::from_secs(10),
        async || {
            mails_to(&mails, "alice@example.com")
                .first()
                .map(|m| Value::String(m.data.clone()))
        },
    )
    .await;
    let sent = &mails_to(&mails, "alice@example.com")[0];
    assert_eq!(sent.from, "noreply@ferrotune.test");
    assert_eq!(
        sent.header("Subject").as_deref(),
        Some("ferrotune: your password reset code")
    );
    let code = sent.code(8).unwrap_or_else(|| panic!("a code in {mail}"));
    assert!(mails_to(&mails, "nobody@example.com").is_empty());

    // Wrong codes and weak passwords are refused; the right code works once.
    let wrong = if code == "00000000" {
        "00000001"
    } else {
        "00000000"
    };
    let r = c
        .post(
            "/api/auth/password-reset/confirm",
            json!({"email": "alice@example.com", "code": wrong, "new_password": "a-fresh-password"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_code"), "{:?}", r.body);
    let r = c
        .post(
            "/api/auth/password-reset/confirm",
            json!({"email": "alice@example.com", "code": code, "new_password": "short"}),
        )
        .await;
    assert_eq!(r.status, 422);
    let r = c
        .post(
            "/api/auth/password-reset/confirm",
            json!({"email": "alice@example.com", "code": code, "new_password": "a-fresh-password"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        alice.get("/api/auth/me").await.status,
        401,
        "her sessions ended"
    );
    let again = c
        .post(
            "/api/auth/password-reset/confirm",
            json!({"email": "alice@example.com", "code": code, "new_password": "another-password"}),
        )
        .await;
    assert_eq!(again.status, 422, "a code works once");
    let login = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "a-fresh-password"}),
        )
        .await;
    assert_eq!(login.status, 200);
    let alice = c.with_token(login.body["access_token"].as_str().unwrap());

    // A new address changes once the code sent to it comes back.
    let r = alice
        .patch(
            "/api/auth/me",
            json!({"email": "alice@new.example.com", "current_password": "a-fresh-password"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["email"], "alice@example.com", "not yet");
    assert_eq!(r.body["pending_email"], "alice@new.example.com");
    common::wait_until(
        "the confirmation e-mail",
        std::time::Duration::from_secs(10),
        async || {
            mails_to(&mails, "alice@new.example.com")
                .first()
                .map(|_| Value::Null)
        },
    )
    .await;
    let confirm_code = mails_to(&mails, "alice@new.example.com")[0]
        .code(8)
        .unwrap();
    let r = alice
        .post("/api/auth/me/email", json!({"code": wrong}))
        .await;
    assert_eq!(r.status, 422);
    let r = alice
        .post("/api/auth/me/email", json!({"code": confirm_code}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["email"], "alice@new.example.com");
    assert!(r.body["pending_email"].is_null());
    assert_eq!(
        c.post(
            "/api/auth/login",
            json!({"username_or_email": "alice@new.example.com", "password": "a-fresh-password"}),
        )
        .await
        .status,
        200
    );

    // Notices by e-mail: the administrator asks for alerts and gets the disk alert's.
    let r = alice
        .patch("/api/auth/me", json!({"email_events": ["nonsense.*"]}))
        .await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("email_events"), "{:?}", r.body);
    let r = root
        .patch("/api/auth/me", json!({"email_events": ["alert.*"]}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["email_events"], json!(["alert.*"]));
    // Alerts live in memory: after a restart the disk line is crossed anew, and that is
    // mailed to the administrator (who asked) and nobody else.
    server.restart();
    common::wait_until(
        "the alert e-mail",
        std::time::Duration::from_secs(20),
        async || {
            mails_to(&mails, "root@example.com")
                .first()
                .map(|_| Value::Null)
        },
    )
    .await;
    let alert = &mails_to(&mails, "root@example.com")[0];
    let subject = alert.header("Subject").unwrap_or_default();
    assert!(subject.starts_with("ferrotune: alert.raised"), "{subject}");
    assert!(alert.data.contains("kind: disk_free"), "{}", alert.data);
    assert_eq!(
        mails_to(&mails, "alice@new.example.com").len(),
        1,
        "only the confirmation"
    );
}
