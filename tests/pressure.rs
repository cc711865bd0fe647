//! The server under concurrent load and under attack, as a crowd of users and an attacker
//! would try it: bursts of parallel writes of every kind, login bursts, lockout attempts,
//! revoked tokens, oversized generations, a full disk, and what answers reveal.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, MODEL, Server, training_server, wait_for_environment_and_model};
use serde_json::{Value, json};

/// Peak and current resident memory of a process, in MB (`/proc/<pid>/status`).
fn memory_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Polls `/health` every 20 ms until stopped; returns the slowest answer and how many there
/// were (a request that gets no answer within 10 s fails the test).
fn watch_health(
    server: &Server,
) -> (
    tokio::task::JoinHandle<(Duration, usize)>,
    Arc<tokio::sync::Notify>,
) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let client = server.client();
    let stopped = stop.clone();
    let handle = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut n = 0;
        loop {
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(10), client.get("/health"))
                .await
                .expect("/health answers within 10 s");
            assert_eq!(r.status, 200);
            worst = worst.max(started.elapsed());
            n += 1;
            tokio::select! {
                _ = stopped.notified() => return (worst, n),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    (handle, stop)
}

/// Runs `n` requests at once (each given its index); every one must answer within `limit`.
async fn burst<F, Fut>(what: &str, n: usize, limit: Duration, f: F) -> Vec<common::Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = common::Reply> + Send + 'static,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let all = async {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("request task"));
        }
        out
    };
    let replies = tokio::time::timeout(limit, all)
        .await
        .unwrap_or_else(|_| panic!("{what}: not every request answered within {limit:?}"));
    eprintln!(
        "{what}: {n} parallel requests answered in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    replies
}

fn statuses(replies: &[common::Reply]) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in replies {
        *m.entry(r.status).or_default() += 1;
    }
    m
}

