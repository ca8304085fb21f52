//! Prometheus metrics: one struct, closed label sets. Account and
//! integration labels come from the config, so their number is bounded.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::proto::LoginFailure;

/// Every metric mailgate exports.
pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub logins: IntCounterVec,
    pub upstream_connect_seconds: HistogramVec,
    pub upstream_login_seconds: HistogramVec,
    pub token_requests: IntCounterVec,
    pub token_expiry_seconds: IntGaugeVec,
    pub needs_authorization: IntGaugeVec,
    pub relayed_bytes: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub password_checks: IntCounterVec,
    pub upstream_spares: IntCounterVec,
    pub client_secret_expiry_seconds: IntGaugeVec,
    pub connections_closed: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub lease_takeovers: IntCounterVec,
    pub stale_saves: IntCounterVec,
    pub listener_certificate_expiry_seconds: prometheus::IntGauge,
    /// The listener certificate's expiry (Unix seconds; 0: not known yet),
    /// turned into seconds left at each scrape.
    certificate_not_after: std::sync::atomic::AtomicU64,
}

/// How a login ended: the `outcome` label of `mailgate_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    BadCredentials,
    Unavailable,
    NeedsAuthorization,
    InUse,
    SessionLimit,
}

impl LoginOutcome {
    pub const ALL: [Self; 6] = [
        Self::Ok,
        Self::BadCredentials,
        Self::Unavailable,
        Self::NeedsAuthorization,
        Self::InUse,
        Self::SessionLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::BadCredentials => "bad_credentials",
            Self::Unavailable => "unavailable",
            Self::NeedsAuthorization => "needs_authorization",
            Self::InUse => "in_use",
            Self::SessionLimit => "session_limit",
        }
    }
}

impl From<LoginFailure> for LoginOutcome {
    fn from(f: LoginFailure) -> Self {
        match f {
            LoginFailure::BadCredentials => Self::BadCredentials,
            LoginFailure::Unavailable => Self::Unavailable,
            LoginFailure::NotAuthorizedYet | LoginFailure::NeedsAuthorization => {
                Self::NeedsAuthorization
            }
            LoginFailure::InUse => Self::InUse,
            LoginFailure::SessionLimit => Self::SessionLimit,
        }
    }
}

/// Buckets for upstream latencies: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `outcome` label of `mailgate_token_requests_total`.
pub const TOKEN_OUTCOMES: [&str; 3] = ["ok", "transient", "needs_authorization"];

