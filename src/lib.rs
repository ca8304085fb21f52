//! mailgate: a TLS IMAP and POP3 gateway. Legacy clients log in with local
//! passwords; mailgate logs in upstream with OAuth 2.0 (SASL XOAUTH2) and then
//! relays bytes unchanged.
//!
//! Module map, arrows pointing down only (ARCHITECTURE.md has the whole
//! map, and `tests/architecture.rs` checks it):
//! - [`proto`], [`imap`], [`pop3`], [`smtp`], [`protocol`], [`secret`]: sans-io
//!   protocol code (no tokio, rustls or reqwest), built even without the
//!   `server` feature so that the fuzz targets compile only these. Each
//!   protocol is a descriptor; [`protocol`] is the one registry of them.
//! - `config`: the file and environment, validated into typed values.
//! - `tls`: rustls configurations, built once; self-signed certificates.
//! - `oauth`: token grants, the single-flight token cache, the token
//!   status, the authorization-code flow, the token store interface.
//! - `account`: local password verification.
//! - `metrics`: the Prometheus metrics, closed label sets.
//! - `services`: the reloadable set: config, accounts, tokens, connectors.
//! - `server`: listeners, the connection pipeline, upstream login, relay.
//! - `admin`: the HTTP listener: the integrations page, the OAuth redirect
//!   URL, metrics and health.
//! - `app`: wiring from a validated `Config` to running listeners.

pub mod imap;
pub mod pop3;
pub mod proto;
pub mod protocol;
pub mod secret;
pub mod smtp;

#[cfg(feature = "server")]
pub mod account;
#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod oauth;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod services;
#[cfg(feature = "server")]
pub mod tls;
