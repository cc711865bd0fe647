//! Logs on disk: the server's log and each training worker's output, written to files that
//! rotate by size (`file-rotate`: `name`, `name.1` … `name.N`, the oldest dropped), and the
//! reader behind the administrators' log viewer (filter by level, target, request id, text).
//!
//! The server writes through `tracing-appender`'s background thread, so a slow disk never
//! holds a request; a worker copies what Python and native code print (its stdout and
//! stderr, redirected into a pipe) line by line into its task's `train.log`. Rotation
//! happens only between whole lines (`ContentLimit::BytesSurpassed`), so every file of a
//! JSON log stays one JSON object a line.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The server's log file in the log folder.
pub const SERVER_LOG: &str = "ferrotune.log";
/// The most entries one read returns.
pub const MAX_ENTRIES: usize = 1000;

/// Where and how a log is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rotation {
    /// The current file; older ones get `.1`, `.2` … appended.
    pub path: PathBuf,
    /// A file is rotated once it holds more than this.
    pub max_bytes: usize,
    /// Rotated files kept besides the current one.
    pub keep: usize,
}

impl Rotation {
    /// Opens the rotating writer (appending to what the current file holds), making its folder
    /// (mode 0700 for a fresh one: logs name users and addresses) and files (0600).
    pub fn open(&self) -> std::io::Result<RotatingLog> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // Fail here, with an error, rather than inside the crate (which panics on a folder it
        // cannot make and silently drops writes to a file it cannot open).
        let mut options = OpenOptions::new();
        options.read(true).create(true).append(true).mode(0o600);
        drop(options.open(&self.path)?);
        Ok(RotatingLog {
            file: FileRotate::new(
                &self.path,
                AppendCount::new(self.keep),
                ContentLimit::BytesSurpassed(self.max_bytes.max(1)),
                Compression::None,
                Some(options),
            ),
            partial: Vec::new(),
        })
    }

    /// The files that exist, newest first.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if self.path.is_file() {
            out.push(self.path.clone());
        }
        for n in 1..=self.keep.max(1) {
            let p = numbered(&self.path, n);
            if p.is_file() {
                out.push(p);
            }
        }
        out
    }
}

