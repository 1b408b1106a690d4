//! A replicated volume's life: creation (placement, components, record), taking and
//! opening ownership (the owner key by CAS, fencing), operator moves, growth.

use super::*;

/// `/volumes/<name>/attach`: a move of the volume's ownership asked by an operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The node to own it.
    pub node: u64,
}

/// What [`take_ownership`] took.
pub struct Taken {
    /// The owner key now.
    pub owner: Owner,
    /// The record, with `released` if it vouches for this take.
    pub record: VolumeRecord,
    /// This member's incarnation when it took it.
    pub incarnation: u64,
    /// An owner key (a live session's) was replaced.
    pub replaced: bool,
    /// The node the record named as the last owner.
    pub last_owner: u64,
}

/// Takes ownership of `name` (invariant 2): the owner key goes from what it is to this
/// node at one epoch above any before (the record keeps the highest epoch, as the key
/// dies with its owner's session), tied to this node's session lease; the record names
/// this node; a move asked to this node is done.
pub async fn take_ownership(
    meta: &Member,
    name: &str,
    suspect: impl Fn(u64) -> bool,
) -> ApiResult<Taken> {
    let (lease, incarnation) = meta
        .session()
        .ok_or_else(|| unavailable("this node's session is not registered yet; retry"))?;
    let (owner_key, record_key, move_key) = (
        format!("/volumes/{name}/owner"),
        format!("/volumes/{name}"),
        format!("/volumes/{name}/attach"),
    );
    for _ in 0..10 {
        let owner = get(meta, &owner_key).await?;
        let Some((bytes, record_version)) = get(meta, &record_key).await? else {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}")));
        };
        let mut record: VolumeRecord = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("the record of {name} is unreadable: {e}")))?;
        // Decided on this member's state, which may lag: the fresh record must still
        // show this node's copy active (else the key would name an owner that cannot
        // serve until its session ends).
        if !record.components.iter().any(|c| c.node == meta.id() && c.state == CopyState::Active) {
            return Err(unavailable(format!("this node's copy of {name} is not active")));
        }
        let moving = get(meta, &move_key).await?;
        let last = owner.as_ref().and_then(|(b, _)| serde_json::from_slice::<Owner>(b).ok());
        let epoch = record.epoch.max(last.map_or(0, |o| o.epoch)) + 1;
        let me = Owner { node: meta.id(), epoch };
        let last_owner = record.node;
        record.node = me.node;
        record.epoch = epoch;
        // This node's copy suspect, it is the truth only as every ACTIVE copy lost power
        // (takeover T2): what was acknowledged and not synced may be gone, and a flush
        // begun before this epoch is not acknowledged (T5).
        let mine = record.components.iter().find(|c| c.node == me.node);
        record.lost_at =
            takeover::lost_mark(record.lost_at, epoch, mine.is_some_and(|c| suspect(c.id)));
        // Only the owner of the epoch just before can vouch for the copies (any take
        // since would have raised the epoch and cleared this).
        record.released = record.released.take().filter(|r| r.epoch + 1 == epoch);
        let mut compares = vec![
            Compare::Version(owner_key.clone(), owner.as_ref().map_or(0, |(_, v)| *v)),
            Compare::Version(record_key.clone(), record_version),
        ];
        let mut ops = vec![
            Op::Put {
                key: owner_key.clone(),
                value: serde_json::to_vec(&me).expect("serializes"),
                lease: Some(lease),
            },
            Op::Put {
                key: record_key.clone(),
                value: serde_json::to_vec(&record).expect("serializes"),
                lease: None,
            },
        ];
        if let Some((bytes, version)) = moving {
            if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == me.node) {
                compares.push(Compare::Version(move_key.clone(), version));
                ops.push(Op::Delete { key: move_key.clone() });
            }
        }
        // Written without the marker: it vouches for the copies only until this owner
        // writes.
        let mut written = record.clone();
        written.released = None;
        if let Some(Op::Put { value, .. }) = ops.get_mut(1) {
            *value = serde_json::to_vec(&written).expect("serializes");
        }
        if write(meta, compares, ops).await? {
            let replaced = owner.is_some();
            return Ok(Taken { owner: me, record, incarnation, replaced, last_owner });
        }
    }
    Err(unavailable(format!("could not take ownership of {name}: it keeps changing")))
}

