//! Tidy checks on the source tree: every module says what it is for, and the kernel's
//! dependency boundary (it knows nothing of LLMs, devices or IO formats) holds.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_opens_with_a_doc_line() {
    let root = workspace_root();
    let mut files = Vec::new();
    for top in ["kernel", "services", "drivers", "apps", "tests", "benches"] {
        rust_files(&root.join(top), &mut files);
    }
    assert!(files.len() > 10, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|file| {
            file.strip_prefix(&root)
                .unwrap_or(file)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a `//!` header: {missing:?}"
    );
}

#[test]
fn the_kernel_depends_on_nothing_llm_device_or_io_format_specific() {
    let manifest = std::fs::read_to_string(workspace_root().join("kernel/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("kernel has dependencies")
        .split("\n[")
        .next()
        .unwrap();
    let names: Vec<&str> = deps
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .map(|n| n.split('.').next().unwrap())
        .collect();
    let allowed = [
        "ractor",
        "tokio",
        "futures",
        "tracing",
        "thiserror",
        "serde",
        "fail",
        "ctrlc",
        "rand",
        "rand_chacha",
    ];
    let unexpected: Vec<_> = names.iter().filter(|n| !allowed.contains(n)).collect();
    assert!(
        unexpected.is_empty(),
        "new kernel dependencies {unexpected:?}: an architecture change — update ARCHITECTURE.md and this list"
    );
    assert!(
        !deps.contains("llmos-"),
        "the kernel must not depend on other llmos crates"
    );
}
