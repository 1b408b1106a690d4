//! The epoch fence of a node's components: each component remembers the newest owner
//! epoch it has seen and refuses anything stamped with an older one. This is what makes a
//! deposed owner's late writes apply nowhere once the new owner has reached a component.
//!
//! Invariants:
//! 1. A component's fence only rises.
//! 2. A request is admitted only if its epoch is at least the fence; admitting a newer
//!    epoch raises the fence, and the caller must make the raise durable (`Admit::Raised`)
//!    before it applies the request — so after a crash the fence is never lower than an
//!    epoch whose request was applied.
//! 3. The persistent form is a snapshot of every fence: loading it restores them all.

use std::collections::BTreeMap;

/// The fences of a node's components, by component id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fences {
    newest: BTreeMap<u64, u64>,
}

/// What admitting a request at an epoch decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// At the fence: go ahead.
    Current,
    /// Newer than the fence, which now is this epoch: persist the fences, then go ahead.
    Raised,
}

/// The request's epoch is older than the component's fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("epoch {sent} is older than epoch {newest}, which this component has seen")]
pub struct StaleEpoch {
    /// The request's.
    pub sent: u64,
    /// The component's fence.
    pub newest: u64,
}

impl Fences {
    /// The fence of `component` (0 if it never saw a request).
    pub fn newest(&self, component: u64) -> u64 {
        self.newest.get(&component).copied().unwrap_or(0)
    }

    /// Admits a request of `component` at `epoch`, or refuses it.
    pub fn admit(&mut self, component: u64, epoch: u64) -> Result<Admit, StaleEpoch> {
        let fence = self.newest.entry(component).or_insert(0);
        match epoch.cmp(fence) {
            std::cmp::Ordering::Less => Err(StaleEpoch { sent: epoch, newest: *fence }),
            std::cmp::Ordering::Equal => Ok(Admit::Current),
            std::cmp::Ordering::Greater => {
                *fence = epoch;
                Ok(Admit::Raised)
            }
        }
    }

    /// Forgets a removed component.
    pub fn remove(&mut self, component: u64) {
        self.newest.remove(&component);
    }

    /// The persistent form: `component epoch` lines.
    pub fn encode(&self) -> String {
        self.newest.iter().map(|(c, e)| format!("{c} {e}\n")).collect()
    }

    /// Reads the persistent form back; a malformed line is an error naming it.
    pub fn decode(text: &str) -> Result<Fences, String> {
        let mut newest = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let mut parts = line.split_whitespace();
            let parsed = (|| {
                let c: u64 = parts.next()?.parse().ok()?;
                let e: u64 = parts.next()?.parse().ok()?;
                parts.next().is_none().then_some((c, e))
            })();
            let (c, e) = parsed.ok_or_else(|| format!("line {}: {line:?}", i + 1))?;
            newest.insert(c, e);
        }
        Ok(Fences { newest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_older_epoch_is_refused_and_changes_nothing() {
        let mut f = Fences::default();
        assert_eq!(f.admit(7, 3), Ok(Admit::Raised));
        assert_eq!(f.admit(7, 3), Ok(Admit::Current));
        let before = f.clone();
        assert_eq!(f.admit(7, 2), Err(StaleEpoch { sent: 2, newest: 3 }));
        assert_eq!(f, before);
        assert_eq!(f.admit(8, 1), Ok(Admit::Raised), "fences are per component");
        assert!(Fences::decode("1 2\nx 3\n").unwrap_err().contains("line 2"));
        assert!(Fences::decode("1 2 3\n").is_err());
    }

    proptest! {
        #[test]
        fn fences_only_rise_and_survive_a_round_trip(
            requests in proptest::collection::vec((0u64..4, 0u64..20), 0..200),
        ) {
            let mut f = Fences::default();
            let mut admitted: BTreeMap<u64, u64> = BTreeMap::new();
            for (c, e) in requests {
                let before = f.newest(c);
                match f.admit(c, e) {
                    Ok(_) => {
                        prop_assert!(e >= before);
                        let top = admitted.entry(c).or_insert(0);
                        *top = (*top).max(e);
                    }
                    Err(stale) => prop_assert!(e < before && stale.newest == before),
                }
                prop_assert!(f.newest(c) >= before, "a fence fell");
                // Never below an admitted epoch.
                prop_assert!(f.newest(c) >= admitted.get(&c).copied().unwrap_or(0));
            }
            prop_assert_eq!(Fences::decode(&f.encode()).unwrap(), f);
        }
    }
}