impl Metrics {
    /// Creates every series that a rule or a dashboard compares, at 0,
    /// for each protocol served and each integration's grant: a series
    /// that was never incremented doesn't exist, and a rule such as
    /// "failures, and no success" would then hold for nothing.
    pub fn export_zeroes<'a>(
        &self,
        protocols: impl IntoIterator<Item = &'a str>,
        grants: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        for protocol in protocols {
            for outcome in LoginOutcome::ALL {
                self.logins.with_label_values(&[protocol, outcome.label()]);
            }
        }
        for (integration, grant) in grants {
            for outcome in TOKEN_OUTCOMES {
                self.token_requests
                    .with_label_values(&[integration, grant, outcome]);
            }
        }
    }

    /// Counts a completed TLS handshake on `side` (`client`, `upstream`).
    pub fn count_handshake(&self, side: &str, kind: Option<rustls::HandshakeKind>) {
        let kind = match kind {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => "full_hello_retry",
            Some(rustls::HandshakeKind::Full) | None => "full",
        };
        self.tls_handshakes.with_label_values(&[side, kind]).inc();
    }

    /// Registers every metric, plus the process collector.
    ///
    /// # Errors
    /// Only on a programming error (a duplicate name).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let m = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(m.clone()))?;
                Ok(m)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(m.clone()))?;
                Ok(m)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let m = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(m.clone()))?;
                Ok(m)
            };
        let metrics = Self {
            connections_accepted: counter(
                "mailgate_connections_accepted_total",
                "Client connections accepted.",
                &["protocol", "listener"],
            )?,
            connections_active: gauge(
                "mailgate_connections_active",
                "Client connections open now.",
                &["protocol", "listener"],
            )?,
            logins: counter(
                "mailgate_logins_total",
                "Client logins by outcome.",
                &["protocol", "outcome"],
            )?,
            upstream_connect_seconds: histogram(
                "mailgate_upstream_connect_seconds",
                "Time to connect to the upstream, TLS included.",
                &["protocol"],
            )?,
            upstream_login_seconds: histogram(
                "mailgate_upstream_login_seconds",
                "Time for the XOAUTH2 login at the upstream, after connecting.",
                &["protocol"],
            )?,
            token_requests: counter(
                "mailgate_token_requests_total",
                "Token endpoint requests by outcome.",
                &["integration", "grant", "outcome"],
            )?,
            token_expiry_seconds: gauge(
                "mailgate_token_expiry_seconds",
                "Seconds until the account's access token expires (negative: expired).",
                &["account"],
            )?,
            needs_authorization: gauge(
                "mailgate_account_needs_authorization",
                "1 when the account must be authorized again (mailgate authorize ACCOUNT).",
                &["account"],
            )?,
            relayed_bytes: counter(
                "mailgate_relayed_bytes_total",
                "Bytes relayed after login.",
                &["direction"],
            )?,
            tls_handshake_failures: counter(
                "mailgate_tls_handshake_failures_total",
                "Client TLS handshakes that failed or timed out.",
                &["protocol"],
            )?,
            tls_handshakes: counter(
                "mailgate_tls_handshakes_total",
                "Completed TLS handshakes, full or resumed: with clients, and of upstream connections, counted when the login over them succeeds.",
                &["side", "kind"],
            )?,
            password_checks: counter(
                "mailgate_password_checks_total",
                "Local password hash checks (argon2) by outcome; logins with credentials that verified before skip them.",
                &["outcome"],
            )?,
            upstream_spares: counter(
                "mailgate_upstream_spares_total",
                "Spare upstream connections taken by a login: used, or stale (closed by the upstream; dialled afresh).",
                &["outcome"],
            )?,
            client_secret_expiry_seconds: gauge(
                "mailgate_client_secret_expiry_seconds",
                "Seconds until the integration's client secret expires, when configured.",
                &["integration"],
            )?,
            connections_closed: counter(
                "mailgate_connections_closed_total",
                "Client connections closed, by how they ended (error_kind \"none\": normally) and whose fault that was.",
                &["protocol", "error_kind", "blame"],
            )?,
            store_errors: counter(
                "mailgate_store_errors_total",
                "Token store operations that failed (the database unreachable, a statement refused).",
                &["backend", "operation"],
            )?,
            lease_takeovers: counter(
                "mailgate_store_lease_takeovers_total",
                "Refresh leases taken over after their holder let them expire unreleased (it died or stalled).",
                &["account"],
            )?,
            stale_saves: counter(
                "mailgate_store_stale_saves_total",
                "Saves of token records refused and dropped: another writer saved a newer version, or the refresh lease was lost.",
                &["account", "reason"],
            )?,
            listener_certificate_expiry_seconds: {
                let g = prometheus::IntGauge::new(
                    "mailgate_listener_certificate_expiry_seconds",
                    "Seconds until the listeners' certificate expires (negative: expired).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            certificate_not_after: std::sync::atomic::AtomicU64::new(0),
            registry,
        };
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// The name of every metric mailgate registers, whether or not it has
    /// a series yet (a labelled metric shows in the exposition only once
    /// it has one).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            &self.connections_accepted as &dyn prometheus::core::Collector,
            &self.connections_active,
            &self.logins,
            &self.upstream_connect_seconds,
            &self.upstream_login_seconds,
            &self.token_requests,
            &self.token_expiry_seconds,
            &self.needs_authorization,
            &self.relayed_bytes,
            &self.tls_handshake_failures,
            &self.tls_handshakes,
            &self.password_checks,
            &self.upstream_spares,
            &self.client_secret_expiry_seconds,
            &self.connections_closed,
            &self.store_errors,
            &self.lease_takeovers,
            &self.stale_saves,
            &self.listener_certificate_expiry_seconds,
        ]
        .iter()
        .flat_map(|c| c.desc())
        .map(|d| d.fq_name.clone())
        .collect();
        names.sort();
        names
    }

    /// Records when the listener certificate expires (Unix seconds).
    pub fn set_certificate_expiry(&self, not_after: u64) {
        self.certificate_not_after
            .store(not_after, std::sync::atomic::Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let not_after = self
            .certificate_not_after
            .load(std::sync::atomic::Ordering::Relaxed);
        if not_after > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let left = i64::try_from(not_after).unwrap_or(i64::MAX)
                - i64::try_from(now).unwrap_or(i64::MAX);
            self.listener_certificate_expiry_seconds.set(left);
        }
        let mut out = Vec::new();
        // Encoding into a Vec can't fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
