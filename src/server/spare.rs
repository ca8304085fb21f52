//! Spare upstream connections. After a login takes an upstream connection,
//! one spare to the same server is dialled in the background (TCP, and TLS
//! for implicit-TLS upstreams), so that the next login to that server skips
//! the connect and the handshake: about 1.3 ms on loopback, a round trip
//! or three to a provider. Pollers log in in bursts and on schedules, so the
//! next login is usually soon.
//!
//! Bounds: at most one spare per upstream server, and one dial in flight;
//! a spare is dropped unused after `limits.upstream_spare_for`, so an idle
//! gateway holds none. Only a login that got past the local password and
//! the token makes a spare: unauthenticated clients cause no upstream
//! connection. A spare the upstream has closed in the meantime shows up
//! as an I/O error before its greeting; the caller then dials afresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::upstream::{self, Connected};
use crate::config::UpstreamServer;

/// The gateway's spares; a reload clears them (`Gateway::forget_spares`).
pub struct Spares {
    keep_for: Duration,
    /// TCP keepalive of the spares' sockets (`limits.tcp_keepalive`).
    keepalive: Option<Duration>,
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Default)]
struct Slot {
    spare: Option<(Instant, Connected)>,
    dialling: bool,
    /// Bumped per spare, so that an expiry timer removes only its own.
    generation: u64,
}

fn key(server: &UpstreamServer) -> String {
    server.id()
}

impl Spares {
    /// Spares kept for `keep_for`; zero turns them off.
    pub fn new(keep_for: Duration, keepalive: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            keep_for,
            keepalive,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every spare (dials in flight still land, and expire).
    pub fn clear(&self) {
        for slot in self.slots().values_mut() {
            slot.spare = None;
        }
    }

    /// A fresh spare to `server`, if there is one.
    pub fn take(&self, server: &UpstreamServer) -> Option<Connected> {
        let mut slots = self.slots();
        let (made, connected) = slots.get_mut(&key(server))?.spare.take()?;
        (made.elapsed() < self.keep_for).then_some(connected)
    }

    /// Dials a spare to `server` in the background, unless one is there or
    /// on its way.
    pub fn refill(self: &Arc<Self>, server: &UpstreamServer, connector: &TlsConnector) {
        if self.keep_for.is_zero() {
            return;
        }
        let key = key(server);
        {
            let mut slots = self.slots();
            let slot = slots.entry(key.clone()).or_default();
            if slot.dialling || slot.spare.is_some() {
                return;
            }
            slot.dialling = true;
        }
        let (spares, server, connector) = (self.clone(), server.clone(), connector.clone());
        tokio::spawn(async move {
            let dialled = tokio::time::timeout(
                spares.keep_for,
                upstream::connect(&server, &connector, spares.keepalive),
            )
            .await;
            let generation = {
                let mut slots = spares.slots();
                let slot = slots.entry(key.clone()).or_default();
                slot.dialling = false;
                match dialled {
                    Ok(Ok(connected)) => {
                        slot.generation += 1;
                        slot.spare = Some((Instant::now(), connected));
                        slot.generation
                    }
                    Ok(Err(e)) => {
                        return debug!(upstream = %key, error = %e, "spare connection failed")
                    }
                    Err(_) => return debug!(upstream = %key, "spare connection timed out"),
                }
            };
            // Unused after `keep_for`: close it.
            tokio::time::sleep(spares.keep_for).await;
            let mut slots = spares.slots();
            if let Some(slot) = slots.get_mut(&key) {
                if slot.generation == generation {
                    slot.spare = None;
                }
            }
        });
    }
}
