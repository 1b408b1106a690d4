//! Each node's steward of the replicated volumes: exports every one (a router), deposes
//! a superseded view, takes an ownerless or moved volume when the core's
//! `takeover::decide` says so, hands volumes over at a stop, moves a volume to the node
//! its clients use, publishes power-loss (suspect) and stopping marks.

use super::*;
use crate::poison::Locked;

/// What a node knows of one replicated volume, from its applied state.
pub(super) struct Seen {
    pub(super) record: VolumeRecord,
    pub(super) owner: Option<Owner>,
    pub(super) moving: Option<Move>,
    /// Nodes whose sessions are up.
    pub(super) up: BTreeSet<u64>,
    /// Nodes that published their copy of this volume as suspect (invariant 11).
    pub(super) suspect: BTreeSet<u64>,
}

pub(super) fn seen(meta: &Member) -> Vec<Seen> {
    meta.read_local(|s| {
        fn decode<T: for<'de> Deserialize<'de>>(
            s: &strata_meta::state::State,
            key: String,
        ) -> Option<T> {
            s.get(&key).and_then(|e| serde_json::from_slice(&e.value).ok())
        }
        records(s)
            .filter(|r| r.replicated() && r.state == VolumeState::Ready)
            .map(|record| Seen {
                owner: decode(s, format!("/volumes/{}/owner", record.name)),
                moving: decode(s, format!("/volumes/{}/attach", record.name)),
                up: record
                    .components
                    .iter()
                    .map(|c| c.node)
                    .filter(|n| s.session(*n).is_some_and(|x| x.up))
                    .collect(),
                suspect: record
                    .components
                    .iter()
                    .filter(|c| {
                        decode::<Vec<u64>>(s, format!("{SUSPECT_PREFIX}{}", c.node))
                            .is_some_and(|ids| ids.contains(&c.id))
                    })
                    .map(|c| c.node)
                    .collect(),
                record,
            })
            .collect()
    })
}

/// When a volume moves by itself to the node its clients use.
#[derive(Clone, Copy, Debug)]
pub struct MovePolicy {
    /// Its clients have all been on one other node this long (zero: never).
    pub after: Duration,
    /// It has had its owner at least this long (hysteresis).
    pub hold: Duration,
}

/// As the owner of `v`, asks for a move to the node that alone uses the volume (if the
/// policy says so): that node's steward then takes it.
pub(super) async fn consider_move(
    meta: &Member,
    v: &Seen,
    view: &ReplicatedVolume,
    router: &Router,
    p: MovePolicy,
) {
    if let Some(m) = v.moving {
        // A move no node can carry out (its copy is not active, or it is down) would take
        // effect whenever that changes: withdraw it.
        let able =
            v.record.components.iter().any(|c| c.node == m.node && c.state == CopyState::Active);
        if !able || !v.up.contains(&m.node) {
            let key = format!("/volumes/{}/attach", v.record.name);
            let _ = write(meta, vec![], vec![Op::Delete { key }]).await;
            let name = &v.record.name;
            tracing::warn!(volume = %name, to = m.node, "withdrew a move that node cannot make");
        }
        return;
    }
    if p.after.is_zero() || view.taken_at.elapsed() < p.hold {
        return;
    }
    let local = *router.last_local.locked("the time of the last local client");
    let Some(to) = view.sole_user(p.after, local) else { return };
    let active = v.record.components.iter().any(|c| c.node == to && c.state == CopyState::Active);
    if !active || !v.up.contains(&to) {
        return;
    }
    let key = format!("/volumes/{}/attach", v.record.name);
    let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
    if write(meta, vec![], vec![Op::Put { key, value, lease: None }]).await.is_ok() {
        tracing::info!(volume = %v.record.name, to, "moving to the node its clients use");
    }
}

/// At a clean stop: each volume this node owns is moved to another node with an active
/// copy that is up (as `attach` would), waiting up to `patience` in all, so clients of
/// the other nodes wait a moment instead of a session timeout.
pub async fn hand_over(node: &Node, meta: &Member, patience: Duration) {
    // Bounded as a whole: without a metadata quorum (every node stopping at once) the
    // move's write would wait forever.
    let deadline = Instant::now() + patience;
    if tokio::time::timeout(patience, hand_over_by(node, meta, deadline)).await.is_err() {
        tracing::warn!("could not hand every volume over within {patience:?}");
    }
}

