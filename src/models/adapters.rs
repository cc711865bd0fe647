//! Bring your own adapter: a PEFT LoRA folder (`adapter_config.json` +
//! `adapter_model.safetensors`) uploaded as a `.zip` or `.tar.gz` becomes one of its owner's
//! models — chat-able, downloadable and deletable like a trained one.
//!
//! The archive is unpacked into a hidden folder beside the owner's models with every entry
//! checked (plain files only, no absolute or `..` paths, no links, bounded size and count),
//! the adapter is checked against its base model exactly as chat will load it (every tensor's
//! shape against the base's configuration), and only then renamed into place and recorded.
//! A refused upload leaves nothing behind.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;

use super::{BaseModel, Registry};
use crate::error::{Error, Kind, Result};
use crate::inference::EngineError;
use crate::store::{ModelKind, ModelRecord};

/// Most files an adapter archive may hold.
const MAX_FILES: usize = 10_000;

fn invalid(code: &'static str, message: impl Into<String>) -> Error {
    Error::new(Kind::Invalid, code, message)
}

/// The adapter's name from the archive's file name (`my-lora.tar.gz` → `my-lora`).
fn stem(file_name: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    let lower = base.to_ascii_lowercase();
    for ext in [".tar.gz", ".tgz", ".zip", ".tar"] {
        if lower.ends_with(ext) {
            return base[..base.len() - ext.len()].to_string();
        }
    }
    base.to_string()
}

/// A path inside the archive made safe to join under the destination: relative, plain
/// components only. `None`: refuse the archive.
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Counts what an archive unpacks to, refusing bombs.
struct Budget {
    bytes_left: u64,
    files_left: usize,
}

impl Budget {
    fn file(&mut self, size: u64) -> Result<()> {
        if self.files_left == 0 {
            return Err(invalid(
                "invalid_archive",
                format!("the archive holds more than {MAX_FILES} files"),
            ));
        }
        self.files_left -= 1;
        self.bytes_left = self.bytes_left.checked_sub(size).ok_or_else(|| {
            invalid(
                "invalid_archive",
                "the archive unpacks to more than ten times the upload limit",
            )
        })?;
        Ok(())
    }
}

/// Writes one entry's bytes to `dest/rel`, within the budget.
fn write_entry(dest: &Path, rel: &Path, mut r: impl Read, budget: &mut Budget) -> Result<()> {
    let path = dest.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::File::create(&path)?;
    // Copy at most what the budget allows plus one byte, to notice an entry that lies about
    // its size.
    let copied = std::io::copy(&mut (&mut r).take(budget.bytes_left + 1), &mut f)?;
    budget.file(copied)?;
    Ok(())
}

fn is_junk(rel: &Path) -> bool {
    rel.components().any(|c| {
        let s = c.as_os_str().to_string_lossy();
        s == "__MACOSX" || s == ".DS_Store"
    })
}

/// Unpacks `archive` (zip or gzip-compressed tar, told apart by their first bytes) into `dest`.
fn unpack(archive: &Path, dest: &Path, max_bytes: u64) -> Result<()> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(archive)?.read(&mut magic)?;
    let mut budget = Budget {
        bytes_left: max_bytes.saturating_mul(10),
        files_left: MAX_FILES,
    };
    let bad = |e: &dyn std::fmt::Display| {
        invalid(
            "invalid_archive",
            format!("the archive cannot be read: {e}"),
        )
    };
    if n >= 4 && magic == *b"PK\x03\x04" {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(archive)?).map_err(|e| bad(&e))?;
        for i in 0..zip.len() {
            let entry = zip.by_index(i).map_err(|e| bad(&e))?;
            let shown = entry.name().map(|n| n.into_owned()).unwrap_or_default();
            if entry.is_dir() {
                continue;
            }
            if entry.is_symlink() {
                return Err(invalid(
                    "invalid_archive",
                    format!("`{shown}` is a symbolic link: upload plain files"),
                ));
            }
            let rel = entry
                .enclosed_name()
                .and_then(|p| safe_relative(&p))
                .ok_or_else(|| {
                    invalid(
                        "invalid_archive",
                        format!("`{shown}` points outside the archive's folder"),
                    )
                })?;
            if is_junk(&rel) {
                continue;
            }
            write_entry(dest, &rel, entry, &mut budget)?;
        }
        return Ok(());
    }
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(archive)?);
        let mut tar = tar::Archive::new(gz);
        for entry in tar.entries().map_err(|e| bad(&e))? {
            let entry = entry.map_err(|e| bad(&e))?;
            let kind = entry.header().entry_type();
            let path = entry.path().map_err(|e| bad(&e))?.into_owned();
            if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
                continue;
            }
            if !kind.is_file() {
                return Err(invalid(
                    "invalid_archive",
                    format!(
                        "`{}` is not a plain file (a link or a device): upload plain files",
                        path.display()
                    ),
                ));
            }
            let rel = safe_relative(&path).ok_or_else(|| {
                invalid(
                    "invalid_archive",
                    format!("`{}` points outside the archive's folder", path.display()),
                )
            })?;
            if is_junk(&rel)
                || rel
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("._"))
            {
                continue;
            }
            write_entry(dest, &rel, entry, &mut budget)?;
        }
        return Ok(());
    }
    Err(invalid(
        "invalid_archive",
        "not a .zip or .tar.gz archive: pack the adapter folder (adapter_config.json and \
         adapter_model.safetensors) as one",
    ))
}

