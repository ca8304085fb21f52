//! The arrows stay honest: the sans-io protocol modules use no runtime, TLS,
//! HTTP, metrics or config crate. (The `--no-default-features` build, which
//! the fuzz crate uses, would also fail to compile if they did.) And the
//! layers above point down only.
#![allow(clippy::expect_used)] // tests may panic

use std::path::Path;

#[test]
fn protocol_modules_import_no_io_crates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let forbidden = [
        "tokio::",
        "rustls::",
        "reqwest::",
        "prometheus::",
        "figment::",
        " oauth2::",
        "crate::server",
        "crate::oauth",
        "crate::config",
        "crate::tls",
        "crate::app",
    ];
    let mut checked = 0;
    for dir in ["proto", "imap", "pop3", "smtp"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("module dir") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("source");
            for word in forbidden {
                assert!(
                    !text
                        .lines()
                        .any(|l| !l.trim_start().starts_with("//") && l.contains(word)),
                    "{} mentions {word}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 12,
        "expected the protocol sources, found {checked}"
    );
}

/// Every source file under `src/` with the top-level module it belongs to.
fn sources() -> Vec<(String, std::path::PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&root).expect("under src");
            let first = relative
                .components()
                .next()
                .expect("a component")
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            (first, path)
        })
        .collect()
}

/// The code of a file, without comment lines.
fn code_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("source")
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("//")
        })
        .map(str::to_owned)
        .collect()
}

/// The layers, bottom first. A module may use the ones below its own
/// layer, never its own layer's siblings or anything above.
const LAYERS: &[&[&str]] = &[
    &["secret"],
    &["proto"],
    &["imap", "pop3", "smtp"],
    &["protocol"],
    &["config"],
    &["tls", "metrics", "account"],
    &["oauth"],
    &["services"],
    &["server"],
    &["admin"],
    &["app"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `config` names nothing above it (no `oauth`, `server`, `admin`, ...),
/// and no module names one of a higher layer or a sibling of its own.
#[test]
fn layers_point_down() {
    let mut checked = 0;
    for (module, path) in sources() {
        // The crate root and the binary are the edge: they see everything.
        let Some(own) = layer(&module) else { continue };
        for line in code_lines(&path) {
            for (i, _) in line.match_indices("crate::") {
                let used: String = line[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used == module {
                    continue;
                }
                let Some(theirs) = layer(&used) else { continue };
                assert!(
                    theirs < own,
                    "{} ({module}) uses crate::{used}, which is not below it: {line}",
                    path.display()
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 40, "expected the whole tree, checked {checked}");
    // The rule this test exists for, spelled out.
    for (module, path) in sources().into_iter().filter(|(m, _)| m == "config") {
        for word in [
            "crate::oauth",
            "crate::server",
            "crate::admin",
            "crate::services",
        ] {
            assert!(
                !code_lines(&path).iter().any(|l| l.contains(word)),
                "{} ({module}) uses {word}",
                path.display()
            );
        }
    }
}

/// Outside the protocol folders and the registry, nothing names a
/// protocol: the upper layers go through `protocol::Protocol` and its
/// descriptor.
#[test]
fn only_the_protocol_modules_and_the_registry_name_a_protocol() {
    let allowed = ["proto", "imap", "pop3", "smtp", "protocol", "lib"];
    let mut checked = 0;
    for (module, path) in sources() {
        if allowed.contains(&module.as_str()) {
            continue;
        }
        for line in code_lines(&path) {
            let lower = line.to_ascii_lowercase();
            for word in [
                "imap::",
                "pop3::",
                "smtp::",
                "protocol::imap",
                "protocol::pop3",
                "protocol::smtp",
            ] {
                assert!(
                    !lower.contains(word),
                    "{} names a protocol ({word}): {line}",
                    path.display()
                );
            }
            assert!(
                !["\"imap\"", "\"pop3\"", "\"smtp\""]
                    .iter()
                    .any(|l| line.contains(l)),
                "{} names a protocol by its label: {line}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 30, "expected the upper layers, checked {checked}");
}
