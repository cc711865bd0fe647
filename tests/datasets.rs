//! Dataset upload, validation, listing, preview, download and isolation, over HTTP.

mod common;

use common::{Client, Server};
use serde_json::json;

const ALPACA: &str = r#"[
  {"instruction": "What is 3 plus 4?", "input": "", "output": "3 plus 4 is 7."},
  {"instruction": "Say hi", "output": "Hi!", "system": "Be brief.", "history": [["a", "b"]]}
]"#;

fn sharegpt_jsonl() -> String {
    [
        json!({"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}),
        json!({"conversations": [{"from": "system", "value": "Be nice"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
        json!({"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect::<Vec<_>>()
    .join("\n")
}

fn openai_jsonl() -> String {
    [
        json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
        json!({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect::<Vec<_>>()
    .join("\n")
        + "\n"
}

const CSV: &str = "instruction,input,output\n\"What is 2+2?\",,4\nTranslate,bonjour,hello\n";

async fn user(server: &Server, name: &str) -> Client {
    server.client().signup(name).await.0
}

#[tokio::test]
async fn each_format_uploads_lists_previews_and_downloads() {
    let server = Server::start(&[]);
    let alice = user(&server, "alice").await;
    let cases: Vec<(&str, Vec<u8>, &str, u64)> = vec![
        ("alpaca.json", ALPACA.as_bytes().to_vec(), "alpaca", 2),
        ("chat.jsonl", sharegpt_jsonl().into_bytes(), "sharegpt", 3),
        ("openai.jsonl", openai_jsonl().into_bytes(), "openai", 2),
        ("sheet.csv", CSV.as_bytes().to_vec(), "alpaca", 2),
        (
            "bom.json",
            [b"\xEF\xBB\xBF".as_slice(), ALPACA.as_bytes()].concat(),
            "alpaca",
            2,
        ),
    ];
    let mut ids = Vec::new();
    for (name, bytes, format, rows) in &cases {
        let r = alice.upload(name, bytes.clone()).await;
        assert_eq!(r.status, 201, "{name}: {:?}", r.body);
        assert_eq!(r.body["format"], *format, "{name}");
        assert_eq!(r.body["num_rows"], *rows, "{name}");
        assert_eq!(r.body["size"], bytes.len() as u64, "{name}");
        assert_eq!(r.body["filename"], *name);
        assert!(r.body["message"].is_string());
        // Shown relative to the data dir: answers do not reveal the server's layout.
        let path = r.body["file_path"].as_str().unwrap();
        assert!(!path.starts_with('/'), "{path} is relative");
        assert!(
            server.data_path().join(path).is_file(),
            "{path} is under the data dir"
        );
        let id = r.body["file_id"].as_str().unwrap().to_string();

        let (status, got, headers) = alice
            .get_bytes(&format!("/api/files/datasets/{id}/download"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(&got, bytes, "{name}: identical bytes back");
        let disposition = headers
            .get("content-disposition")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(disposition.contains(name), "{disposition}");
        ids.push(id);
    }

    let list = alice.get("/api/files/datasets").await;
    assert_eq!(list.status, 200);
    let files = list.body["files"].as_array().unwrap();
    assert_eq!(files.len(), cases.len());
    for f in files {
        for field in [
            "file_id",
            "filename",
            "file_path",
            "size",
            "format",
            "num_rows",
            "created_at",
        ] {
            assert!(!f[field].is_null(), "{field} in {f}");
        }
    }

    let p = alice
        .get(&format!("/api/files/datasets/{}/preview?limit=1", ids[0]))
        .await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body["format"], "alpaca");
    assert_eq!(p.body["num_rows"], 2);
    assert_eq!(p.body["rows"].as_array().unwrap().len(), 1);
    assert_eq!(p.body["rows"][0]["output"], "3 plus 4 is 7.");

    let p = alice
        .get(&format!("/api/files/datasets/{}/preview", ids[3]))
        .await;
    assert_eq!(p.body["rows"].as_array().unwrap().len(), 2);
    assert_eq!(p.body["rows"][1]["input"], "bonjour");

    let del = alice
        .delete(&format!("/api/files/datasets/{}", ids[0]))
        .await;
    assert_eq!(del.status, 200);
    assert_eq!(
        alice
            .get(&format!("/api/files/datasets/{}/preview", ids[0]))
            .await
            .status,
        404
    );
    assert_eq!(
        alice.get("/api/files/datasets").await.body["files"]
            .as_array()
            .unwrap()
            .len(),
        cases.len() - 1
    );
    let path = files
        .iter()
        .find(|f| f["file_id"] == ids[0].as_str())
        .unwrap()["file_path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !server.data_path().join(&path).exists(),
        "file removed with the record"
    );
}

#[tokio::test]
async fn another_users_dataset_is_404_on_every_route() {
    let server = Server::start(&[]);
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let r = alice.upload("a.json", ALPACA.as_bytes().to_vec()).await;
    let id = r.body["file_id"].as_str().unwrap().to_string();

    for path in [
        format!("/api/files/datasets/{id}"),
        format!("/api/files/datasets/{id}/preview"),
        format!("/api/files/datasets/{id}/download"),
    ] {
        let r = bob.get(&path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.code(), "not_found");
    }
    assert_eq!(
        bob.delete(&format!("/api/files/datasets/{id}"))
            .await
            .status,
        404
    );
    assert!(
        bob.get("/api/files/datasets").await.body["files"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Still there for alice, and unauthenticated callers get 401.
    assert_eq!(
        alice.get(&format!("/api/files/datasets/{id}")).await.status,
        200
    );
    assert_eq!(server.client().get("/api/files/datasets").await.status, 401);
    assert_eq!(
        server
            .client()
            .get(&format!("/api/files/datasets/{id}/download"))
            .await
            .status,
        401
    );
}

fn leftovers(server: &Server) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["tmp", "datasets"] {
        let dir = server.data_path().join(sub);
        if let Ok(walk) = std::fs::read_dir(&dir) {
            for e in walk.flatten() {
                if e.path().is_dir() {
                    for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                        out.push(f.path().display().to_string());
                    }
                } else {
                    out.push(e.path().display().to_string());
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn broken_files_are_422_naming_the_record_and_leave_nothing() {
    let server = Server::start(&[]);
    let alice = user(&server, "alice").await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty.json", String::new(), "empty"),
        ("empty-array.json", "[]".into(), "no records"),
        ("syntax.json", "[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": }\n]".into(), "line 3"),
        ("missing.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n".into(), "line 2"),
        ("mixed.jsonl", format!("{}\n{}\n", json!({"instruction": "a", "output": "b"}), json!({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})), "line 2"),
        ("turns.jsonl", format!("{}\n", json!({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})), "line 1"),
        ("roles.json", json!([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, {"messages": [{"role": "assistant", "content": "a"}]}]).to_string(), "record 2"),
        ("notobj.json", "[\"just a string\"]".into(), "record 1"),
        ("unknown.jsonl", "{\"question\": \"raw\"}\n".into(), "line 1"),
        ("ragged.csv", "instruction,output\na,b\nc,d,e\n".into(), "row 2"),
        ("cols.csv", "question,answer\na,b\n".into(), "output"),
        ("prose.md", "hello there".into(), "expected"),
        ("half.jsonl", format!("{}\n", json!({"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "gpt", "value": "b"}})), "missing field `rejected`"),
        ("picture.jsonl", format!("{}\n", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "a"}]})), "multimodal"),
    ];
    for (name, content, needle) in cases {
        let r = alice.upload(name, content.into_bytes()).await;
        assert_eq!(r.status, 422, "{name}: {:?}", r.body);
        assert_eq!(r.code(), "invalid_dataset", "{name}");
        assert!(
            r.error().contains(needle),
            "{name}: {:?} should mention {needle:?}",
            r.error()
        );
    }
    assert!(leftovers(&server).is_empty(), "{:?}", leftovers(&server));
    assert!(
        alice.get("/api/files/datasets").await.body["files"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Not multipart, or no `file` field.
    let r = alice
        .post_raw("/api/files/datasets", "application/json", b"{}".to_vec())
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let form = reqwest::multipart::Form::new().text("other", "x");
    let r = Client::send(
        alice
            .http
            .post(server.url("/api/files/datasets"))
            .bearer_auth(alice.token.as_deref().unwrap())
            .multipart(form),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
}

#[tokio::test]
async fn uploads_over_the_limit_are_413_and_leave_nothing() {
    let server = Server::start(&[("FERROTUNE_MAX_UPLOAD_BYTES", "2000")]);
    let alice = user(&server, "alice").await;
    let row = json!({"instruction": "x".repeat(50), "output": "y"}).to_string();
    let small: String = std::iter::repeat_n(row.as_str(), 10)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(small.len() < 2000);
    assert_eq!(
        alice.upload("ok.jsonl", small.into_bytes()).await.status,
        201
    );

    // Slightly over the limit: the file part exceeds it while streaming.
    let big: String = std::iter::repeat_n(row.as_str(), 40)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(big.len() > 2000 && big.len() < 2000 + 1024 * 1024);
    let r = alice.upload("big.jsonl", big.into_bytes()).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.code(), "too_large");

    // Far over: refused from the declared length before any of the body is read. A client
    // that sends `Expect: 100-continue` (curl does for large bodies) gets the 413 without
    // ever sending the body.
    let status = declare_huge_upload(&server, alice.token.as_deref().unwrap()).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    let files = alice.get("/api/files/datasets").await.body["files"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(files, 1);
    let left = leftovers(&server);
    assert_eq!(left.len(), 1, "only the accepted upload remains: {left:?}");
}

#[tokio::test]
async fn client_file_names_never_become_paths() {
    let server = Server::start(&[]);
    let alice = user(&server, "alice").await;
    let r = alice
        .upload("../../../../tmp/evil.json", ALPACA.as_bytes().to_vec())
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["filename"], "evil.json");
    let path = r.body["file_path"].as_str().unwrap();
    assert!(path.starts_with("datasets/"), "{path}");
    assert!(server.data_path().join(path).is_file());
    assert!(
        !path.contains("evil"),
        "stored under its id, not the client's name"
    );
}

/// Sends only the headers of a 3 GiB multipart upload, then reads the status line.
async fn declare_huge_upload(server: &Server, token: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/files/datasets HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        3u64 << 30
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reader.read_line(&mut line),
    )
    .await
    .expect("an answer without sending the body")
    .unwrap();
    line
}