/// The one folder in `root` (itself, or below) that holds `adapter_config.json`.
fn find_adapter(root: &Path) -> Result<PathBuf> {
    fn walk(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
        if dir.join("adapter_config.json").is_file() {
            found.push(dir.to_path_buf());
        }
        if depth == 0 {
            return Ok(());
        }
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                walk(&e.path(), depth - 1, found)?;
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(root, 3, &mut found)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(invalid(
            "invalid_adapter",
            "no adapter_config.json in the archive: upload a PEFT adapter folder \
             (adapter_config.json and adapter_model.safetensors)",
        )),
        n => Err(invalid(
            "invalid_adapter",
            format!("the archive holds {n} adapters: upload one at a time"),
        )),
    }
}

fn engine_error(e: EngineError) -> Error {
    match e {
        EngineError::Unsupported(m) => invalid("unsupported_adapter", m),
        EngineError::Invalid(m) => invalid("invalid_adapter", m),
        other => Error::internal(other.to_string()),
    }
}

/// The base model an adapter names (`base_model_name_or_path`, or the uploader's choice): by
/// name, by the last part of a hub id or a path, or by the hub repository it was pulled from.
fn find_base(registry: &Registry, wanted: &str) -> Result<Option<BaseModel>> {
    if let Some(b) = registry.find_base_blocking(wanted)? {
        return Ok(Some(b));
    }
    let last = wanted
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(wanted);
    if let Some(b) = registry.find_base_blocking(last)? {
        return Ok(Some(b));
    }
    Ok(registry
        .base_models_blocking()?
        .iter()
        .find(|b| {
            super::hub::source_of(&b.path).is_some_and(|s| s.repo.eq_ignore_ascii_case(wanted))
        })
        .cloned())
}

/// The shape chat will load the base model with.
fn base_config(base: &BaseModel) -> Result<crate::inference::config::ModelConfig> {
    if let Some(dir) = &base.hf_dir {
        return crate::inference::config::ModelConfig::from_hf_file(&dir.join("config.json"))
            .map_err(|e| Error::internal(format!("the base model's config.json: {e:#}")));
    }
    let gguf = base
        .gguf
        .clone()
        .ok_or_else(|| Error::internal("the base model has no weights"))?;
    let assets = crate::inference::text::ChatAssets::load(
        &base.path,
        crate::inference::WeightsSource::Gguf(gguf),
    )
    .map_err(|e| Error::internal(format!("the base model: {e:#}")))?;
    Ok(assets.config)
}

/// What an upload asks for.
pub struct AdapterUpload {
    /// The archive on disk (a temporary file the caller removes).
    pub archive: PathBuf,
    /// The archive's name as the client sent it.
    pub file_name: String,
    pub name: Option<String>,
    pub base_model: Option<String>,
    /// The upload limit: the archive may unpack to ten times this.
    pub max_bytes: u64,
}