/// Opens a new owner's view of a replicated volume (this node must hold an ACTIVE copy).
/// Every other copy gets a digest scan (invariant 5), except a STALE copy whose bitmap
/// this node kept at the epoch just before (that bitmap says all it lacks), and an ACTIVE
/// copy the owner of the epoch just before vouched for with this node's when it let go
/// cleanly (`record.released`, kept by `take_ownership` only for that epoch).
pub fn open(
    node: &Node,
    meta: &Arc<Member>,
    record: &VolumeRecord,
    owner: Owner,
    rpc_of: impl Fn(u64) -> Option<String>,
) -> ApiResult<ReplicatedVolume> {
    let key = DataKey::from_secret(meta.secret());
    let bitmaps = node.dir().join("bitmaps");
    let mut local = None;
    let mut copies = Vec::new();
    let mut tracks = Vec::new();
    let handed = handed_word(record, meta.id());
    let regions = record.size_bytes.div_ceil(REGION);
    for c in &record.components {
        let state = c.state;
        let file = bitmaps.join(format!("{}.{}.{}", record.name, c.node, c.id));
        let kept = std::fs::read_to_string(&file).ok().and_then(|text| {
            let mut lines = text.lines();
            let (epoch, boot) = lines.next()?.strip_prefix("epoch ")?.split_once(" boot ")?;
            let epoch = epoch.parse::<u64>().ok()?;
            let regions = lines.map(|l| l.parse::<u64>().ok()).collect::<Option<BTreeSet<_>>>()?;
            // Kept at the epoch just before, in this boot (it is not synced).
            (epoch + 1 == owner.epoch && boot == boot_id() && boot != "unknown").then_some(regions)
        });
        let _ = std::fs::remove_file(&file);
        let mine = c.node == meta.id();
        let peer = if mine {
            if state != CopyState::Active {
                return Err(ApiError::invalid("this node's copy is not active"));
            }
            let here = node.component(c.id).ok_or_else(|| {
                ApiError::new(ErrorCode::Io, format!("component {} is missing here", c.id))
            })?;
            local = Some(here);
            None
        } else {
            let rpc = rpc_of(c.node).ok_or_else(|| {
                unavailable(format!("node {} (holding a component) has no address", c.node))
            })?;
            Some(Arc::new(DataPeer::new(key.clone(), rpc)))
        };
        copies.push(Copy { node: c.node, id: AtomicU64::new(c.id), peer });
        tracks.push(Track::found(Found {
            node: c.node,
            id: c.id,
            local: mine,
            state: Some(state),
            stale_lsn: c.stale_lsn,
            kept: kept.filter(|_| state == CopyState::Stale),
            // Equal to this node's copy when the last owner let go cleanly, and nobody
            // has written since.
            vouched: handed.is_some_and(|r| r.level.contains(&CopyRef { node: c.node, id: c.id })),
            // What it lacks from this node's copy, as the last owner handed it over.
            handed: handed
                .and_then(|r| r.stale.iter().find(|b| b.node == c.node && b.id == c.id))
                .map(|b| regions_of(&b.runs, regions)),
        }));
    }
    let local = local.ok_or_else(|| ApiError::invalid("the owner holds no component"))?;
    let n = copies.len();
    let volume = ReplicatedVolume {
        name: record.name.clone(),
        size_bytes: AtomicU64::new(record.size_bytes),
        epoch: owner.epoch,
        lost_at: record.lost_at,
        local,
        copies,
        state: Mutex::new(OwnerState::new(
            owner.epoch,
            record.min_replicas as usize,
            regions,
            tracks,
        )),
        resync_lock: tokio::sync::RwLock::new(()),
        recording: tokio::sync::Mutex::new(()),
        in_flight: InFlight::default(),
        meta: meta.clone(),
        owner,
        fencing: node.fencing().clone(),
        scheduler: node.resync_scheduler().clone(),
        client_ops: AtomicU64::new(0),
        taken_at: Instant::now(),
        forwarders: Mutex::default(),
        deposed: AtomicBool::new(false),
        scrub_every: node.scrub_every(),
        incarnation: meta.incarnation(),
        released: tokio::sync::Mutex::new(false),
        unplaced: AtomicBool::new(false),
        full: AtomicBool::new(false),
        full_watch: AtomicBool::new(false),
        weak: std::sync::OnceLock::new(),
        bitmaps,
    };
    // A STALE copy's bitmap is durable again under this epoch.
    for i in 0..n {
        let st = volume.state();
        if st[i].state == CopyState::Stale && !st[i].dirty.is_empty() {
            let regions = st[i].dirty.clone();
            drop(st);
            volume
                .save_bitmap(i, &regions, false)
                .map_err(|e| ApiError::new(ErrorCode::Io, e.to_string()))?;
        }
    }
    Ok(volume)
}

