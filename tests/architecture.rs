//! The arrows stay honest: the sans-io protocol modules use no runtime, TLS,
//! HTTP, metrics or config crate. (The `--no-default-features` build, which
//! the fuzz crate uses, would also fail to compile if they did.)

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
    for dir in ["proto", "imap", "pop3"] {
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
        checked >= 6,
        "expected the protocol sources, found {checked}"
    );
}