/// F1: 10–30 parallel writes used to deadlock sled (concurrent `flush_async`, run on the
/// runtime's two threads) and freeze the whole server. Now 100 parallel requests of each kind
/// of write all answer, `/health` stays fast throughout, and memory stays flat — 100
/// concurrent logins each hashed 19 MiB at once before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_parallel_writes_of_every_kind_all_answer() {
    let server = Server::start(&[("FERROTUNE_REGISTER_MAX_PER_IP", "1000")]);
    let c = server.client();
    let pid = server.pid().expect("pid");
    let (health, stop) = watch_health(&server);
    let limit = Duration::from_secs(120);
    let base = c.base.clone();
    let http = c.http.clone();
    let anon = move || Client {
        http: http.clone(),
        base: base.clone(),
        token: None,
    };

    let made = burst("register", 100, limit, |i| {
        let c = anon();
        async move {
            c.post(
                "/api/auth/register",
                json!({"username": format!("user{i}"), "email": format!("user{i}@example.com"), "password": format!("password-{i}")}),
            )
            .await
        }
    })
    .await;
    assert_eq!(
        statuses(&made),
        [(201, 100)].into(),
        "every account created"
    );

    let logins = burst("login", 100, limit, |i| {
        let c = anon();
        async move {
            c.post(
                "/api/auth/login",
                json!({"username_or_email": format!("user{i}"), "password": format!("password-{i}")}),
            )
            .await
        }
    })
    .await;
    assert_eq!(statuses(&logins), [(200, 100)].into(), "every login");
    let (peak_after_logins, _) = memory_mb(pid);
    let users: Vec<Client> = logins
        .iter()
        .map(|r| c.with_token(r.body["access_token"].as_str().expect("token")))
        .collect();
    let users = Arc::new(users);

    let sessions = {
        let users = users.clone();
        burst("chat session create", 100, limit, move |i| {
            let u = users[i % 10].with_token(users[i % 10].token.as_deref().unwrap_or(""));
            async move {
                u.post("/api/chat/sessions", json!({"title": format!("s{i}")}))
                    .await
            }
        })
        .await
    };
    assert_eq!(statuses(&sessions), [(201, 100)].into());
    let (peak_after_sessions, _) = memory_mb(pid);

    // 100 appends to one conversation at once: none is lost.
    let one = sessions[0].body["session_id"].as_str().unwrap().to_string();
    let appends = {
        let u = users[0].with_token(users[0].token.as_deref().unwrap_or(""));
        let one = one.clone();
        burst("append to one session", 100, limit, move |i| {
            let u = u.with_token(u.token.as_deref().unwrap_or(""));
            let path = format!("/api/chat/sessions/{one}/messages");
            async move {
                u.post(
                    &path,
                    json!({"messages": [{"role": "user", "content": format!("m{i}")}]}),
                )
                .await
            }
        })
        .await
    };
    assert_eq!(statuses(&appends), [(200, 100)].into());
    let s = users[0].get(&format!("/api/chat/sessions/{one}")).await;
    assert_eq!(
        s.body["messages"].as_array().unwrap().len(),
        100,
        "no append lost"
    );

    let keys = {
        let users = users.clone();
        burst("API key create", 100, limit, move |i| {
            let u = users[i].with_token(users[i].token.as_deref().unwrap_or(""));
            async move { u.post("/api/keys", json!({"name": format!("k{i}")})).await }
        })
        .await
    };
    assert_eq!(statuses(&keys), [(201, 100)].into());

    let uploads = {
        let users = users.clone();
        burst("dataset upload", 100, limit, move |i| {
            let u = users[i].with_token(users[i].token.as_deref().unwrap_or(""));
            let rows = json!([{"instruction": format!("q{i}"), "output": "a"}]);
            async move { u.upload("d.json", serde_json::to_vec(&rows).unwrap()).await }
        })
        .await
    };
    assert_eq!(statuses(&uploads), [(201, 100)].into());

    let deletes = {
        let users = users.clone();
        let ids: Vec<String> = uploads
            .iter()
            .map(|r| r.body["file_id"].as_str().unwrap().to_string())
            .collect();
        burst("dataset delete", 100, limit, move |i| {
            let u = users[i].with_token(users[i].token.as_deref().unwrap_or(""));
            let path = format!("/api/files/datasets/{}", ids[i]);
            async move { u.delete(&path).await }
        })
        .await
    };
    assert_eq!(statuses(&deletes), [(200, 100)].into());

    let logouts = {
        let users = users.clone();
        burst("logout", 100, limit, move |i| {
            let u = users[i].with_token(users[i].token.as_deref().unwrap_or(""));
            async move { u.post("/api/auth/logout", json!({})).await }
        })
        .await
    };
    assert_eq!(statuses(&logouts), [(200, 100)].into());

    stop.notify_one();
    let (worst, polls) = health.await.unwrap();
    let (peak, now) = memory_mb(pid);
    eprintln!(
        "/health: {polls} polls, slowest {:.1} ms; server memory peak {peak_after_logins:.0} MB \
         after the logins, {peak_after_sessions:.0} MB after the sessions, {peak:.0} MB at the \
         end ({now:.0} MB now)",
        worst.as_secs_f64() * 1000.0
    );
    assert!(
        worst < Duration::from_millis(100),
        "/health stays under 100 ms during the bursts: {worst:?}"
    );
    assert!(
        peak_after_sessions < 150.0,
        "100 concurrent logins and session creates stay under 150 MB: {peak_after_sessions:.0} MB"
    );
    // Everything written is there after a crash.
    let mut server = server;
    server.kill9();
    server.restart();
    let c = server.client();
    let r = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "user99", "password": "password-99"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// F2: 40 wrong passwords and then the right one, all at once on one account, used to all be