/// An operator's move of `name` to node `to` (`strata volume attach`): checked (the node
/// holds an ACTIVE copy and is up), asked in `/volumes/<name>/attach`, and waited for
/// until `to` owns the volume. A move that does not happen in time is withdrawn.
pub async fn attach(meta: &Member, name: &str, to: u64) -> ApiResult<VolumeRecord> {
    let (record, _) = read_record(meta, name).await?;
    if record.state != VolumeState::Ready {
        return Err(ApiError::invalid(format!("{name} is {}: it cannot move", record.state)));
    }
    if !record.replicated() {
        return Err(ApiError::invalid(format!(
            "{name} has one copy, on node {}: only a replicated volume changes owner",
            record.node
        )));
    }
    let holders: Vec<String> = record.components.iter().map(|c| c.node.to_string()).collect();
    let Some(copy) = record.components.iter().find(|c| c.node == to) else {
        return Err(ApiError::invalid(format!(
            "node {to} holds no copy of {name} (its copies are on nodes {})",
            holders.join(", ")
        )));
    };
    if copy.state != CopyState::Active {
        return Err(ApiError::invalid(format!(
            "node {to}'s copy of {name} is {}: only a node with an active copy can own it",
            copy.state
        )));
    }
    if !meta.read_local(|s| s.session(to).is_some_and(|x| x.up)) {
        return Err(unavailable(format!("node {to} is down")));
    }
    let owner_key = format!("/volumes/{name}/owner");
    let owns = |meta: &Member| {
        meta.read_local(|s| {
            s.get(&owner_key)
                .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
                .is_some_and(|o| o.node == to)
        })
    };
    if !owns(meta) {
        let move_key = format!("/volumes/{name}/attach");
        let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
        write(meta, vec![], vec![Op::Put { key: move_key.clone(), value, lease: None }]).await?;
        let deadline = Instant::now() + T.move_patience;
        while !owns(meta) {
            if Instant::now() >= deadline {
                if let Some((bytes, version)) = get(meta, &move_key).await? {
                    if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == to) {
                        let withdraw = Op::Delete { key: move_key.clone() };
                        let _ =
                            write(meta, vec![Compare::Version(move_key, version)], vec![withdraw])
                                .await;
                    }
                }
                return Err(unavailable(format!(
                    "node {to} did not take {name} within {:?}; the move is withdrawn",
                    T.move_patience
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    read_record(meta, name).await.map(|(record, _)| record)
}

/// Takes ownership of `name` here: the owner key, the view, every copy fenced at the new
/// epoch (invariant 3), then the view serves and its copies are scanned in the background.
///
/// `fresh`: the volume was just created (its copies are empty, so equal: no scans).
pub(super) async fn take_over(
    node: &Arc<Node>,
    meta: &Arc<Member>,
    router: &Router,
    fresh: bool,
    from: Option<(Owner, &VolumeRecord)>,
) -> ApiResult<u64> {
    // One at a time per volume (the steward and a create must not both take it).
    let _taking = router.taking.try_lock().map_err(|_| unavailable("already taking it"))?;
    if router.view().is_some_and(|v| !v.deposed()) {
        return Err(unavailable("this node owns it already"));
    }
    // A planned move: the owner up now hands over cleanly first, so the copies need no
    // comparing (invariant 5); if it cannot, they are compared.
    if let Some((o, record)) = from {
        if let Err(e) = ask_release(meta, record, o).await {
            tracing::warn!(volume = %router.name, from = o.node,
                "the owner did not hand over cleanly ({e}): the copies will be compared");
        }
    }
    let Taken { owner, record, incarnation, replaced, last_owner } =
        take_ownership(meta, &router.name, |id| node.suspect(id)).await?;
    if record.released.is_some() {
        tracing::info!(volume = %router.name, epoch = owner.epoch,
            "taken over cleanly: the copies the last owner vouched for are not compared");
    }
    let mut view = open(node, meta, &record, owner, |n| rpc_of(meta, n))?;
    view.incarnation = incarnation;
    if fresh {
        view.state().created();
    }
    let view = Arc::new(view);
    let _ = view.weak.set(Arc::downgrade(&view));
    match view.fence_copies().await {
        Err(e) => {
            view.depose(&e.to_string());
            return Err(ApiError::from(e));
        }
        // A copy this owner could not fence would honour the read leases the last owner
        // granted (invariant 10). Unless it let go cleanly (then it waited for them),
        // they may still run if its session is live (it did not let go, or it restarted
        // and registered again, which ended its owner key at once): no write is
        // acknowledged until they have surely run out. (After a crash or a pause past
        // the session timeout, they ran out long before the owner key went.)
        Ok(true) if record.released.is_none() => {
            let live = replaced
                || last_owner == meta.id()
                || members(meta)
                    .await
                    .map_or(true, |m| m.iter().any(|(c, up)| c.id == last_owner && *up));
            if live {
                view.state().hold_acks_until(now() + 2 * T.read_lease);
            }
        }
        Ok(_) => {}
    }
    router.install(view.clone());
    tokio::spawn(run_resync(view));
    Ok(owner.epoch)
}

/// Grows replicated volume `name` to `size_bytes` (invariant 8): every copy first, then
/// the record; refused while a copy's node is down, and never shrinks it.
pub async fn resize(
    node: &Node,
    meta: &Member,
    name: &str,
    size_bytes: u64,
) -> ApiResult<VolumeRecord> {
    let key = format!("/volumes/{name}");
    let (record, _) = read_record(meta, name).await?;
    if record.state != VolumeState::Ready {
        return Err(ApiError::new(ErrorCode::Conflict, format!("{name} is {}", record.state)));
    }
    if size_bytes < record.size_bytes {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "{name} is replicated: it can grow but not shrink (it is {}, asked {})",
                strata_types::format_size(record.size_bytes),
                strata_types::format_size(size_bytes)
            ),
        ));
    }
    if size_bytes == record.size_bytes {
        return Ok(record);
    }
    // Each copy grows (at the epoch of the owner, which fences it: a copy that has seen
    // a newer owner refuses, and the record tells which to ask again).
    let epoch = record.epoch;
    let dkey = DataKey::from_secret(meta.secret());
    for c in &record.components {
        let rpc = rpc_of(meta, c.node)
            .ok_or_else(|| unavailable(format!("node {} has no address", c.node)))?;
        let peer = DataPeer::new(dkey.clone(), rpc);
        let h = request(Kind::Resize, c.id, epoch, 0, size_bytes);
        match tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(unavailable(format!(
                    "node {}'s copy did not grow ({e}); nothing shrank, retry",
                    c.node
                )))
            }
            Err(_) => {
                return Err(unavailable(format!(
                    "node {} (holding a copy) does not answer: a replicated volume grows only \
                     with every copy's node up; retry",
                    c.node
                )))
            }
        }
    }
    // Then the record (the size every node serves), unless it changed meanwhile.
    for _ in 0..5 {
        let (mut now, version) = read_record(meta, name).await?;
        let ids = |r: &VolumeRecord| r.components.iter().map(|c| c.id).collect::<Vec<_>>();
        if now.state != VolumeState::Ready || ids(&now) != ids(&record) {
            return Err(unavailable(format!("{name}'s copies changed meanwhile; retry")));
        }
        now.size_bytes = now.size_bytes.max(size_bytes);
        let value = serde_json::to_vec(&now).expect("serializes");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if write(meta, vec![Compare::Version(key.clone(), version)], vec![put]).await? {
            tracing::info!(
                volume = name,
                from = record.size_bytes,
                to = size_bytes,
                "volume grown"
            );
            if let Some(router) = router_of(node, name) {
                router.grow(now.size_bytes);
            }
            return Ok(now);
        }
    }
    Err(unavailable(format!("the record of {name} keeps changing; retry")))
}