impl Registry {
    /// Imports an uploaded adapter as one of `owner`'s models.
    pub async fn import_adapter(
        self: &Arc<Self>,
        owner: &str,
        up: AdapterUpload,
    ) -> Result<ModelRecord> {
        let name = crate::text::clean_name(up.name.as_deref().unwrap_or(&stem(&up.file_name)));
        if name.is_empty() || name.chars().count() > 100 {
            return Err(invalid("invalid", "name: 1 to 100 characters"));
        }
        let trained_dir = self
            .trained_dir()
            .ok_or_else(|| Error::internal("no trained-models folder"))?
            .join(owner);
        let this = self.clone();
        let model_id = crate::store::new_id();
        let final_dir = trained_dir.join(&model_id);
        let (fd, id) = (final_dir.clone(), model_id.clone());
        let (base, size) = tokio::task::spawn_blocking(move || -> Result<(BaseModel, u64)> {
            std::fs::create_dir_all(&trained_dir)?;
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".import-{id}-"))
                .tempdir_in(&trained_dir)?;
            unpack(&up.archive, tmp.path(), up.max_bytes)?;
            let dir = find_adapter(tmp.path())?;
            if !dir.join("adapter_model.safetensors").is_file() {
                let hint = if dir.join("adapter_model.bin").is_file() {
                    " (adapter_model.bin, the pickle format, is not accepted: save with \
                     safetensors, PEFT's default)"
                } else {
                    ""
                };
                return Err(invalid(
                    "invalid_adapter",
                    format!("the adapter has no adapter_model.safetensors{hint}"),
                ));
            }
            let cfg = crate::inference::lora::read_config(&dir).map_err(engine_error)?;
            let wanted = up
                .base_model
                .clone()
                .filter(|b| !b.trim().is_empty())
                .or(cfg.base_model.clone())
                .ok_or_else(|| {
                    invalid(
                        "invalid_adapter",
                        "the adapter does not name its base model (no base_model_name_or_path): \
                         choose the base model",
                    )
                })?;
            let base = find_base(&this, wanted.trim())?.ok_or_else(|| {
                invalid(
                    "unknown_base_model",
                    format!(
                        "the adapter's base model `{wanted}` is not a base model on this \
                         server: choose one of the base models, or ask an administrator to add it"
                    ),
                )
            })?;
            // Exactly the check chat makes when it loads the adapter over this base.
            let config = base_config(&base)?;
            crate::inference::lora::load(&dir, &config).map_err(|e| match e {
                EngineError::Invalid(m) => invalid(
                    "adapter_does_not_fit",
                    format!(
                        "the adapter does not fit the base model `{}`: {m}",
                        base.name
                    ),
                ),
                other => engine_error(other),
            })?;
            let size = dir_bytes(&dir)?;
            std::fs::rename(&dir, &fd)?;
            Ok((base, size))
        })
        .await??;
        let record = ModelRecord {
            model_id,
            owner: owner.to_string(),
            name,
            model_path: final_dir.to_string_lossy().into_owned(),
            kind: ModelKind::Adapter,
            base_model: base.name,
            task_id: None,
            size,
            created_at: OffsetDateTime::now_utc(),
            template: None,
            system: None,
        };
        if let Err(e) = self.put_trained(&record).await {
            let _ = tokio::fs::remove_dir_all(&final_dir).await;
            return Err(e);
        }
        Ok(record)
    }
}

fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_archive() {
        assert_eq!(stem("my-lora.tar.gz"), "my-lora");
        assert_eq!(stem("dir/x.TGZ"), "x");
        assert_eq!(stem("a.zip"), "a");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert!(safe_relative(Path::new("../x")).is_none());
        assert!(safe_relative(Path::new("/etc/passwd")).is_none());
        assert!(safe_relative(Path::new("a/../../x")).is_none());
        assert_eq!(
            safe_relative(Path::new("./a/b")).unwrap(),
            PathBuf::from("a/b")
        );
    }

    #[test]
    fn a_tar_with_a_link_or_an_escape_is_refused_and_a_plain_one_unpacks() {
        let d = tempfile::tempdir().unwrap();
        let make = |name: &str, entries: &[(&str, Option<&str>)]| {
            let path = d.path().join(name);
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&path).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            for (p, link) in entries {
                let mut h = tar::Header::new_gnu();
                match link {
                    Some(target) => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_size(0);
                        h.set_cksum();
                        b.append_link(&mut h, p, target).unwrap();
                    }
                    None => {
                        h.set_size(3);
                        h.set_cksum();
                        b.append_data(&mut h, p, &b"abc"[..]).unwrap();
                    }
                }
            }
            b.into_inner().unwrap().finish().unwrap();
            path
        };
        let ok = make(
            "ok.tar.gz",
            &[("a/adapter_config.json", None), ("a/x", None)],
        );
        let out = d.path().join("out");
        unpack(&ok, &out, 1000).unwrap();
        assert_eq!(std::fs::read(out.join("a/x")).unwrap(), b"abc");
        let link = make("l.tar.gz", &[("a/x", Some("/etc/passwd"))]);
        assert_eq!(
            unpack(&link, &d.path().join("o2"), 1000).unwrap_err().code,
            "invalid_archive"
        );
        // Ten times the limit at most.
        let big = make(
            "b.tar.gz",
            &[("a", None), ("b", None), ("c", None), ("d", None)],
        );
        assert!(unpack(&big, &d.path().join("o3"), 1).is_err());
        let text = d.path().join("t.txt");
        std::fs::write(&text, "hello").unwrap();
        assert_eq!(
            unpack(&text, &d.path().join("o4"), 1000).unwrap_err().code,
            "invalid_archive"
        );
    }
}
