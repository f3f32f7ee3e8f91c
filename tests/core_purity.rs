//! `src/core/` is pure: no clock reads, files, sockets, processes, threads, tokio or
//! SQLite, and none of the crate's I/O modules. This reads the source (the lint the
//! Supervisor's contract asks for): a forbidden name anywhere in `src/core/` fails here,
//! naming the file and line.

use std::path::Path;

/// Names that mean I/O or a clock read.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "rusqlite",
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::io",
    "std::env",
    "Instant::now",
    "SystemTime::now",
    "File::",
    "libc::",
];

/// Crate modules `src/core/` may use: data and pure functions only.
const ALLOWED_CRATE_MODULES: &[&str] = &[
    "core",
    "storage::audit",
    "storage::events",
    "storage::states",
    "text",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn src_core_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    // The stored names are used by the Supervisor as they are: they are held to the same rule.
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/storage/states.rs"));
    assert!(
        files.len() >= 2,
        "src/core/ should hold the Supervisor: {files:?}"
    );
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests at the end of a file (`#[cfg(test)]`) may build instants to test with.
        let shipped = text.split("#[cfg(test)]").next().unwrap_or("");
        for (number, line) in shipped.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for name in FORBIDDEN {
                if code.contains(name) {
                    problems.push(format!(
                        "{}:{}: uses {name}: {}",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let module: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let allowed = ALLOWED_CRATE_MODULES.iter().any(|allowed| {
                    module == *allowed || module.starts_with(&format!("{allowed}::"))
                });
                if !allowed {
                    problems.push(format!(
                        "{}:{}: uses crate::{module}, which is not pure: {}",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "src/core/ must stay pure:\n{}",
        problems.join("\n")
    );
}