/// Asks owner `o` of the volume `record` describes to hand it over cleanly
/// ([`ReplicatedVolume::release`]).
pub(super) async fn ask_release(
    meta: &Member,
    record: &VolumeRecord,
    o: Owner,
) -> Result<(), ReplicaError> {
    let failed = |why: &str| ReplicaError::CopyFailed { node: o.node, why: why.to_string() };
    let component = record
        .components
        .iter()
        .find(|c| c.node == o.node)
        .map(|c| c.id)
        .ok_or_else(|| record_error("the owner holds no copy"))?;
    let rpc = rpc_of(meta, o.node).ok_or_else(|| failed("the owner has no address"))?;
    let peer = DataPeer::new(DataKey::from_secret(meta.secret()), rpc);
    let h = request(Kind::Release, component, o.epoch, 0, 0);
    match tokio::time::timeout(T.release_patience, peer.call(h, &[])).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(failed(&e.to_string())),
        Err(_) => Err(failed("no answer in time")),
    }
}

/// Creates a replicated volume owned by this node: the name is taken, components are
/// made on `replicas` nodes (this one first), ownership is taken, the record published
/// and the volume exported here. On a failure, what was made is removed again.
// The volume's shape (size, copies, access list) as the API gave it, field by field.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    node: &Arc<Node>,
    meta: &Arc<Member>,
    registry: &crate::registry::Registry,
    name: &str,
    size_bytes: u64,
    replicas: u32,
    min_replicas: u32,
    access: strata_types::AccessList,
) -> ApiResult<crate::node::VolumeInfo> {
    let up = candidates(meta).await?;
    let chosen = place(meta.id(), &up, replicas as usize).ok_or_else(|| {
        ApiError::invalid(format!(
            "{replicas} replicas need {replicas} nodes up; the cluster has {} up",
            up.len()
        ))
    })?;
    if chosen.first().is_none_or(|c| c.id != meta.id()) {
        return Err(unavailable("this node's session is not registered yet; retry"));
    }
    registry.reserve(name, size_bytes).await?;
    let key = DataKey::from_secret(meta.secret());
    let mut made: Vec<(Candidate, u64)> = Vec::new();
    let mut failure = None;
    for c in &chosen {
        let result = if c.id == meta.id() {
            let (node, of) = (node.clone(), name.to_owned());
            tokio::task::spawn_blocking(move || node.component_create(&of, size_bytes))
                .await
                .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, e.to_string())))
        } else {
            let peer = DataPeer::new(key.clone(), c.rpc.clone());
            let h = request(Kind::Create, 0, 0, 0, size_bytes);
            match tokio::time::timeout(T.io_timeout, peer.call(h, name.as_bytes())).await {
                Ok(Ok((reply, _))) => Ok(reply.component),
                Ok(Err(e)) => Err(unavailable(format!("node {}: {e}", c.id))),
                Err(_) => Err(unavailable(format!("node {} did not answer", c.id))),
            }
        };
        match result {
            Ok(id) => made.push((c.clone(), id)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let components: Vec<ComponentRecord> =
        made.iter().map(|(c, id)| ComponentRecord::new(c.id, *id, CopyState::Active)).collect();
    let mut record = VolumeRecord {
        name: name.to_owned(),
        node: meta.id(),
        state: VolumeState::Ready,
        id: String::new(),
        size_bytes,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        origin: None,
        snapshots: Vec::new(),
        replicas,
        min_replicas,
        components: components.clone(),
        epoch: 0,
        released: None,
        lost_at: None,
        access,
    };
    // The record replaces this node's `creating` one, then ownership is taken as any
    // later owner takes it (epoch 1, every copy fenced).
    let done = match failure {
        None => match registry.publish(&record).await {
            Ok(()) => {
                let router =
                    export_router(node, name, || Arc::new(Router::new(meta.clone(), &record)));
                match take_over(node, meta, &router, true, None).await {
                    Ok(epoch) => {
                        record.epoch = epoch;
                        Ok(())
                    }
                    // Another node with a copy took the published volume meanwhile: it
                    // exists, and must not be undone.
                    Err(e) => match get(meta, &format!("/volumes/{name}/owner")).await {
                        Ok(Some(_)) => Ok(()),
                        _ => Err(e),
                    },
                }
            }
            Err(e) => Err(e),
        },
        Some(e) => Err(e),
    };
    match done {
        Ok(()) => {
            tracing::info!(volume = name, replicas, ?components, "replicated volume created");
            let nbd = node.nbd_addr();
            Ok(crate::registry::info(&record, &nbd))
        }
        Err(e) => {
            // Undo: remove the components made, give the name back.
            for (c, id) in made {
                if c.id == meta.id() {
                    let _ = node.component_remove(id);
                } else {
                    let peer = DataPeer::new(key.clone(), c.rpc.clone());
                    let _ = tokio::time::timeout(
                        T.io_timeout,
                        peer.call(request(Kind::Remove, id, 0, 0, 0), &[]),
                    )
                    .await;
                }
            }
            registry.release(name).await;
            Err(e)
        }
    }
}
