//! Who may try to log in, and how soon: a cap on connections per client
//! address that have not logged in, and a failed-login back-off per
//! username and per address. Memory is bounded: strikes expire, and the
//! tables are cut when they grow past a cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures older than this are forgotten.
const STRIKE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// More entries than this and the tables are pruned (then cleared).
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy)]
struct Strike {
    failures: u32,
    last: Instant,
}

#[derive(Default)]
struct Tables {
    pre_login: HashMap<IpAddr, usize>,
    /// Connections waiting for a pre-login slot, per address: at most as
    /// many as the cap, so that one address can't hold the gateway's
    /// connection permits with waiters.
    waiting: HashMap<IpAddr, usize>,
    users: HashMap<String, Strike>,
    addresses: HashMap<IpAddr, Strike>,
}

/// The gateway's admission control.
pub struct Admission {
    tables: Mutex<Tables>,
    max_pre_login: usize,
    base_delay: Duration,
    max_delay: Duration,
    /// Addresses that neither the per-address cap nor the per-address
    /// back-off apply to (a NAT, a poller host); the per-username back-off
    /// still does.
    trusted: Vec<ipnet::IpNet>,
    /// Woken when a slot frees, for connections waiting for one.
    freed: tokio::sync::Notify,
}

/// A connection that has not logged in yet; frees its slot when dropped.
pub struct PreLogin {
    admission: Arc<Admission>,
    /// `None` for a trusted address: it took no slot.
    address: Option<IpAddr>,
}

impl Drop for PreLogin {
    fn drop(&mut self) {
        let Some(address) = self.address else {
            return;
        };
        {
            let mut tables = self.admission.lock();
            if let Some(n) = tables.pre_login.get_mut(&address) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    tables.pre_login.remove(&address);
                }
            }
        }
        self.admission.freed.notify_waiters();
    }
}

/// A connection counted among its address's waiters while it waits.
struct Waiting<'a> {
    admission: &'a Admission,
    address: IpAddr,
}

impl<'a> Waiting<'a> {
    /// `None` when the address has as many waiters as slots already.
    fn join(admission: &'a Admission, address: IpAddr) -> Option<Self> {
        let mut tables = admission.lock();
        let n = tables.waiting.entry(address).or_insert(0);
        if *n >= admission.max_pre_login {
            return None;
        }
        *n += 1;
        Some(Self { admission, address })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut tables = self.admission.lock();
        if let Some(n) = tables.waiting.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                tables.waiting.remove(&self.address);
            }
        }
    }
}

impl Admission {
    pub fn new(max_pre_login: usize, base_delay: Duration, max_delay: Duration) -> Self {
        Self {
            tables: Mutex::default(),
            max_pre_login,
            base_delay,
            max_delay: max_delay.max(base_delay),
            trusted: Vec::new(),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// The same, exempting `trusted` from the per-address rules.
    pub fn trusting(mut self, trusted: Vec<ipnet::IpNet>) -> Self {
        self.trusted = trusted;
        self
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&address))
    }