/// checked (the lock was looked at before hashing, the failure counted after) and the right
/// one got in. Attempts are now counted before the hash: only the allowed number are checked.
#[tokio::test]
async fn a_login_burst_gets_no_more_guesses_than_the_limit() {
    let server = Server::start(&[("FERROTUNE_LOGIN_MAX_FAILURES", "5")]);
    let c = server.client();
    let (_alice, _) = c.signup("alice").await;
    let mut handles = Vec::new();
    for i in 0..41 {
        let c = server.client();
        let password = if i == 40 {
            "alice-password".to_string()
        } else {
            format!("wrong-{i}")
        };
        handles.push(tokio::spawn(async move {
            c.post(
                "/api/auth/login",
                json!({"username_or_email": "alice", "password": password}),
            )
            .await
        }));
        if i == 39 {
            // The right password goes last, once every wrong one is on its way.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut replies = Vec::new();
    for h in handles {
        replies.push(h.await.unwrap());
    }
    let checked = replies[..40].iter().filter(|r| r.status == 401).count();
    let throttled = replies[..40].iter().filter(|r| r.status == 429).count();
    assert!(checked <= 5, "at most 5 guesses checked, {checked} were");
    assert_eq!(checked + throttled, 40);
    assert_eq!(replies[40].status, 429, "{:?}", replies[40].body);
    assert!(replies[40].headers.contains_key("retry-after"));
}

/// F5 and the disabled-account oracle: an attacker's failures lock the attacker, not the
/// owner; a stolen token's wrong current passwords do not lock the owner's login; a disabled
/// account answers the same whatever the password.
#[tokio::test]
async fn an_attacker_cannot_lock_the_owner_out() {
    let server = Server::start(&[
        ("FERROTUNE_TRUST_FORWARDED_FOR", "true"),
        ("FERROTUNE_LOGIN_MAX_FAILURES", "5"),
    ]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let from = |addr: &str, password: &str| {
        let rb = c
            .http
            .post(format!("{}/api/auth/login", c.base))
            .header("x-forwarded-for", addr)
            .json(&json!({"username_or_email": "alice", "password": password}));
        Client::send(rb)
    };
    // One attacker address: five guesses, then locked.
    for _ in 0..5 {
        assert_eq!(from("10.0.0.1", "guess").await.status, 401);
    }
    assert_eq!(from("10.0.0.1", "guess").await.status, 429);
    assert_eq!(
        from("10.0.0.1", "alice-password").await.status,
        429,
        "the attacker's address stays locked even with the right password"
    );
    // The owner, elsewhere, gets in.
    let owner = from("10.0.0.2", "alice-password").await;
    assert_eq!(owner.status, 200, "{:?}", owner.body);

    // Many attacker addresses, five guesses each: the account is paced, not walled.
    for a in 0..4 {
        for _ in 0..5 {
            let r = from(&format!("10.0.1.{a}"), "guess").await;
            assert!(r.status == 401 || r.status == 429, "{}", r.status);
        }
    }
    let started = Instant::now();
    let owner = from("10.0.0.3", "alice-password").await;
    assert!(
        owner.status == 200,
        "the owner from a new address gets in, slowed at most: {:?}",
        owner.body
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let known = from("10.0.0.2", "alice-password").await;
    assert_eq!(known.status, 200, "an address the owner used is not paced");

    // A stolen token trying current passwords: refused, then throttled on that route only.
    for _ in 0..5 {
        let r = alice
            .post(
                "/api/auth/password",
                json!({"current_password": "guess-guess", "new_password": "new-password-1"}),
            )
            .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
    }
    let r = alice
        .post(
            "/api/auth/password",
            json!({"current_password": "guess-guess", "new_password": "new-password-1"}),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        from("10.0.0.2", "alice-password").await.status,
        200,
        "the owner's login is not locked by the password route"
    );

    // A disabled account: the same answer for the right and a wrong password.
    let (_bob, _) = c.signup("bob").await;
    let bob_id = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "bob-password"}),
        )
        .await
        .body["user"]["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = alice
        .patch(
            &format!("/api/admin/users/{bob_id}"),
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let right = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "bob-password"}),
        )
        .await;
    let wrong = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "bob", "password": "not-bobs-password"}),
        )
        .await;
    assert_eq!(
        (right.status, right.body.clone()),
        (wrong.status, wrong.body)
    );
}

