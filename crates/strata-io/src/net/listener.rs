//! The inter-node listener: accepts connections, authenticates each with the channel's
//! handshake, and hands over only authenticated ones.
//!
//! It survives floods and descriptor exhaustion:
//! - at most `INTERNODE_UNAUTHENTICATED_MAX` connections wait for their handshake at once,
//!   `INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX` of them from one address; beyond that a
//!   new connection is closed at once (it costs no task and no buffer);
//! - each handshake has its deadline (`channel::HANDSHAKE_TIMEOUT`);
//! - an `accept()` error (EMFILE, ENFILE, ENOBUFS, …) is retried after a back-off that
//!   doubles up to `ACCEPT_BACKOFF_MAX`, and never ends the listener;
//! - refusals are logged at most once a minute per source address, with the count of
//!   those not logged.

use super::channel::{respond, Channel, ChannelKey, HandshakeError};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_types::limits::{
    INTERNODE_REFUSAL_SOURCES_MAX, INTERNODE_UNAUTHENTICATED_MAX,
    INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX,
};
use tokio::net::TcpListener;

/// The first wait after a failed `accept()`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait after failed `accept()`s in a row (descriptors come free when
/// connections close; a second is soon enough to notice).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One log line per source address (or per kind of failure) at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Counts connections waiting for their handshake, in total and per source address.
#[derive(Default)]
pub struct Unauthenticated {
    waiting: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One waiting connection's slot, given back when dropped.
pub struct Slot {
    of: Arc<Unauthenticated>,
    ip: IpAddr,
}

impl Unauthenticated {
    /// Takes a slot for a connection from `ip`, unless the limits are reached.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *waiting;
        let from = per.get(&ip).copied().unwrap_or(0);
        if *total >= INTERNODE_UNAUTHENTICATED_MAX
            || from >= INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX
        {
            return None;
        }
        *total += 1;
        per.insert(ip, from + 1);
        Some(Slot { of: self.clone(), ip })
    }

    /// Connections waiting now.
    pub fn count(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut waiting = self.of.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *waiting;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// Says at most once per interval per key (a source address) what was refused, with how
/// many refusals went unsaid meanwhile.
#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<Option<IpAddr>, (Instant, u64)>>,
}

impl RefusalLog {
    /// Whether to log a refusal for `key` now; if so, how many were not logged before it.
    pub fn admit(&self, key: Option<IpAddr>, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, unsaid)) = last.get_mut(&key) {
            if now.duration_since(*at) < REFUSAL_LOG_INTERVAL {
                *unsaid += 1;
                return None;
            }
            let said = *unsaid;
            *at = now;
            *unsaid = 0;
            return Some(said);
        }
        if last.len() >= INTERNODE_REFUSAL_SOURCES_MAX {
            last.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
        }
        if last.len() >= INTERNODE_REFUSAL_SOURCES_MAX {
            // So many sources at once: they are logged under one key.
            return self.admit_aggregate(&mut last, now);
        }
        last.insert(key, (now, 0));
        Some(0)
    }

    fn admit_aggregate(
        &self,
        last: &mut HashMap<Option<IpAddr>, (Instant, u64)>,
        now: Instant,
    ) -> Option<u64> {
        let Some((at, unsaid)) = last.get_mut(&None) else {
            last.insert(None, (now, 0));
            return Some(0);
        };
        if now.duration_since(*at) < REFUSAL_LOG_INTERVAL {
            *unsaid += 1;
            return None;
        }
        let said = *unsaid;
        *at = now;
        *unsaid = 0;
        Some(said)
    }
}

/// Serves `listener` until the process ends: each connection that completes the
/// handshake with `key` is handed to `handle` (on a task of its own). Never returns.
pub async fn serve<F, Fut>(listener: TcpListener, key: ChannelKey, handle: F)
where
    F: Fn(Channel, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let waiting = Arc::new(Unauthenticated::default());
    let log = Arc::new(RefusalLog::default());
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) => {
                if let Some(unsaid) = log.admit(None, Instant::now()) {
                    tracing::warn!(
                        "inter-node listener: accept failed: {e} (retrying in {} ms; \
                         {unsaid} more not logged)",
                        backoff.as_millis()
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Some(slot) = waiting.enter(peer.ip()) else {
            drop(stream);
            if let Some(unsaid) = log.admit(Some(peer.ip()), Instant::now()) {
                tracing::warn!(
                    %peer,
                    "closing an inter-node connection at once: too many waiting for their \
                     handshake ({} from it, {} in all; {unsaid} more refusals from it not \
                     logged)",
                    INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX,
                    INTERNODE_UNAUTHENTICATED_MAX
                );
            }
            continue;
        };
        let (key, handle, log) = (key.clone(), handle.clone(), log.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let channel = respond(stream, &key).await;
            drop(slot);
            match channel {
                Ok(channel) => handle(channel, peer).await,
                // A probe that connects and closes (a port check) is no news.
                Err(HandshakeError::Io(_)) => {}
                Err(e) => {
                    if let Some(unsaid) = log.admit(Some(peer.ip()), Instant::now()) {
                        tracing::warn!(
                            %peer,
                            "refusing an inter-node connection: {e} ({unsaid} more \
                             refusals from it not logged)"
                        );
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unauthenticated_limits_hold_per_source_and_in_all() {
        let waiting = Arc::new(Unauthenticated::default());
        let one = IpAddr::from([10, 0, 0, 1]);
        let slots: Vec<Slot> = (0..INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX)
            .map(|_| waiting.enter(one).expect("under the limit"))
            .collect();
        assert!(waiting.enter(one).is_none(), "one source's limit");
        assert!(waiting.enter(IpAddr::from([10, 0, 0, 2])).is_some(), "another source");
        drop(slots);
        assert_eq!(waiting.count(), 0);
        let mut all = Vec::new();
        for i in 0..INTERNODE_UNAUTHENTICATED_MAX {
            let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            all.push(waiting.enter(ip).expect("under the limit"));
        }
        assert!(waiting.enter(IpAddr::from([10, 2, 0, 1])).is_none(), "the limit in all");
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_source_with_the_count_unsaid() {
        let log = RefusalLog::default();
        let t = Instant::now();
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        assert_eq!(log.admit(ip, t), Some(0));
        assert_eq!(log.admit(ip, t + Duration::from_secs(1)), None);
        assert_eq!(log.admit(ip, t + Duration::from_secs(2)), None);
        assert_eq!(log.admit(Some(IpAddr::from([10, 0, 0, 2])), t), Some(0));
        assert_eq!(log.admit(ip, t + Duration::from_secs(61)), Some(2));
    }
}
