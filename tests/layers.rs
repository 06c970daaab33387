//! The crate's layers import downward only (ARCHITECTURE.md, "Layers"): each top-level
//! module may name (`crate::x`) only modules listed before it in [`LAYERS`]. A new module
//! joins the list where it belongs; an upward import fails here with the file that has it.

use std::path::Path;

/// Bottom first. A module may depend on any module before it, never on one after it.
const LAYERS: &[&str] = &[
    "ids",
    "partition",
    "metrics",
    "model",
    "limit",
    "persist",
    "shard",
    "sim",
    "cluster",
    "net",
    "follow",
    "config",
    "single_writer",
    "server",
];

/// Every `.rs` file under `path` (or `path` itself).
fn sources(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read_dir") {
            sources(&e.expect("entry").path(), out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn modules_import_only_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut listed = Vec::new();
    for e in std::fs::read_dir(&src).expect("src") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        let module = name.strip_suffix(".rs").unwrap_or(&name).to_string();
        if !["lib", "main"].contains(&module.as_str()) {
            listed.push(module);
        }
    }
    for module in &listed {
        assert!(
            LAYERS.contains(&module.as_str()),
            "src/{module} is in no layer: add it to LAYERS"
        );
    }
    let mut upward = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        let dir = src.join(module);
        let path = if dir.is_dir() {
            dir
        } else {
            src.join(format!("{module}.rs"))
        };
        let mut files = Vec::new();
        sources(&path, &mut files);
        assert!(!files.is_empty(), "no source for layer {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("source");
            assert!(
                !text.contains("crate::{"),
                "{}: name modules one by one",
                file.display()
            );
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                match LAYERS.iter().position(|l| *l == used) {
                    Some(r) if r > rank => upward.push(format!("{}: crate::{used}", file.display())),
                    _ => {}
                }
            }
        }
    }
    assert!(upward.is_empty(), "imports from a higher layer:\n{}", upward.join("\n"));
}