/// Registration and password changes are throttled per client address.
#[tokio::test]
async fn registrations_are_throttled_per_address() {
    let server = Server::start(&[("FERROTUNE_REGISTER_MAX_PER_IP", "3")]);
    let c = server.client();
    for i in 0..3 {
        let r = c
            .post(
                "/api/auth/register",
                json!({"username": format!("user{i}"), "email": format!("u{i}@x.io"), "password": "password-1"}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let r = c
        .post(
            "/api/auth/register",
            json!({"username": "user9", "email": "u9@x.io", "password": "password-1"}),
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));
}

/// F4: logout and refresh-token theft end the session's access tokens at once, not an hour
/// later; other sessions of the same user go on.
#[tokio::test]
async fn logout_and_theft_end_access_tokens_at_once() {
    let server = Server::start(&[("FERROTUNE_REFRESH_REUSE_GRACE_SECS", "0")]);
    let c = server.client();
    let (first, login) = c.signup("alice").await;
    let second = {
        let r = c
            .post(
                "/api/auth/login",
                json!({"username_or_email": "alice", "password": "alice-password"}),
            )
            .await;
        c.with_token(r.body["access_token"].as_str().unwrap())
    };
    assert_eq!(first.get("/api/auth/me").await.status, 200);
    let refresh = login.body["refresh_token"].as_str().unwrap().to_string();
    let r = first
        .post("/api/auth/logout", json!({"refresh_token": refresh}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        first.get("/api/auth/me").await.status,
        401,
        "the logged-out access token stops at once"
    );
    assert_eq!(
        second.get("/api/auth/me").await.status,
        200,
        "other sessions go on"
    );

    // Theft: an old refresh token presented again ends its whole session.
    let third = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "alice-password"}),
        )
        .await;
    let old = third.body["refresh_token"].as_str().unwrap().to_string();
    let rotated = c
        .post("/api/auth/refresh", json!({"refresh_token": old}))
        .await;
    assert_eq!(rotated.status, 200);
    let thief = c.with_token(rotated.body["access_token"].as_str().unwrap());
    assert_eq!(thief.get("/api/auth/me").await.status, 200);
    let reuse = c
        .post("/api/auth/refresh", json!({"refresh_token": old}))
        .await;
    assert_eq!(reuse.status, 401);
    assert_eq!(
        thief.get("/api/auth/me").await.status,
        401,
        "reuse detection ends the session's access tokens"
    );
    let next = rotated.body["refresh_token"].as_str().unwrap();
    assert_eq!(
        c.post("/api/auth/refresh", json!({"refresh_token": next}))
            .await
            .status,
        401,
        "and its refresh tokens"
    );
}

/// F8 and F9: what answers reveal and carry.
#[tokio::test]
async fn answers_reveal_nothing_of_the_server_and_keys_cannot_mint_keys() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, login) = c.signup("alice").await;
    assert_eq!(
        login.headers["cache-control"], "no-store",
        "token answers are not cached"
    );
    for path in ["/health", "/api/auth/me", "/api/nope", "/"] {
        let (_, _, headers) = alice.get_bytes(path).await;
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
    let key = alice.post("/api/keys", json!({"name": "ci"})).await;
    assert_eq!(key.status, 201);
    assert_eq!(key.headers["cache-control"], "no-store");
    let with_key = c.with_token(key.body["key"].as_str().unwrap());
    let r = with_key.post("/api/keys", json!({"name": "more"})).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.code(), "api_key_not_allowed");

    // Names lose direction overrides; paths are relative.
    let rows = serde_json::to_vec(&json!([{"instruction": "q", "output": "a"}])).unwrap();
    let up = alice.upload("evil\u{202E}nosj.exe", rows).await;
    assert_eq!(up.status, 201);
    assert_eq!(up.body["filename"], "evilnosj.exe");
    let path = up.body["file_path"].as_str().unwrap();
    assert!(!path.starts_with('/'), "relative: {path}");
    assert!(server.data_path().join(path).is_file());
    let s = alice
        .post(
            "/api/chat/sessions",
            json!({"title": "a\u{2067}b\u{2069}c"}),
        )
        .await;
    assert_eq!(s.body["title"], "abc");

    // F3: a seed beyond 32 bits is refused at once, not by the worker a minute later.
    let r = alice
        .post(
            "/api/tasks",
            json!({"name": "t", "model_name": "m", "dataset_id": up.body["file_id"], "seed": u64::MAX}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.error().contains("seed"), "{}", r.error());
}

/// F7: a full disk answers an upload with 507 and a clear message, and keeps nothing of it.
/// The data dir is a small tmpfs (mounting needs root, as on CI machines of this kind).
#[tokio::test]
async fn a_full_disk_is_a_507_and_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // Not root (or no mount permission): nothing here can fill a disk on purpose.
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let data = mount.join("data");
    let mut server = Server::start(&[("FERROTUNE_MAX_UPLOAD_BYTES", "104857600")]);
    server.kill9();
    server.data_dir = data.clone();
    server.restart();
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    // Fill the disk to its last few KiB, then upload what no longer fits. The upload is
    // small enough to sit whole in the loopback socket's buffers before the server answers
    // (a large one would see its connection closed mid-body, as servers do on an early
    // error: with 300 KB that happened once under a loaded CI run).
    let filler = mount.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    let row = json!({"instruction": "x".repeat(1000), "output": "y"});
    let big: Vec<u8> = (0..40)
        .flat_map(|_| format!("{row}\n").into_bytes())
        .collect();
    let r = alice.upload("big.jsonl", big).await;
    assert_eq!(r.status, 507, "{:?}", r.body);
    assert_eq!(r.code(), "disk_full");
    assert!(r.error().contains("disk is full"), "{}", r.error());
    let leftovers: Vec<_> = std::fs::read_dir(data.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "nothing half-written: {leftovers:?}");
    let list = alice.get("/api/files/datasets").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["files"].as_array().unwrap().len(), 0);
    // Once space is free again, it works.
    std::fs::remove_file(&filler).unwrap();
    let small = serde_json::to_vec(&json!([{"instruction": "q", "output": "a"}])).unwrap();
    assert_eq!(alice.upload("small.json", small).await.status, 201);
}