/// A rotating file written whole lines at a time: bytes are held until their line ends, and
/// each write to the file holds only complete lines, so a rotation (which happens between
/// writes) never splits one.
pub struct RotatingLog {
    file: FileRotate<AppendCount>,
    partial: Vec<u8>,
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match buf.iter().rposition(|&b| b == b'\n') {
            None => self.partial.extend_from_slice(buf),
            Some(end) => {
                if self.partial.is_empty() {
                    self.file.write_all(&buf[..=end])?;
                } else {
                    self.partial.extend_from_slice(&buf[..=end]);
                    let lines = std::mem::take(&mut self.partial);
                    self.file.write_all(&lines)?;
                }
                self.partial.extend_from_slice(&buf[end + 1..]);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for RotatingLog {
    fn drop(&mut self) {
        // An unfinished last line is still written (ended, so the file stays line-shaped).
        if !self.partial.is_empty() {
            self.partial.push(b'\n');
            let rest = std::mem::take(&mut self.partial);
            let _ = self.file.write_all(&rest);
        }
        let _ = self.file.flush();
    }
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The last `n` lines of a rotating log, reaching into rotated files when the current one
/// holds fewer (blocking: reads files).
pub fn tail(path: &Path, n: usize) -> std::io::Result<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut k = 0;
    loop {
        let file = if k == 0 {
            path.to_path_buf()
        } else {
            numbered(path, k)
        };
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut older: Vec<String> = text.lines().map(str::to_string).collect();
        let take = older.len().min(n - lines.len().min(n));
        let from = older.len() - take;
        older.drain(..from);
        older.append(&mut lines);
        lines = older;
        if lines.len() >= n {
            break;
        }
        k += 1;
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

// ---- the worker's output ----------------------------------------------------------------

/// Sends this process's stdout and stderr (file descriptors 1 and 2, so native code and child
/// processes too) through a pipe into `rotation`'s file, line by line. Returns the copying
/// thread; [`Captured::finish`] closes the pipe and waits for the last lines.
pub fn capture_std_streams(rotation: &Rotation) -> std::io::Result<Captured> {
    let path = rotation.path.clone();
    let mut file = rotation.open()?;
    let (reader, writer) = std::io::pipe()?;
    use std::os::fd::{AsRawFd, FromRawFd};
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // The stderr the worker was started with (the file the supervisor opened): where a failure
    // to write the rotated log is reported, since the log itself cannot say it.
    // SAFETY: dup of this process's descriptor 2; the new descriptor is owned by `fallback`.
    let fallback = match unsafe { libc::dup(2) } {
        fd if fd >= 0 => Some(unsafe { std::fs::File::from_raw_fd(fd) }),
        _ => None,
    };
    // SAFETY: dup2 on descriptors this process owns; 1 and 2 are replaced atomically.
    unsafe {
        if libc::dup2(writer.as_raw_fd(), 1) < 0 || libc::dup2(writer.as_raw_fd(), 2) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    drop(writer);
    let thread = std::thread::Builder::new()
        .name("worker-log".into())
        .spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            let mut fallback = fallback;
            let mut lost = 0u64;
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if let Err(e) = file.write_all(&line).and_then(|()| file.flush()) {
                            lost += 1;
                            // Said once where it can still be read; the line itself goes
                            // there too.
                            if let Some(f) = fallback.as_mut() {
                                if lost == 1 {
                                    let _ = writeln!(
                                        f,
                                        "ferrotune worker: cannot write the log {}: {e}",
                                        path.display()
                                    );
                                }
                                let _ = f.write_all(&line);
                            }
                        }
                    }
                }
            }
        })?;
    Ok(Captured { thread })
}

/// The copying side of [`capture_std_streams`].
pub struct Captured {
    thread: std::thread::JoinHandle<()>,
}

impl Captured {
    /// Closes this process's ends of the pipe and waits (at most `wait`) for the copy to end;
    /// a child process still holding the pipe only shortens what is copied after this.
    pub fn finish(self, wait: std::time::Duration) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: closing descriptors 1 and 2 of this process, which is about to exit.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
        let deadline = std::time::Instant::now() + wait;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

// ---- reading ------------------------------------------------------------------------------

/// One line of the server's log, parsed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogEntry {
    /// RFC 3339, as written.
    pub time: Option<String>,
    /// `TRACE`, `DEBUG`, `INFO`, `WARN` or `ERROR`.
    pub level: Option<String>,
    /// The module that logged it, e.g. `ferrotune::training::supervisor`.
    pub target: Option<String>,
    pub message: String,
    /// The request it was logged in (the `x-request-id` the client got back).
    pub request_id: Option<String>,
    /// The event's other fields, and those of the spans it was logged in.
    #[schema(value_type = Object)]
    pub fields: Map<String, Value>,
    /// The file it was read from (`ferrotune.log`, `ferrotune.log.1` …).
    pub file: String,
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// This level and more severe ones.
    pub level: Option<u8>,
    /// Targets starting with this.
    pub target: Option<String>,
    pub request_id: Option<String>,
    /// Text anywhere in the line (any case).
    pub text: Option<String>,
    /// Entries written before this time (RFC 3339), to page back.
    pub until: Option<String>,
    pub limit: usize,
}

/// Severity rank of a level name (any case): 0 trace … 4 error.
pub fn level_rank(level: &str) -> Option<u8> {
    Some(match level.to_ascii_uppercase().as_str() {
        "TRACE" => 0,
        "DEBUG" => 1,
        "INFO" => 2,
        "WARN" | "WARNING" => 3,
        "ERROR" => 4,
        _ => return None,
    })
}

/// A page of the log, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogPage {
    pub entries: Vec<LogEntry>,
    /// Pass as `until` for older entries; absent when the files hold no more that match.
    pub next_until: Option<String>,
    /// The log files, newest first, with their sizes in bytes.
    pub files: Vec<LogFile>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogFile {
    pub name: String,
    pub bytes: u64,
}

/// Reads the newest entries that match `query` from the rotating log at `rotation`
/// (blocking: reads files).
pub fn read(rotation: &Rotation, query: &LogQuery) -> std::io::Result<LogPage> {
    let limit = query.limit.clamp(1, MAX_ENTRIES);
    let text = query.text.as_deref().map(str::to_lowercase);
    let files = rotation.files();
    let mut listed = Vec::new();
    let mut entries = Vec::new();
    let mut more = false;
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            // Rotated away between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        listed.push(LogFile {
            name: name.clone(),
            bytes: bytes.len() as u64,
        });
        if more {
            continue;
        }
        let content = String::from_utf8_lossy(&bytes);
        for line in content.lines().rev() {
            if line.trim().is_empty() {
                continue;
            }
            if let Some(t) = &text
                && !line.to_lowercase().contains(t.as_str())
            {
                continue;
            }
            let entry = parse_line(line, &name);
            if !matches(&entry, query) {
                continue;
            }
            if entries.len() == limit {
                more = true;
                break;
            }
            entries.push(entry);
        }
    }
    let next_until = if more {
        entries.last().and_then(|e| e.time.clone())
    } else {
        None
    };
    Ok(LogPage {
        entries,
        next_until,
        files: listed,
    })
}