    /// A pre-login slot for `address`, waiting up to `wait` for one to
    /// free at the cap (a burst from one host gets served, in turn);
    /// `None` if none did.
    pub async fn enter_within(
        self: &Arc<Self>,
        address: IpAddr,
        wait: Duration,
    ) -> Option<PreLogin> {
        if let Some(slot) = self.enter(address) {
            return Some(slot);
        }
        if wait.is_zero() {
            return None;
        }
        let _waiting = Waiting::join(self, address)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so that a slot freed between
            // the check and the wait still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.enter(address) {
                return Some(slot);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.enter(address);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        match self.tables.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A pre-login slot for `address`, or `None` at the cap.
    pub fn enter(self: &Arc<Self>, address: IpAddr) -> Option<PreLogin> {
        if self.is_trusted(address) {
            return Some(PreLogin {
                admission: self.clone(),
                address: None,
            });
        }
        let mut tables = self.lock();
        let n = tables.pre_login.entry(address).or_insert(0);
        if *n >= self.max_pre_login {
            return None;
        }
        *n += 1;
        Some(PreLogin {
            admission: self.clone(),
            address: Some(address),
        })
    }

    /// Records a failed login and returns how long to wait before saying
    /// so: the base delay, doubled for each recent failure of this username
    /// or from this address, up to the cap.
    pub fn failure(&self, username: &str, address: IpAddr) -> Duration {
        let now = Instant::now();
        let mut tables = self.lock();
        prune(&mut tables, now);
        let bump = |strike: Option<&Strike>| -> Strike {
            match strike {
                Some(s) if now.duration_since(s.last) < STRIKE_WINDOW => Strike {
                    failures: s.failures.saturating_add(1),
                    last: now,
                },
                _ => Strike {
                    failures: 1,
                    last: now,
                },
            }
        };
        let user = bump(tables.users.get(username));
        tables.users.insert(username.to_owned(), user);
        let address_failures = if self.is_trusted(address) {
            0
        } else {
            let addr = bump(tables.addresses.get(&address));
            tables.addresses.insert(address, addr);
            addr.failures
        };
        let doublings = user
            .failures
            .max(address_failures)
            .saturating_sub(1)
            .min(16);
        self.base_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }

    /// A successful login clears the username's failures.
    pub fn success(&self, username: &str) {
        self.lock().users.remove(username);
    }
}

fn prune(tables: &mut Tables, now: Instant) {
    if tables.users.len() + tables.addresses.len() <= MAX_ENTRIES {
        return;
    }
    tables
        .users
        .retain(|_, s| now.duration_since(s.last) < STRIKE_WINDOW);
    tables
        .addresses
        .retain(|_, s| now.duration_since(s.last) < STRIKE_WINDOW);
    if tables.users.len() + tables.addresses.len() > MAX_ENTRIES {
        // A flood of fresh names: forget them rather than grow.
        tables.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_login_slots_are_capped_per_address_and_freed_on_drop() {
        let a = Arc::new(Admission::new(
            2,
            Duration::from_millis(10),
            Duration::from_secs(1),
        ));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let one = a.enter(ip).unwrap();
        let _two = a.enter(ip).unwrap();
        assert!(a.enter(ip).is_none());
        assert!(
            a.enter(other).is_some(),
            "another address has its own slots"
        );
        drop(one);
        assert!(a.enter(ip).is_some());
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_waits_for_a_slot_a_bounded_time() {
        let a = Arc::new(Admission::new(
            1,
            Duration::from_millis(10),
            Duration::from_secs(1),
        ));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held = a.enter(ip).unwrap();
        // Nothing frees: refused after the wait.
        let started = std::time::Instant::now();
        assert!(a
            .enter_within(ip, Duration::from_millis(100))
            .await
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
        // A slot frees during the wait: the waiter gets it.
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.enter_within(ip, Duration::from_secs(5)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        // Waiters are capped per address too: with the slot and one waiter
        // taken, another connection is refused at once.
        let _slot = a.enter(ip).unwrap();
        let first = tokio::spawn({
            let a = a.clone();
            async move { a.enter_within(ip, Duration::from_secs(5)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert!(a.enter_within(ip, Duration::from_secs(5)).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
        first.abort();
    }

    #[test]
    fn trusted_addresses_skip_the_cap_and_the_address_back_off_not_the_username_s() {
        let a = Arc::new(
            Admission::new(1, Duration::from_millis(100), Duration::from_secs(10))
                .trusting(vec!["10.0.0.0/8".parse().unwrap()]),
        );
        let nat: IpAddr = "10.1.2.3".parse().unwrap();
        let slots: Vec<_> = (0..50).map(|_| a.enter(nat).unwrap()).collect();
        assert_eq!(slots.len(), 50);
        // Different usernames from the trusted address: no shared back-off.
        for i in 0..10 {
            assert_eq!(a.failure(&format!("user{i}"), nat).as_millis(), 100);
        }
        // One username guessed at: its own back-off still grows.
        let delays: Vec<u128> = (0..3).map(|_| a.failure("jira", nat).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400]);
    }

    #[test]
    fn failures_double_the_delay_per_username_and_address_up_to_the_cap() {
        let a = Admission::new(8, Duration::from_millis(100), Duration::from_millis(500));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let delays: Vec<u128> = (0..5).map(|_| a.failure("jira", ip).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        // Another username from the same address is slowed by the address.
        assert_eq!(a.failure("other", ip).as_millis(), 500);
        // The same username from another address is slowed by the username.
        assert_eq!(
            a.failure("jira", "10.0.0.1".parse().unwrap()).as_millis(),
            500
        );
        a.success("jira");
        assert_eq!(
            a.failure("jira", "10.0.0.2".parse().unwrap()).as_millis(),
            100
        );
    }
}
