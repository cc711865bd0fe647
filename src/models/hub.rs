//! Models from a Hugging Face–compatible hub: `ferrotune models pull org/name[@revision]` and
//! the administrators' "Add model" form (`POST /api/models/pulls`).
//!
//! The download itself is `huggingface_hub` (the hub's own, well-kept client, already in the
//! training environment because transformers needs it), driven by `hub_pull.py` with the
//! environment's Python: it follows the configured endpoint (mirrors), sends the token for
//! gated models, resumes a file from its partial part, and fetches only what a model needs
//! (top-level safetensors, config, tokenizer and template files). The script checks every
//! file against the hub's checksums. Here:
//!
//! - the files land in `<models_dir>/.<name>.hub-partial/`, a hidden folder discovery skips,
//!   kept when a pull fails so the next attempt resumes instead of starting over;
//! - a lock file (`.<name>.hub-lock`, `flock`) keeps two pulls of one name apart, across
//!   processes (the CLI beside a running server);
//! - a complete pull records where it came from in `.ferrotune/source.json` and is renamed
//!   into place: a model folder is never half-written.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::BaseModel;

const SCRIPT: &str = include_str!("hub_pull.py");

/// Where a pull reads from: the endpoint (empty: huggingface_hub's default, which honours
/// `HF_ENDPOINT`) and the token (empty: huggingface_hub's own, `HF_TOKEN` or the saved login).
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    pub endpoint: String,
    pub token: String,
}

/// `org/name[@revision]`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRef {
    pub repo: String,
    pub revision: Option<String>,
}