fn matches(entry: &LogEntry, query: &LogQuery) -> bool {
    if let Some(min) = query.level {
        match entry.level.as_deref().and_then(level_rank) {
            Some(rank) if rank >= min => {}
            _ => return false,
        }
    }
    if let Some(prefix) = &query.target
        && !entry
            .target
            .as_deref()
            .is_some_and(|t| t.starts_with(prefix.as_str()))
    {
        return false;
    }
    if let Some(id) = &query.request_id
        && entry.request_id.as_deref() != Some(id.as_str())
    {
        return false;
    }
    if let Some(until) = &query.until
        // RFC 3339 in UTC with a fixed number of digits orders as text.
        && entry.time.as_deref().is_none_or(|t| t >= until.as_str())
    {
        return false;
    }
    true
}

/// Parses one line of either format; a line that is neither is kept whole as the message.
pub fn parse_line(line: &str, file: &str) -> LogEntry {
    if line.starts_with('{')
        && let Ok(Value::Object(v)) = serde_json::from_str::<Value>(line)
    {
        return parse_json(v, file);
    }
    parse_text(line, file)
}

fn parse_json(mut v: Map<String, Value>, file: &str) -> LogEntry {
    let text = |v: &mut Map<String, Value>, k: &str| match v.remove(k) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let time = text(&mut v, "timestamp");
    let level = text(&mut v, "level");
    let target = text(&mut v, "target");
    let mut fields = match v.remove("fields") {
        Some(Value::Object(f)) => f,
        _ => Map::new(),
    };
    let message = match fields.remove("message") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    // The spans from the outermost in; an event's own field wins over a span's.
    if let Some(Value::Array(spans)) = v.remove("spans") {
        for span in spans {
            if let Value::Object(span) = span {
                for (k, val) in span {
                    if k != "name" {
                        fields.entry(k).or_insert(val);
                    }
                }
            }
        }
    }
    let request_id = match fields.get("request_id") {
        Some(Value::String(s)) if s != "-" => Some(s.clone()),
        _ => None,
    };
    LogEntry {
        time,
        level,
        target,
        message,
        request_id,
        fields,
        file: file.to_string(),
    }
}

