//! Placement: which nodes hold a replicated volume's copies.
//!
//! Invariants:
//! 1. A volume's copies are on distinct nodes.
//! 2. The node placing comes first (it owns the volume it makes); every next node is on a
//!    site, then a rack, that the chosen ones do not use yet, the lowest id among equals:
//!    the same candidates always give the same placement.

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub id: u64,
    /// Its RPC address.
    pub rpc: String,
    /// Site.
    pub site: String,
    /// Rack.
    pub rack: String,
}

/// Chooses `n` distinct nodes, `me` first, then the others preferring a site, then a rack,
/// not yet used (invariants 1 and 2). `None` if there are fewer than `n` nodes.
pub fn place(me: u64, candidates: &[Candidate], n: usize) -> Option<Vec<Candidate>> {
    let mut chosen: Vec<Candidate> = candidates.iter().filter(|c| c.id == me).cloned().collect();
    let mut rest: Vec<Candidate> = candidates.iter().filter(|c| c.id != me).cloned().collect();
    while chosen.len() < n {
        let best = place_one(&chosen, &rest)?;
        rest.retain(|c| c.id != best.id);
        chosen.push(best);
    }
    Some(chosen)
}

/// The one of `candidates` (none of them in `chosen`) that best adds to `chosen`: on a
/// site, then a rack, that `chosen` does not use yet; the lowest id among equals (a copy
/// placed again, next to the copies a volume has). `None` if there is no candidate.
pub fn place_one(chosen: &[Candidate], candidates: &[Candidate]) -> Option<Candidate> {
    let score = |c: &Candidate| {
        let site = chosen.iter().any(|x| x.site == c.site) as u8;
        let rack = chosen.iter().any(|x| x.site == c.site && x.rack == c.rack) as u8;
        (site, rack, c.id)
    };
    candidates.iter().min_by_key(|c| score(c)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, site: &str, rack: &str) -> Candidate {
        Candidate { id, rpc: String::new(), site: site.into(), rack: rack.into() }
    }

    #[test]
    fn placement_spreads_over_sites_then_racks_and_needs_enough_nodes() {
        let nodes = [c(1, "a", "r1"), c(2, "a", "r1"), c(3, "a", "r2"), c(4, "b", "r1")];
        let ids = |v: Vec<Candidate>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(place(1, &nodes, 1).unwrap()), vec![1]);
        assert_eq!(ids(place(1, &nodes, 2).unwrap()), vec![1, 4], "another site first");
        assert_eq!(ids(place(1, &nodes, 3).unwrap()), vec![1, 4, 3], "then another rack");
        assert_eq!(ids(place(2, &nodes, 4).unwrap()), vec![2, 4, 3, 1]);
        assert!(place(1, &nodes, 5).is_none());
    }

    #[test]
    fn a_rack_of_another_site_counts_as_unused() {
        // Racks are named per site: rack "r2" of site b is not rack "r2" of site a.
        let nodes = [c(1, "a", "r1"), c(2, "a", "r1"), c(3, "a", "r2"), c(5, "b", "r2")];
        let ids = |v: Vec<Candidate>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(place(1, &nodes, 3).unwrap()), vec![1, 5, 3]);
        // `me` absent from the candidates: the others alone, lowest id first.
        assert_eq!(ids(place(9, &nodes, 2).unwrap()), vec![1, 5]);
    }
}
