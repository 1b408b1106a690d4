//! Each node's housekeeping of replicated volumes: deletes (every node removes its copy),
//! client counts, exports of volumes no record lists, copies no record lists (orphans),
//! copies on removed nodes placed again.

use super::*;

/// `/volumes/<name>/clients/<node>`: the node has NBD clients of the volume (a key tied
/// to its session, so a dead node's clients vanish with it).
pub(super) fn clients_prefix(name: &str) -> String {
    format!("/volumes/{name}/clients/")
}

/// Deletes replicated volume `name` (invariant 7): refused while nodes have NBD clients
/// of it unless `force` (then they are disconnected). Returns the nodes that still hold
/// a copy after `T.delete_patience` (down now: each removes its copy when it returns).
pub async fn delete(meta: &Member, name: &str, force: bool) -> ApiResult<Vec<u64>> {
    let key = format!("/volumes/{name}");
    let mut marked = false;
    for _ in 0..5 {
        let (mut record, version) = read_record(meta, name).await?;
        if record.state == VolumeState::Deleting {
            marked = true;
            break;
        }
        if record.state != VolumeState::Ready || !record.replicated() {
            return Err(ApiError::invalid(format!("{name} is not a replicated volume")));
        }
        if !force {
            let users = clients(meta, name).await?;
            if !users.is_empty() {
                let nodes: Vec<String> = users.iter().map(u64::to_string).collect();
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "{name} has NBD clients on node(s) {}; disconnect them or pass --force",
                        nodes.join(", ")
                    ),
                ));
            }
        }
        record.state = VolumeState::Deleting;
        let value = serde_json::to_vec(&record).expect("serializes");
        let ops = vec![
            Op::Put { key: key.clone(), value, lease: None },
            Op::Delete { key: format!("/volumes/{name}/owner") },
            Op::Delete { key: format!("/volumes/{name}/attach") },
        ];
        if write(meta, vec![Compare::Version(key.clone(), version)], ops).await? {
            tracing::info!(volume = name, force, "deleting the replicated volume");
            marked = true;
            break;
        }
        // The record changed meanwhile (a copy's state): look again.
    }
    if !marked {
        return Err(unavailable(format!("the record of {name} keeps changing; retry")));
    }
    // Linearizable reads: this member's applied state may not show the mark yet.
    let deadline = Instant::now() + T.delete_patience;
    loop {
        let left = fresh_record(meta, name)
            .await?
            .map(|(r, _)| r)
            .filter(|r| r.state == VolumeState::Deleting);
        match left {
            // Gone (or a new volume has the name already).
            None => return Ok(Vec::new()),
            Some(r) if Instant::now() >= deadline => {
                return Ok(r.components.iter().map(|c| c.node).collect())
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The nodes with NBD clients of `name` (a linearizable read).
pub(super) async fn clients(meta: &Member, name: &str) -> ApiResult<Vec<u64>> {
    let prefix = clients_prefix(name);
    let request = ClientRequest::Range { prefix: prefix.clone(), limit: usize::MAX };
    match meta.request(request).await.map_err(unavailable)? {
        ClientReply::Range { entries, .. } => Ok(entries
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).and_then(|n| n.parse().ok()))
            .collect()),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// Exports replicated volume `name` here now if this member's state has it (a client
/// asked for it before the steward's next round: made a moment ago on another node).
pub fn discover(
    node: &Node,
    meta: &Arc<Member>,
    runtime: &tokio::runtime::Handle,
    name: &str,
) -> bool {
    let record = applied_record(meta, name);
    let Some(record) = record.filter(|r| r.replicated() && r.state == VolumeState::Ready) else {
        return false;
    };
    let _runtime = runtime.enter();
    export_router(node, name, || Arc::new(Router::new(meta.clone(), &record)));
    true
}

/// Each node's bookkeeping of replicated volumes, every `T.steward_every` until the process
/// ends: deletes (invariant 7), the `clients` keys, and copies no record lists.
pub(super) async fn housekeeping(node: Arc<Node>, meta: Arc<Member>) {
    let mut looked_for_removed = Instant::now();
    loop {
        tokio::time::sleep(T.steward_every).await;
        if !meta.registered() {
            continue;
        }
        retire_deleted(&node, &meta).await;
        unexport_unrecorded(&node, &meta).await;
        publish_clients(&node, &meta).await;
        remove_orphans(&node, &meta).await;
        if looked_for_removed.elapsed() >= T.replace_every {
            looked_for_removed = Instant::now();
            replace_removed_copies(&node, &meta).await;
        }
    }
}

/// Places again the copies of removed nodes of every volume this node owns (invariant
/// 9), with one linearizable read of the membership for all of them (none when it owns
/// none).
pub(super) async fn replace_removed_copies(node: &Node, meta: &Member) {
    let owned: Vec<_> = owned(node).into_iter().filter(|v| v.serving()).collect();
    if owned.is_empty() {
        return;
    }
    let members = match members(meta).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("placing copies again: the membership: {}", e.message);
            return;
        }
    };
    for view in owned {
        // Placed (and handed over): the view is deposed, its resync task ends, and the
        // steward takes the volume again at the next epoch.
        if let Err(e) = view.replace_removed(&members).await {
            tracing::warn!(volume = %view.name, "placing a copy again: {e}");
        }
    }
}

/// Stops exporting a volume whose record is gone (a steward round that read the record
/// before its delete may have exported it again): confirmed by a linearizable read, as
/// this member's state may not show a volume just made here yet.
pub(super) async fn unexport_unrecorded(node: &Node, meta: &Member) {
    let recorded = |r: Option<&VolumeRecord>| {
        r.is_some_and(|r| r.replicated() && r.state == VolumeState::Ready)
    };
    for name in node.replicated_names() {
        if surely_not(meta, &name, recorded).await {
            unexport(node, meta, &name, "the volume is deleted").await;
        }
    }
}

/// Whether `holds` is false of volume `name`'s record both in this member's applied
/// state and in a linearizable read: the applied state may lag (a volume just made
/// elsewhere, a member just restarted). False when the read fails.
pub(super) async fn surely_not(
    meta: &Member,
    name: &str,
    holds: impl Fn(Option<&VolumeRecord>) -> bool,
) -> bool {
    if holds(applied_record(meta, name).as_ref()) {
        return false;
    }
    fresh_record(meta, name).await.is_ok_and(|fresh| !holds(fresh.as_ref().map(|(r, _)| r)))
}

/// Stops exporting `name` here (its clients are disconnected, this node's view of it
/// deposed) and takes back this node's `clients` key for it.
pub(super) async fn unexport(node: &Node, meta: &Member, name: &str, why: &str) {
    if let Some(router) = unexport_router(node, name) {
        if let Some(view) = router.view() {
            view.depose(why);
        }
        router.clear();
        tracing::info!(volume = %name, "no longer exported: {why}");
    }
    let key = format!("{}{}", clients_prefix(name), meta.id());
    if meta.read_local(|s| s.get(&key).is_some()) {
        let _ = write(meta, vec![], vec![Op::Delete { key }]).await;
    }
}

/// Keeps this node's `clients` keys (its count of NBD connections) true (checked
/// against its applied state; written only on a change).
pub(super) async fn publish_clients(node: &Node, meta: &Member) {
    let Some(lease) = meta.session_lease() else { return };
    for name in node.replicated_names() {
        let used = node.replicated_connections(&name);
        let key = format!("{}{}", clients_prefix(&name), meta.id());
        let published = meta.read_local(|s| s.get(&key).map(|e| e.value.clone()));
        let want = (used > 0).then(|| used.to_string().into_bytes());
        if published == want {
            continue;
        }
        let op = if used > 0 {
            Op::Put { key, value: used.to_string().into_bytes(), lease: Some(lease) }
        } else {
            Op::Delete { key }
        };
        let _ = write(meta, vec![], vec![op]).await;
    }
}

/// This node's part in deleting volumes (invariant 7): it stops exporting each volume
/// being deleted, removes its copies of it and takes them out of the record; and takes
/// out the copies of nodes no longer in the cluster.
pub(super) async fn retire_deleted(node: &Arc<Node>, meta: &Member) {
    let me = meta.id();
    let deleting: Vec<VolumeRecord> = meta.read_local(|s| {
        records(s).filter(|r| r.replicated() && r.state == VolumeState::Deleting).collect()
    });
    for record in deleting {
        let name = &record.name;
        unexport(node, meta, name, "the volume is being deleted").await;
        remove_bitmaps(&node.dir().join("bitmaps"), name);
        let mut removed = true;
        for c in record.components.iter().filter(|c| c.node == me) {
            let (n, id) = (node.clone(), c.id);
            match tokio::task::spawn_blocking(move || n.component_remove(id)).await {
                Ok(Ok(())) => {
                    tracing::info!(volume = %name, component = id, "removed this node's copy")
                }
                Ok(Err(e)) if e.code == ErrorCode::NotFound => {}
                Ok(Err(e)) => {
                    tracing::warn!(volume = %name, component = id, "cannot remove: {}", e.message);
                    removed = false;
                }
                Err(e) => {
                    tracing::warn!(volume = %name, component = id, "cannot remove: {e}");
                    removed = false;
                }
            }
        }
        if removed && record.components.iter().any(|c| c.node == me) {
            forget_copies(meta, name, |n| n == me).await;
        }
        // A node that will never return cannot take its own copy out.
        let away: Vec<u64> = record
            .components
            .iter()
            .map(|c| c.node)
            .filter(|n| !meta.read_local(|s| s.session(*n).is_some_and(|x| x.up)))
            .collect();
        if !away.is_empty() {
            if let Ok(all) = members(meta).await {
                let members: BTreeSet<u64> = all.iter().map(|(m, _)| m.id).collect();
                if away.iter().any(|n| !members.contains(n)) {
                    forget_copies(meta, name, |n| !members.contains(&n)).await;
                }
            }
        }
    }
}

/// Takes the copies on nodes `gone` picks out of deleting volume `name`'s record; the
/// last copy out deletes the record (and the name is free).
pub(super) async fn forget_copies(meta: &Member, name: &str, gone: impl Fn(u64) -> bool) {
    let key = format!("/volumes/{name}");
    for _ in 0..5 {
        let Ok((mut record, version)) = read_record(meta, name).await else { return };
        if record.state != VolumeState::Deleting {
            return;
        }
        record.components.retain(|c| !gone(c.node));
        let ops = if record.components.is_empty() {
            vec![
                Op::Delete { key: key.clone() },
                Op::Delete { key: format!("/volumes/{name}/owner") },
                Op::Delete { key: format!("/volumes/{name}/attach") },
            ]
        } else {
            let value = serde_json::to_vec(&record).expect("serializes");
            vec![Op::Put { key: key.clone(), value, lease: None }]
        };
        match write(meta, vec![Compare::Version(key.clone(), version)], ops).await {
            Ok(true) => {
                if record.components.is_empty() {
                    tracing::info!(volume = name, "deleted: every copy is removed");
                }
                return;
            }
            Ok(false) => continue,
            Err(_) => return, // Tried again at the next round.
        }
    }
}

/// Removes the synchronization bitmaps of volume `name` (`<name>.<node>.<id>`).
pub(super) fn remove_bitmaps(dir: &std::path::Path, name: &str) {
    let Ok(files) = std::fs::read_dir(dir) else { return };
    for f in files.flatten() {
        let file = f.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(name)?.strip_prefix('.')) else {
            continue;
        };
        let rest = rest.strip_suffix(".tmp").unwrap_or(rest);
        let ours = rest
            .split_once('.')
            .is_some_and(|(n, id)| n.parse::<u64>().is_ok() && id.parse::<u64>().is_ok());
        if ours {
            let _ = std::fs::remove_file(f.path());
        }
    }
}

/// Removes the copies held here that no volume's record lists (invariant 7).
pub(super) async fn remove_orphans(node: &Arc<Node>, meta: &Member) {
    let me = meta.id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let listed = |record: Option<&VolumeRecord>, id: u64| {
        record.is_some_and(|r| {
            r.state == VolumeState::Creating
                || r.components.iter().any(|c| c.node == me && c.id == id)
        })
    };
    for (id, volume, made) in node.components() {
        if now.saturating_sub(made) < ORPHAN_GRACE_SECS {
            continue;
        }
        if !surely_not(meta, &volume, |r| listed(r, id)).await {
            continue;
        }
        let n = node.clone();
        match tokio::task::spawn_blocking(move || n.component_remove(id)).await {
            Ok(Ok(())) => tracing::warn!(
                volume = %volume,
                component = id,
                "removed a copy that no volume's record lists"
            ),
            Ok(Err(e)) => {
                tracing::warn!(component = id, "cannot remove an unlisted copy: {}", e.message)
            }
            Err(e) => tracing::warn!(component = id, "cannot remove an unlisted copy: {e}"),
        }
    }
}
