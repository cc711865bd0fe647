//! Pins the Python the worker embeds: an rpath to the libpython that pyo3 configured against
//! (otherwise the loader may pick another 3.11 from the system path), and the interpreter's
//! path and version, so the managed environment is created with the very same Python.
//! Also builds the web UI and embeds it (build/ui.rs).

#[path = "build/ui.rs"]
mod ui;

fn main() {
    let config = pyo3_build_config::get();
    if let Some(lib_dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    let executable = config
        .executable()
        .map(|s| s.to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=FERROTUNE_BUILD_PYTHON={executable}");
    println!(
        "cargo:rustc-env=FERROTUNE_BUILD_PYTHON_VERSION={}.{}",
        config.version().major,
        config.version().minor
    );
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-changed=build.rs");
    ui::build();
}
