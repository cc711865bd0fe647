//! Builds the web UI (`static/`, Vite + Vue) and embeds it: `npm ci` when `static/node_modules` is
//! missing or older than the lockfile, `npm run build` into `$OUT_DIR/ui`, then a generated
//! `$OUT_DIR/ui_assets.rs` that `include_bytes!`s every file (with a gzip copy of the
//! compressible ones) for `src/http/ui.rs`.
//!
//! `FERROTUNE_SKIP_UI=1` skips npm and embeds a page that says so; so does a machine without
//! npm (with a warning), so that the API still builds there, and the Python extension module
//! (feature `python`), which serves no HTTP.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The sources whose change rebuilds the UI.
const INPUTS: &[&str] = &[
    "src",
    "public",
    "index.html",
    "package.json",
    "package-lock.json",
    "vite.config.js",
];

pub fn build() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let web = manifest.join("static");
    let dist = out_dir.join("ui");
    for input in INPUTS {
        println!("cargo:rerun-if-changed=static/{input}");
    }
    println!("cargo:rerun-if-changed=build/ui.rs");
    println!("cargo:rerun-if-env-changed=FERROTUNE_SKIP_UI");
    println!("cargo:rerun-if-env-changed=NPM");

    let skip = std::env::var("FERROTUNE_SKIP_UI").is_ok_and(|v| !v.is_empty() && v != "0");
    let npm = std::env::var("NPM").unwrap_or_else(|_| "npm".into());
    let built = if skip {
        placeholder(&dist, "it was built with FERROTUNE_SKIP_UI set");
        false
    } else if std::env::var_os("CARGO_FEATURE_PYTHON").is_some() {
        // The Python extension module serves no HTTP: no npm needed for `pip install .`.
        placeholder(&dist, "it is the Python extension module");
        false
    } else if !web.join("package.json").is_file() {
        placeholder(&dist, "its sources (static/) were not found at build time");
        println!("cargo:warning=static/package.json not found: the web UI is not embedded");
        false
    } else if Command::new(&npm).arg("--version").output().is_err() {
        placeholder(
            &dist,
            "npm was not found at build time; install Node.js 20+ and rebuild",
        );
        println!(
            "cargo:warning=npm not found: the binary serves the API but not the web UI \
             (install Node.js 20+ and rebuild, or set FERROTUNE_SKIP_UI=1 to silence this)"
        );
        false
    } else {
        let _lock = lock(&web.join(".build.lock"));
        install(&npm, &web);
        vite_build(&npm, &web, &dist);
        true
    };
    let count = embed(&dist, &out_dir);
    println!("cargo:rustc-env=FERROTUNE_UI_BUILT={}", u8::from(built));
    if built && count < 2 {
        fail("the web UI build produced no assets", "");
    }
}

fn fail(what: &str, output: &str) -> ! {
    // npm prints its error first and its usage after it: keep both ends of a long output.
    let lines: Vec<&str> = output.lines().collect();
    let shown = if lines.len() > 60 {
        format!(
            "{}\n[…]\n{}",
            lines[..30].join("\n"),
            lines[lines.len() - 30..].join("\n")
        )
    } else {
        lines.join("\n")
    };
    panic!(
        "\n\nferrotune: {what}.\n{shown}\n\nThe web UI is built from static/ with npm (Node.js 20+). Fix \
         the error above, or build without the UI: FERROTUNE_SKIP_UI=1 cargo build\n"
    );
}

fn run(cmd: &mut Command, what: &str) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => fail(what, &e.to_string()),
    };
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fail(&format!("{what} failed ({})", out.status), &text);
    }
}

/// `npm ci` unless `node_modules` is at least as new as the lockfile.
fn install(npm: &str, web: &Path) {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let lockfile = mtime(&web.join("package-lock.json"));
    let installed = mtime(&web.join("node_modules/.package-lock.json"));
    let fresh = matches!((installed, lockfile), (Some(i), Some(l)) if i >= l);
    if fresh {
        return;
    }
    run(
        Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(web),
        "`npm ci` in static/ (installing the UI's packages from the npm registry)",
    );
    println!("cargo:warning=installed the web UI's npm packages into static/node_modules");
}

fn vite_build(npm: &str, web: &Path, dist: &Path) {
    run(
        Command::new(npm)
            .args(["run", "build", "--silent"])
            .env("FERROTUNE_UI_OUT", dist)
            .current_dir(web),
        "`npm run build` in static/ (building the UI with Vite)",
    );
}

/// Writes a single page explaining why there is no UI.
fn placeholder(dist: &Path, why: &str) {
    let _ = fs::remove_dir_all(dist);
    if let Err(e) = fs::create_dir_all(dist) {
        fail("cannot create the UI output folder", &e.to_string());
    }
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>ferrotune</title>\
         <body style=\"font-family:system-ui;max-width:40em;margin:4em auto;line-height:1.5\">\
         <h1>ferrotune</h1><p>This binary has no web UI: {why}.</p>\
         <p>The REST API and the OpenAI-compatible <code>/v1</code> endpoints work; see the README.</p>"
    );
    if let Err(e) = fs::write(dist.join("index.html"), page) {
        fail("cannot write the placeholder page", &e.to_string());
    }
}

/// An exclusive lock on `path` (released when the file closes), so concurrent builds of
/// several profiles do not run npm in the same folder at once.
fn lock(path: &Path) -> Option<fs::File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_EX);
        }
    }
    Some(file)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        _ => "application/octet-stream",
    }
}

fn compressible(content_type: &str) -> bool {
    content_type.starts_with("text/")
        || content_type.starts_with("application/json")
        || content_type.starts_with("application/manifest")
        || content_type == "image/svg+xml"
}

/// FNV-1a: a stable content hash for ETags.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

/// Generates `$OUT_DIR/ui_assets.rs`: a slice expression of `Asset`s. Returns the file count.
fn embed(dist: &Path, out_dir: &Path) -> usize {
    let gz_dir = out_dir.join("ui-gz");
    let _ = fs::remove_dir_all(&gz_dir);
    let mut list = Vec::new();
    files(dist, &mut list);
    list.sort();
    let mut code = String::from("&[\n");
    for path in &list {
        let Ok(rel) = path.strip_prefix(dist) else {
            continue;
        };
        let rel = rel.to_string_lossy().replace('\\', "/");
        let body = match fs::read(path) {
            Ok(b) => b,
            Err(e) => fail(&format!("cannot read {}", path.display()), &e.to_string()),
        };
        let ct = content_type(&rel);
        let mut gzip = "None".to_string();
        if compressible(ct) && body.len() > 256 {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            let compressed = enc.write_all(&body).and_then(|()| enc.finish());
            if let Some(gz) = compressed.ok().filter(|gz| gz.len() < body.len()) {
                let target = gz_dir.join(format!("{rel}.gz"));
                if let Some(parent) = target.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                if let Err(e) = fs::write(&target, gz) {
                    fail("cannot write a compressed asset", &e.to_string());
                }
                gzip = format!("Some(include_bytes!({:?}))", target.to_string_lossy());
            }
        }
        let _ = writeln!(
            code,
            "    Asset {{ path: {rel:?}, content_type: {ct:?}, etag: \"\\\"{:016x}\\\"\", \
             immutable: {}, body: include_bytes!({:?}), gzip: {gzip} }},",
            fnv1a(&body),
            rel.starts_with("assets/"),
            path.to_string_lossy(),
        );
    }
    code.push_str("]\n");
    if let Err(e) = fs::write(out_dir.join("ui_assets.rs"), code) {
        fail("cannot write ui_assets.rs", &e.to_string());
    }
    list.len()
}