/// Why a hub reference or a pull failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Bad input: the reference or the name.
    #[error("{0}")]
    Invalid(String),
    /// The name is another model's.
    #[error("{0}")]
    Taken(String),
    /// A pull of this name is running.
    #[error("{0}")]
    Busy(String),
    /// The hub said no, or could not be reached, or a file did not check out. `kind` is the
    /// script's: not_found, gated, unauthorized, revision, no_weights, checksum, network, other.
    #[error("{message}")]
    Hub { kind: String, message: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<std::io::Error> for HubError {
    fn from(e: std::io::Error) -> Self {
        HubError::Other(e.into())
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl HubRef {
    /// Parses `org/name` or `org/name@revision` (a branch, tag or commit).
    pub fn parse(s: &str) -> Result<HubRef, HubError> {
        let s = s.trim();
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (s, None),
        };
        let bad = || {
            HubError::Invalid(format!(
                "`{s}` is not a hub model id: give `organisation/name`, optionally \
                 `@revision` (e.g. Qwen/Qwen2.5-7B-Instruct)"
            ))
        };
        let (org, name) = repo.split_once('/').ok_or_else(bad)?;
        if !valid_part(org) || !valid_part(name) {
            return Err(bad());
        }
        if let Some(rev) = revision
            && (rev.is_empty()
                || rev.len() > 200
                || rev.contains("..")
                || rev.starts_with('/')
                || !rev
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            return Err(HubError::Invalid(format!(
                "`{rev}` is not a revision: a branch, tag or commit"
            )));
        }
        Ok(HubRef {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// The folder name a pull lands in by default: the repository's name.
    pub fn default_name(&self) -> &str {
        self.repo.rsplit('/').next().unwrap_or(&self.repo)
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Where a pulled model came from: `<model>/.ferrotune/source.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub repo: String,
    /// The revision asked for (None: the default branch).
    pub revision: Option<String>,
    /// The commit it resolved to.
    pub commit: String,
    /// The endpoint, when one was configured.
    pub endpoint: Option<String>,
    pub files: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub pulled_at: time::OffsetDateTime,
}

/// The source record of a model folder, when it was pulled from a hub.
pub fn source_of(dir: &Path) -> Option<Source> {
    let bytes = std::fs::read(dir.join(".ferrotune").join("source.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What a pull reports while it runs.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The commit and the files it will fetch, with their total size.
    Plan {
        commit: String,
        files: usize,
        total: u64,
    },
    /// Bytes so far, over all files.
    Bytes { file: String, done: u64 },
    /// One file complete and verified (`reused`: a complete file from an earlier attempt).
    File {
        name: String,
        size: u64,
        reused: bool,
    },
    /// A line for logs and the CLI.
    Note(String),
}

/// The name a hub pull gives the model (`name`, else the repository's), checked like a
/// registered folder's name.
pub fn model_name(r: &HubRef, name: Option<&str>) -> Result<String, HubError> {
    let name = crate::text::clean_name(name.unwrap_or(r.default_name()));
    if name.is_empty() || name.len() > 100 || name.starts_with('.') || name.contains(['/', '\\']) {
        return Err(HubError::Invalid(
            "name: 1 to 100 characters, no slash, not starting with a dot".into(),
        ));
    }
    Ok(name)
}

/// Holds `.<name>.hub-lock` for the pull's lifetime.
struct PullLock {
    _file: std::fs::File,
}

fn lock(models_dir: &Path, name: &str) -> Result<PullLock, HubError> {
    let path = models_dir.join(format!(".{name}.hub-lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(PullLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(HubError::Busy(format!(
            "a pull of `{name}` is running already"
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Pulls `r` from the hub into `<models_dir>/<name>`, with `python` (the training
/// environment's, which has huggingface_hub). A model of that name pulled from the same
/// repository (and, when `r` names one, revision) is kept as it is; a model of that name
/// from anywhere else is a [`HubError::Taken`].
pub async fn pull(
    models_dir: &Path,
    r: &HubRef,
    name: Option<&str>,
    python: &Path,
    settings: &HubSettings,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<BaseModel, HubError> {
    let name = model_name(r, name)?;
    let final_dir = models_dir.join(&name);
    std::fs::create_dir_all(models_dir)
        .with_context(|| format!("cannot create {}", models_dir.display()))?;
    let _lock = lock(models_dir, &name)?;
    if final_dir.symlink_metadata().is_ok() {
        return match source_of(&final_dir) {
            Some(s)
                if s.repo.eq_ignore_ascii_case(&r.repo)
                    && r.revision
                        .as_ref()
                        .is_none_or(|rev| *rev == s.commit || Some(rev) == s.revision.as_ref()) =>
            {
                progress(Progress::Note(format!(
                    "{r} is pulled already as `{name}` (commit {}); nothing to do",
                    short(&s.commit)
                )));
                let m = super::inspect(&final_dir, name.clone())?
                    .context("the model folder holds no model any more")?;
                Ok(m)
            }
            _ => Err(HubError::Taken(format!(
                "a base model called `{name}` exists already; pull under another name \
                 (`--as NAME`, or the form's name)"
            ))),
        };
    }
    let partial = models_dir.join(format!(".{name}.hub-partial"));
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    // An earlier attempt for another repository leaves nothing to resume.
    let marker = partial.join(".ferrotune-pull");
    match std::fs::read_to_string(&marker) {
        Ok(s) if s.trim() == r.repo => {
            progress(Progress::Note(format!(
                "resuming an earlier pull of {r} (files already complete are kept)"
            )));
        }
        _ => {
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial)?;
            std::fs::write(&marker, &r.repo)?;
        }
    }
    progress(Progress::Note(format!(
        "pull {r} from {}",
        if settings.endpoint.is_empty() {
            "the default hub"
        } else {
            settings.endpoint.as_str()
        }
    )));
    let (commit, files) = run_script(python, r, &partial, settings, &progress).await?;

    // Into place: the download bookkeeping goes, the source is recorded, one rename.
    let _ = std::fs::remove_dir_all(partial.join(".cache"));
    let _ = std::fs::remove_file(&marker);
    let meta = partial.join(".ferrotune");
    std::fs::create_dir_all(&meta)?;
    let source = Source {
        repo: r.repo.clone(),
        revision: r.revision.clone(),
        commit: commit.clone(),
        endpoint: (!settings.endpoint.is_empty()).then(|| settings.endpoint.clone()),
        files,
        pulled_at: time::OffsetDateTime::now_utc(),
    };
    let mut f = std::fs::File::create(meta.join("source.json"))?;
    f.write_all(&serde_json::to_vec_pretty(&source).context("source record")?)?;
    f.sync_all()?;
    if super::inspect(&partial, name.clone())?.is_none() {
        return Err(HubError::Hub {
            kind: "no_weights".into(),
            message: format!("{r} downloaded, but the folder holds no model ferrotune can load"),
        });
    }
    std::fs::rename(&partial, &final_dir)
        .with_context(|| format!("cannot move the pulled model into {}", final_dir.display()))?;
    progress(Progress::Note(format!(
        "pulled {r} (commit {}) as `{name}`",
        short(&commit)
    )));
    let m = super::inspect(&final_dir, name)?.context("the model folder vanished")?;
    Ok(m)
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

#[derive(Deserialize)]
struct Event {
    event: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    files: Vec<PlannedFile>,
    #[serde(default)]
    total: u64,
    #[serde(default)]
    file: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    done_bytes: u64,
    #[serde(default)]
    reused: bool,
}

#[derive(Deserialize)]
struct PlannedFile {
    name: String,
}

/// Runs `hub_pull.py`; returns the commit and the files it fetched.
async fn run_script(
    python: &Path,
    r: &HubRef,
    dest: &Path,
    settings: &HubSettings,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<(String, Vec<String>), HubError> {
    // The token goes through stdin, never the command line (`ps` shows that to everyone).
    let input = serde_json::json!({
        "repo": r.repo,
        "revision": r.revision,
        "endpoint": (!settings.endpoint.is_empty()).then_some(&settings.endpoint),
        "token": (!settings.token.is_empty()).then_some(&settings.token),
        "dest": dest,
    });
    let mut child = tokio::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (is the training environment installed? `ferrotune setup`)",
                python.display()
            )
        })?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin
        .write_all(input.to_string().as_bytes())
        .await
        .context("cannot hand the pull its settings")?;
    drop(stdin);
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    // stderr is kept (the last lines) for a failure the script did not describe.
    let tail = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.trim().is_empty() {
                tail.push(line);
                if tail.len() > 12 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut lines = BufReader::new(stdout).lines();
    let (mut commit, mut files, mut failure) = (None, Vec::new(), None);
    while let Some(line) = lines
        .next_line()
        .await
        .context("reading the pull's output")?
    {
        let Ok(e) = serde_json::from_str::<Event>(&line) else {
            continue;
        };
        match e.event.as_str() {
            "plan" => {
                files = e.files.into_iter().map(|f| f.name).collect();
                progress(Progress::Plan {
                    commit: e.commit,
                    files: files.len(),
                    total: e.total,
                });
            }
            "progress" => progress(Progress::Bytes {
                file: e.file,
                done: e.done_bytes,
            }),
            "file" => progress(Progress::File {
                name: e.name,
                size: e.size,
                reused: e.reused,
            }),
            "done" => commit = Some(e.commit),
            "error" => {
                failure = Some(HubError::Hub {
                    kind: e.kind,
                    message: e.message,
                })
            }
            _ => {}
        }
    }
    let status = child.wait().await.context("waiting for the pull")?;
    let tail = tail.await.unwrap_or_default();
    if let Some(f) = failure {
        return Err(f);
    }
    match commit {
        Some(c) if status.success() => Ok((c, files)),
        _ => Err(HubError::Hub {
            kind: "other".into(),
            message: format!(
                "the download stopped ({status}); its last lines:\n{}",
                tail.join("\n")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_bad_ones_are_refused() {
        let r = HubRef::parse("Qwen/Qwen2.5-7B-Instruct").unwrap();
        assert_eq!(r.repo, "Qwen/Qwen2.5-7B-Instruct");
        assert_eq!(r.revision, None);
        assert_eq!(r.default_name(), "Qwen2.5-7B-Instruct");
        let r = HubRef::parse("org/m@refs/pr/1").unwrap();
        assert_eq!(r.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(r.to_string(), "org/m@refs/pr/1");
        for bad in [
            "",
            "name",
            "a/b/c",
            "../x",
            "org/..",
            "org/.hidden",
            "org/n@",
            "org/n@../x",
            "org/n@a b",
            "org/n m",
            "/x",
            "org/",
        ] {
            assert!(
                matches!(HubRef::parse(bad), Err(HubError::Invalid(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn names_are_checked() {
        let r = HubRef::parse("org/m").unwrap();
        assert_eq!(model_name(&r, None).unwrap(), "m");
        assert_eq!(model_name(&r, Some(" mine ")).unwrap(), "mine");
        assert!(model_name(&r, Some(".x")).is_err());
        assert!(model_name(&r, Some("a/b")).is_err());
    }

    #[test]
    fn a_second_pull_of_one_name_waits_its_turn() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "m").unwrap();
        assert!(matches!(lock(dir.path(), "m"), Err(HubError::Busy(_))));
        assert!(lock(dir.path(), "other").is_ok());
        drop(first);
        assert!(lock(dir.path(), "m").is_ok());
    }
}