/// tracing's text format without colours:
/// `TIME LEVEL span{k=v}:span2: target: message k=v`.
fn parse_text(line: &str, file: &str) -> LogEntry {
    let whole = || LogEntry {
        time: None,
        level: None,
        target: None,
        message: line.to_string(),
        request_id: None,
        fields: Map::new(),
        file: file.to_string(),
    };
    let mut parts = line.splitn(2, ' ');
    let (Some(time), Some(rest)) = (parts.next(), parts.next()) else {
        return whole();
    };
    if !time.starts_with(|c: char| c.is_ascii_digit()) {
        return whole();
    }
    let rest = rest.trim_start();
    let mut parts = rest.splitn(2, ' ');
    let (Some(level), Some(mut rest)) = (parts.next(), parts.next()) else {
        return whole();
    };
    if level_rank(level).is_none() {
        return whole();
    }
    // Spans: `name{fields}:` or `name:` repeated, then a space.
    let mut fields = Map::new();
    loop {
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if name_len == 0 {
            break;
        }
        let after = &rest[name_len..];
        if let Some(inner) = after.strip_prefix('{') {
            let Some(close) = inner.find("}:") else {
                break;
            };
            for (k, v) in key_values(&inner[..close]) {
                fields.insert(k, Value::String(v));
            }
            rest = &inner[close + 2..];
        } else if after.starts_with(':') && !after.starts_with("::") && !after.starts_with(": ") {
            rest = &after[1..];
        } else {
            break;
        }
    }
    let rest = rest.trim_start();
    let (target, message) = match rest.split_once(": ") {
        Some((t, m)) if !t.contains(' ') => (Some(t.to_string()), m.to_string()),
        _ => (None, rest.to_string()),
    };
    let request_id = match fields.get("request_id") {
        Some(Value::String(s)) if s != "-" => Some(s.clone()),
        _ => None,
    };
    LogEntry {
        time: Some(time.to_string()),
        level: Some(level.to_string()),
        target,
        message,
        request_id,
        fields,
        file: file.to_string(),
    }
}