/// F6: generation is bounded — by a server maximum of tokens, by concurrent generations per
/// user and overall — and a long prompt no longer holds up short answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generation_is_bounded_and_shared_fairly() {
    let server = training_server(&[
        ("FERROTUNE_MAX_GENERATION_TOKENS", "24"),
        ("FERROTUNE_MAX_GENERATIONS_PER_USER", "1"),
        ("FERROTUNE_MAX_CONCURRENT_GENERATIONS", "2"),
    ]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let (carol, _) = c.signup("carol").await;
    wait_for_environment_and_model(&alice).await;

    // max_tokens 10^9 is cut to the server's maximum.
    let ask = |max_tokens: u64, content: String| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
               "temperature": 0, "max_tokens": max_tokens})
    };
    let r = alice
        .post(
            "/v1/chat/completions",
            ask(
                1_000_000_000,
                "Write a long essay about the history of Rome.".into(),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["usage"]["completion_tokens"].as_u64().unwrap() <= 24);
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");

    // A long prompt (about 2k tokens), streamed, and once it runs, short questions from two
    // other users: an answered one is done before the long prompt's first token.
    let long_prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. ".repeat(150);
    let long = {
        let mut body = ask(4, long_prompt);
        body["stream"] = json!(true);
        let rb = alice
            .http
            .post(format!("{}/v1/chat/completions", alice.base))
            .bearer_auth(alice.token.as_deref().unwrap())
            .json(&body);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let resp = rb.send().await.expect("stream");
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let mut text = String::new();
            let mut first_token = None;
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
                if first_token.is_none()
                    && text.contains("\"content\":\"")
                    && text.matches("data:").count() > 1
                {
                    first_token = Some(Instant::now());
                }
            }
            (text, first_token.expect("a first token"))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Per user: alice's second generation is refused while her first runs.
    let second = alice
        .post("/v1/chat/completions", ask(4, "Hi".into()))
        .await;
    assert_eq!(second.status, 429, "{:?}", second.body);
    assert_eq!(second.body["error"]["code"], "too_many_generations");
    assert!(second.headers.contains_key("retry-after"));
    // Overall (two at once): of bob's and carol's questions sent together, one runs beside
    // alice's and the other is told to come back.
    let (b, c2) = tokio::join!(
        async {
            let r = bob
                .post("/v1/chat/completions", ask(4, "Say hi.".into()))
                .await;
            (r, Instant::now())
        },
        async {
            let r = carol
                .post("/v1/chat/completions", ask(4, "Say hi.".into()))
                .await;
            (r, Instant::now())
        },
    );
    let mut outcomes = [(b.0.status, b.1), (c2.0.status, c2.1)];
    outcomes.sort_by_key(|o| o.0);
    assert_eq!(
        (outcomes[0].0, outcomes[1].0),
        (200, 429),
        "bob {:?}, carol {:?}",
        b.0.body,
        c2.0.body
    );
    let busy = if b.0.status == 429 { &b.0 } else { &c2.0 };
    assert_eq!(busy.body["error"]["code"], "server_busy");
    let short_done = outcomes[0].1;
    let (stream, long_first_token) = long.await.unwrap();
    assert!(stream.contains("[DONE]"), "{stream}");
    eprintln!(
        "short answer done {:.2} s before the long prompt's first token",
        long_first_token
            .saturating_duration_since(short_done)
            .as_secs_f64()
    );
    assert!(
        short_done < long_first_token,
        "the short answer did not wait for the long prompt's prefill"
    );
    // Every place is free again.
    let r = carol
        .post("/v1/chat/completions", ask(4, "Hi".into()))
        .await;
    assert_eq!(r.status, 200);
    let _: Value = r.body;
}