pub(super) async fn hand_over_by(node: &Node, meta: &Member, deadline: Instant) {
    let mut stopping = announce_stop(meta).await;
    for view in owned(node).into_iter().filter(|v| v.serving()) {
        let Some(v) = seen(meta).into_iter().find(|s| s.record.name == view.name) else {
            continue;
        };
        stopping.extend(meta.read_local(stopping_nodes));
        // A node stopping too would not take it (and nobody waits for one that cannot).
        let next = v.record.components.iter().find(|c| {
            c.node != meta.id()
                && c.state == CopyState::Active
                && v.up.contains(&c.node)
                && !stopping.contains(&c.node)
        });
        let Some(to) = next.map(|c| c.node) else {
            tracing::info!(volume = %view.name,
                "not handed over at stop: no other node with an active copy is up and staying");
            continue;
        };
        let key = format!("/volumes/{}/attach", view.name);
        let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
        // Each write bounded on its own: the other nodes may stop (and the metadata lose
        // its quorum) at any moment, and the rest of the volumes still get their turn.
        let put = write(meta, vec![], vec![Op::Put { key: key.clone(), value, lease: None }]);
        match tokio::time::timeout(STOPPING_PATIENCE, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => continue,
            Err(_) => {
                // Whether it was applied is unknown: withdraw it if it was and still can be.
                let _ =
                    tokio::time::timeout(STOPPING_PATIENCE, withdraw_move(meta, &key, to)).await;
                continue;
            }
        }
        let owner_key = format!("/volumes/{}/owner", view.name);
        while Instant::now() < deadline {
            let (moved, gone) = meta.read_local(|s| {
                let moved = s
                    .get(&owner_key)
                    .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
                    .is_some_and(|o| o.node == to);
                (moved, stopping_nodes(s).contains(&to))
            });
            if moved {
                tracing::info!(volume = %view.name, to, "handed over at stop");
                break;
            }
            if gone {
                // It began stopping after this node looked: it will not take the volume.
                // The move is withdrawn unless it changed (that node's steward takes
                // nothing while it stops, so no second owner can come of it).
                tracing::info!(volume = %view.name, to,
                    "not handed over at stop: that node is stopping too");
                // Without a quorum (the others stopped already) it cannot be withdrawn:
                // left, it takes effect once that node is back with its copy active, or
                // the volume's next owner withdraws it (`consider_move`).
                let _ =
                    tokio::time::timeout(STOPPING_PATIENCE, withdraw_move(meta, &key, to)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `/stopping/NODE`: the node is stopping cleanly (it hands its volumes over, then
/// leaves). Tied to the node's session lease, so it ends with that session (declared
/// down, or registered again at the next start). Other stopping nodes hand nothing to
/// it, and its own steward takes no volume meanwhile.
pub(super) const STOPPING_PREFIX: &str = "/stopping/";

/// How long a stopping node tries to publish its mark (without a quorum, as when every
/// node stops at once, the write would wait for ever).
pub(super) const STOPPING_PATIENCE: Duration = Duration::from_secs(2);

/// Publishes this node's stopping mark, then reads the others' linearizably: of two nodes
/// stopping at once, at least one sees the other's mark (and the other finds it while it
/// waits for its hand-over). Returns the nodes stopping (this one's own mark included),
/// as far as it could tell in `STOPPING_PATIENCE`.
pub(super) async fn announce_stop(meta: &Member) -> BTreeSet<u64> {
    let announced = async {
        let lease = meta.session_lease()?;
        let key = format!("{STOPPING_PREFIX}{}", meta.id());
        let value = b"stopping".to_vec();
        write(meta, vec![], vec![Op::Put { key, value, lease: Some(lease) }]).await.ok()?;
        let prefix = STOPPING_PREFIX.to_owned();
        let range = meta.request(ClientRequest::Range { prefix, limit: usize::MAX }).await.ok()?;
        let ClientReply::Range { entries, .. } = range else { return None };
        Some(
            entries
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(STOPPING_PREFIX)?.parse().ok())
                .collect(),
        )
    };
    let stopping = tokio::time::timeout(STOPPING_PATIENCE, announced).await.ok().flatten();
    stopping.unwrap_or_else(|| {
        tracing::info!("could not publish this node's stopping mark in time");
        BTreeSet::new()
    })
}

/// The nodes with a stopping mark (`STOPPING_PREFIX`) in the applied state `s` (a mark
/// ends with its session, so each is of a node stopping now).
pub(super) fn stopping_nodes(s: &strata_meta::state::State) -> BTreeSet<u64> {
    s.range(STOPPING_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(STOPPING_PREFIX)?.parse().ok())
        .collect()
}

/// Withdraws the move of volume key `key` to node `to`, if it is still that move.
pub(super) async fn withdraw_move(meta: &Member, key: &str, to: u64) {
    if let Ok(Some((bytes, version))) = get(meta, key).await {
        if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == to) {
            let compare = vec![Compare::Version(key.to_owned(), version)];
            let _ = write(meta, compare, vec![Op::Delete { key: key.to_owned() }]).await;
        }
    }
}

/// Where each node publishes the copies it holds that are marked suspect (invariant 11):
/// `/suspect/NODE`, a JSON list of component ids, absent when there are none.
pub(super) const SUSPECT_PREFIX: &str = "/suspect/";

/// Sets each copy's `suspect` from the marks its node published (`SUSPECT_PREFIX`, in
/// this member's applied state) and, for this node's copies, from its own marks (which
/// reach the metadata a moment later).
pub fn mark_suspects(node: &Node, meta: &Member, copies: &mut [ComponentRecord]) {
    let me = meta.id();
    let here = node.suspects();
    meta.read_local(|s| {
        for c in copies.iter_mut() {
            let published = || {
                s.get(&format!("{SUSPECT_PREFIX}{}", c.node))
                    .and_then(|e| serde_json::from_slice::<Vec<u64>>(&e.value).ok())
                    .is_some_and(|ids| ids.contains(&c.id))
            };
            c.suspect = if c.node == me { here.contains(&c.id) } else { published() };
        }
    });
}

/// The core's view of volume `v` for this node's steward (`takeover::Seen`).
pub(super) fn core_seen(v: &Seen, me: u64, me_suspect: bool) -> takeover::Seen {
    takeover::Seen {
        me,
        last_owner: v.record.node,
        copies: v.record.components.iter().map(|c| (c.node, c.state)).collect(),
        owner: v.owner.map(|o| o.node),
        moving_to: v.moving.map(|m| m.node),
        up: v.up.clone(),
        suspect: v.suspect.clone(),
        me_suspect,
    }
}

/// Which [`Truth`] holds for a suspect copy on this node (invariant 11). If the
/// membership cannot be read, `Elsewhere`.
pub(super) async fn truth_for_suspect(meta: &Member, seen: &takeover::Seen) -> Truth {
    let Ok(members) = members(meta).await else { return Truth::Elsewhere };
    takeover::truth_for_suspect(seen, &members.iter().map(|(m, _)| m.id).collect())
}

/// Publishes this node's suspect marks (`SUSPECT_PREFIX`) when what the metadata holds
/// differs; a failed write is tried again on the next call.
pub(super) async fn publish_suspect(node: &Node, meta: &Member) {
    let key = format!("{SUSPECT_PREFIX}{}", meta.id());
    let marks: Vec<u64> = node.suspects().into_iter().collect();
    let published: Vec<u64> = meta
        .read_local(|s| s.get(&key).and_then(|e| serde_json::from_slice(&e.value).ok()))
        .unwrap_or_default();
    if marks == published {
        return;
    }
    let op = if marks.is_empty() {
        Op::Delete { key }
    } else {
        Op::Put { key, value: serde_json::to_vec(&marks).expect("serializes"), lease: None }
    };
    if let Err(e) = write(meta, Vec::new(), vec![op]).await {
        tracing::debug!("cannot publish this node's power-loss marks yet: {}", e.message);
    }
}

/// Each node's steward of the replicated volumes, until the process ends: it exports
/// every one (a router), notices when this node's view is no longer the owner's, and
/// takes ownership of a volume that has no owner (the last owner first, then the other
/// nodes with an ACTIVE copy, each a `T.takeover_step` later in id order) or that an
/// operator (or the owner, for its clients' sake: `MovePolicy`) moves to this node.
pub async fn steward(node: Arc<Node>, meta: Arc<Member>, moves: MovePolicy) {
    // Apart, so a metadata write waiting for a quorum never holds up a takeover.
    tokio::spawn(housekeeping(node.clone(), meta.clone()));
    // What the steward remembers of each volume between passes (`takeover::Memory`).
    let mut memory: HashMap<String, takeover::Memory> = HashMap::new();
    loop {
        tokio::time::sleep(T.steward_every).await;
        if !meta.registered() {
            continue;
        }
        publish_suspect(&node, &meta).await;
        let me = meta.id();
        for v in seen(&meta) {
            let name = v.record.name.clone();
            let router =
                export_router(&node, &name, || Arc::new(Router::new(meta.clone(), &v.record)));
            router.grow(v.record.size_bytes);
            let here = v.record.components.iter().find(|c| c.node == me);
            let copy = here.and_then(|c| node.component(c.id));
            router.set_local(copy.map(|c| (c, node.fencing().clone())));
            // Back from a power loss and not levelled since (invariant 11).
            let suspect = here.filter(|c| node.suspect(c.id));
            let seen = core_seen(&v, me, suspect.is_some());
            let mem = memory.entry(name.clone()).or_default();
            mem.observe(&seen);
            if let Some(view) = router.view() {
                // This member's applied state may lag the CAS that made this view: only a
                // newer owner, or no owner well after the take, deposes it.
                let held = view.taken_at.elapsed();
                if takeover::superseded(v.owner.map(|o| o.epoch), view.owner.epoch, held, &T) {
                    view.depose("the owner key names a newer owner, or none");
                }
                if !view.deposed() {
                    consider_move(&meta, &v, &view, &router, moves).await;
                    continue;
                }
                router.clear();
            }
            // Whom such a copy leaves an ownerless volume to (asked once a pass).
            let truth = match (suspect, v.owner, seen.active_here()) {
                (Some(_), None, true) => Some(truth_for_suspect(&meta, &seen).await),
                _ => None,
            };
            let go = match takeover::decide(mem, &seen, truth, now(), &T) {
                takeover::Take::Now => true,
                takeover::Take::NotYet => false,
                takeover::Take::WaitForTruth { first } => {
                    if first {
                        tracing::warn!(volume = %name,
                            "not taking ownership: this node's copy may lack writes it had \
                             not synced before a power loss, and another member holds an \
                             active copy that may have them (waiting for that node to be \
                             up, or to say it lost power too; if it is gone for good, \
                             `strata node remove` it)");
                    }
                    false
                }
            };
            // Moved here while its owner is up: that owner hands over first.
            let from = match v.owner {
                Some(o) if o.node != me && v.up.contains(&o.node) => Some((o, &v.record)),
                _ => None,
            };
            // A node stopping cleanly takes nothing: it would leave at once.
            let go = go && !meta.read_local(stopping_nodes).contains(&me);
            if go && router.taking.try_lock().is_ok() {
                match take_over(&node, &meta, &router, false, from).await {
                    Ok(epoch) => {
                        tracing::info!(volume = %name, epoch, "took ownership");
                        // Its copy is the truth now: as good as any there is.
                        if let Some(c) = suspect.filter(|c| node.clear_suspect(c.id)) {
                            // (Asked now if this node took it as the owner key's node.)
                            let truth = match truth {
                                Some(t) => t,
                                None => truth_for_suspect(&meta, &seen).await,
                            };
                            let why = match truth {
                                Truth::Nowhere => "no other member holds an active copy",
                                _ => {
                                    "every other active copy came back from a power loss \
                                      too (its writes not synced may be lost as well)"
                                }
                            };
                            tracing::warn!(volume = %name, component = c.id,
                                "took ownership with a copy that may lack writes it had not \
                                 synced before a power loss: {why}");
                        }
                        if let Some(mem) = memory.get_mut(&name) {
                            mem.waiting_for_truth = false;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, "cannot take ownership: {}", e.message)
                    }
                }
            }
        }
    }
}
