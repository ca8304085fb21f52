//! The `mailgate` binary as an admin runs it: `authorize` with a browser
//! (played by `tests/harness/authorize.py`), on a config file.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{config_toml, Account, Options};

/// A config file for the `mailgate` binary, in `dir`.
pub fn config_file(dir: &Path, accounts: &[Account], options: &Options) -> PathBuf {
    let path = dir.join("mailgate.toml");
    std::fs::write(&path, config_toml(dir, accounts, options)).unwrap();
    path
}

pub fn mailgate(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailgate"));
    cmd.arg("--config")
        .arg(config)
        .env_remove("MAILGATE_CONFIG")
        .env_remove("MAILGATE_TOKEN_KEY");
    cmd
}

/// An account that has never been authorized.
pub fn unauthorized(name: &'static str, mailbox: &str) -> Account {
    Account {
        refresh_token: None,
        ..Account::authorized_without_grant(name, mailbox)
    }
}

/// Starts `mailgate authorize ...` (off the async threads), returns the
/// child and the URL it printed.
pub async fn start_authorize(
    config: &Path,
    account: &'static str,
    args: &'static [&'static str],
) -> (Child, String) {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || start_authorize_blocking(&config, account, args))
        .await
        .unwrap()
}

pub fn start_authorize_blocking(config: &Path, account: &str, args: &[&str]) -> (Child, String) {
    let mut child = mailgate(config)
        .arg("authorize")
        .arg(account)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    stdout.read_line(&mut url).unwrap();
    // Keep reading stdout in the background so the child never blocks.
    std::thread::spawn(move || {
        let mut rest = String::new();
        while stdout.read_line(&mut rest).unwrap_or(0) > 0 {}
    });
    (child, url.trim().to_owned())
}

/// Plays the admin's browser: follows the authorization URL to the
/// redirect URL, which it returns without opening it.
pub async fn browser(url: String, user: &'static str) -> String {
    tokio::task::spawn_blocking(move || browser_blocking(&url, user))
        .await
        .unwrap()
}

pub fn browser_blocking(url: &str, user: &str) -> String {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/authorize.py"))
        .arg(format!("--url={url}"))
        .arg(format!("--user={user}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "authorize.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Waits for the child (off the async threads): did it succeed, and its
/// stderr.
pub async fn wait(child: Child) -> (bool, String) {
    tokio::task::spawn_blocking(move || wait_blocking(child))
        .await
        .unwrap()
}

pub fn wait_blocking(mut child: Child) -> (bool, String) {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}