/// `k=v k2=v2` pairs (values without spaces, or quoted).
fn key_values(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(' ') {
                Some(end) => (after[..end].to_string(), &after[end..]),
                None => (after.to_string(), ""),
            }
        };
        out.push((key, value));
        rest = next.trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse_into_the_same_fields() {
        let json = r#"{"timestamp":"2026-12-05T22:48:13.123456Z","level":"WARN","fields":{"message":"dataset deleted","dataset_id":"d1"},"target":"ferrotune::http::datasets","span":{"method":"DELETE","request_id":"r-1","route":"/api/datasets/{id}","name":"request"},"spans":[{"method":"DELETE","request_id":"r-1","route":"/api/datasets/{id}","name":"request"}]}"#;
        let e = parse_line(json, "ferrotune.log");
        assert_eq!(e.level.as_deref(), Some("WARN"));
        assert_eq!(e.target.as_deref(), Some("ferrotune::http::datasets"));
        assert_eq!(e.message, "dataset deleted");
        assert_eq!(e.request_id.as_deref(), Some("r-1"));
        assert_eq!(e.fields["dataset_id"], "d1");
        assert_eq!(e.fields["route"], "/api/datasets/{id}");

        let text = "2026-12-05T22:48:13.123456Z  WARN request{method=DELETE route=/api/datasets/{id} request_id=r-1}: ferrotune::http::datasets: dataset deleted dataset_id=d1";
        let t = parse_line(text, "ferrotune.log.1");
        assert_eq!(t.time.as_deref(), Some("2026-12-05T22:48:13.123456Z"));
        assert_eq!(t.level.as_deref(), Some("WARN"));
        assert_eq!(t.target.as_deref(), Some("ferrotune::http::datasets"));
        assert_eq!(t.message, "dataset deleted dataset_id=d1");
        assert_eq!(t.request_id.as_deref(), Some("r-1"));
        assert_eq!(t.file, "ferrotune.log.1");

        let plain =
            "2026-12-05T22:48:13.123456Z  INFO ferrotune::http: listening on 127.0.0.1:8080";
        let p = parse_line(plain, "f");
        assert_eq!(p.target.as_deref(), Some("ferrotune::http"));
        assert_eq!(p.message, "listening on 127.0.0.1:8080");
        assert_eq!(p.request_id, None);

        let odd = parse_line("Traceback (most recent call last):", "f");
        assert_eq!(odd.level, None);
        assert_eq!(odd.message, "Traceback (most recent call last):");
    }

    #[test]
    fn rotation_keeps_whole_lines_and_the_reader_pages_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            path: dir.path().join("logs").join(SERVER_LOG),
            // About seven of these lines a file: 28 or so kept of 40.
            max_bytes: 1000,
            keep: 3,
        };
        let mut w = rotation.open().unwrap();
        for i in 0..40 {
            let level = if i % 5 == 0 { "ERROR" } else { "INFO" };
            let line = serde_json::json!({
                "timestamp": format!("2026-12-05T00:00:{i:02}.000000Z"),
                "level": level,
                "target": if i % 2 == 0 { "ferrotune::a" } else { "other" },
                "fields": {"message": format!("event {i}")},
                "spans": [{"name": "request", "request_id": format!("r{}", i % 4)}],
            });
            writeln!(w, "{line}").unwrap();
        }
        drop(w);
        let files = rotation.files();
        assert_eq!(files.len(), 4, "current plus 3 kept: {files:?}");
        assert!(!numbered(&rotation.path, 4).exists());
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.ends_with('\n'));
            for l in text.lines() {
                serde_json::from_str::<Value>(l).unwrap();
            }
            assert!(
                text.len() <= 1000 + 200,
                "{} holds {}",
                f.display(),
                text.len()
            );
        }
        // Newest first, across files; older entries were dropped with the oldest file.
        let all = read(
            &rotation,
            &LogQuery {
                limit: 1000,
                ..LogQuery::default()
            },
        )
        .unwrap();
        let messages: Vec<&str> = all.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages[0], "event 39");
        let numbers: Vec<u32> = messages
            .iter()
            .map(|m| m.trim_start_matches("event ").parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] == w[1] + 1), "{numbers:?}");
        assert!(
            !messages.contains(&"event 0"),
            "the oldest file was dropped"
        );
        assert_eq!(all.next_until, None);
        assert_eq!(all.files.len(), 4);

        let errors = read(
            &rotation,
            &LogQuery {
                level: level_rank("warn"),
                target: Some("ferrotune::".into()),
                limit: 2,
                ..LogQuery::default()
            },
        )
        .unwrap();
        let got: Vec<&str> = errors.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(got, ["event 30", "event 20"]);
        assert_eq!(
            errors.next_until, None,
            "event 10 went with the oldest file"
        );
        let one = read(
            &rotation,
            &LogQuery {
                request_id: Some("r2".into()),
                level: level_rank("error"),
                limit: 5,
                ..LogQuery::default()
            },
        )
        .unwrap();
        let got: Vec<&str> = one.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(got, ["event 30"]);
        assert!(
            one.entries
                .iter()
                .all(|e| e.request_id.as_deref() == Some("r2"))
        );

        let first = read(
            &rotation,
            &LogQuery {
                text: Some("EVENT 3".into()),
                limit: 3,
                ..LogQuery::default()
            },
        )
        .unwrap();
        let got: Vec<&str> = first.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(got, ["event 39", "event 38", "event 37"]);
        let until = first.next_until.clone().unwrap();
        let older = read(
            &rotation,
            &LogQuery {
                text: Some("event 3".into()),
                until: Some(until),
                limit: 50,
                ..LogQuery::default()
            },
        )
        .unwrap();
        let got: Vec<&str> = older.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(got[0], "event 36");
        assert_eq!(*got.last().unwrap(), "event 30");
    }

    #[test]
    fn tail_reaches_into_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            path: dir.path().join("train.log"),
            max_bytes: 30,
            keep: 5,
        };
        let mut w = rotation.open().unwrap();
        for i in 0..20 {
            writeln!(w, "line {i}").unwrap();
        }
        drop(w);
        let last = tail(&rotation.path, 8).unwrap();
        let want: Vec<String> = (12..20).map(|i| format!("line {i}")).collect();
        assert_eq!(last, want.join("\n") + "\n");
        assert_eq!(tail(&rotation.path, 1).unwrap(), "line 19\n");
        std::fs::write(dir.path().join("short.log"), "a\nb\nc").unwrap();
        assert_eq!(tail(&dir.path().join("short.log"), 2).unwrap(), "b\nc\n");
        assert_eq!(tail(&dir.path().join("none.log"), 5).unwrap(), "");
    }
}
