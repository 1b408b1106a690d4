//! Following a long operation from the CLI until it ends (issue 6): a replicated volume's
//! resync (`strata volume info NAME --watch`) and the reuse of the space a deleted
//! snapshot held (`strata snapshot delete VOL@SNAP --wait`). Both poll the API and draw
//! one bar (`progress.rs`: redrawn on a terminal, plain lines otherwise, on stderr).
//!
//! Neither waits forever on a node it cannot reach: after [`UNREACHABLE_MAX`] without an
//! answer it fails. The reclaim wait also ends when its figure has not moved for
//! [`STALL_MAX`] (the cleaner may never take some of it), saying what remains and why.

use crate::apiclient::{Client, Failure};
use crate::node::{Reclaim, VolumeInfo};
use crate::progress::Progress;
use anyhow::bail;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use strata_replica::record::{ComponentRecord, CopyState};
use strata_types::format_size;

/// How often the API is asked.
const POLL: Duration = Duration::from_millis(500);
/// How long the API may go without answering before the command gives up.
const UNREACHABLE_MAX: Duration = Duration::from_secs(30);
/// How long a reclaim's waiting bytes may stay put before the wait ends: the cleaner
/// looks every 0.5 s and takes up to 4 segments (128 MiB) a look, so 10 s of nothing
/// means it is not going to.
const STALL_MAX: Duration = Duration::from_secs(10);

/// Asks `client` for `path`, retrying through short outages: `Ok(None)` while the API
/// has not answered for less than [`UNREACHABLE_MAX`] (telling once that it waits).
struct Poller<'a> {
    client: &'a Client,
    down_since: Option<Instant>,
}

impl Poller<'_> {
    fn get(&mut self, path: &str, bar: &mut Option<Progress>) -> anyhow::Result<Option<Value>> {
        match self.client.try_call("GET", path, None) {
            Ok(v) => {
                if self.down_since.take().is_some() {
                    note(bar, &format!("the API at {} answers again", self.client.base()));
                }
                Ok(Some(v))
            }
            Err(Failure::Refused { code, message }) if code == "not_found" => {
                bail!("{message} ({code})")
            }
            Err(failure) => {
                let e = match failure {
                    Failure::Refused { code, message } => anyhow::anyhow!("{message} ({code})"),
                    Failure::Unreachable(e) => e,
                };
                let since = *self.down_since.get_or_insert_with(|| {
                    note(bar, &format!("{e:#}; retrying for {}s", UNREACHABLE_MAX.as_secs()));
                    Instant::now()
                });
                if since.elapsed() >= UNREACHABLE_MAX {
                    bail!("gave up after {}s without an answer: {e:#}", UNREACHABLE_MAX.as_secs());
                }
                Ok(None)
            }
        }
    }
}

fn note(bar: &mut Option<Progress>, line: &str) {
    match bar {
        Some(bar) => bar.note(line),
        None => eprintln!("{line}"),
    }
}

/// Bytes left to copy to the copies that are not active, if the answer has the owner's
/// live figures (a node that does not own the volume knows only the states).
fn resync_left(components: &[ComponentRecord]) -> Option<u64> {
    components
        .iter()
        .filter(|c| c.state != CopyState::Active)
        .map(|c| Some(c.dirty_bytes? + c.scan_left_bytes.unwrap_or(0)))
        .sum()
}

fn all_active(components: &[ComponentRecord]) -> bool {
    components.iter().all(|c| c.state == CopyState::Active)
}

/// One line on a copy that changed state.
fn copy_line(name: &str, c: &ComponentRecord) -> String {
    let left = c.dirty_bytes.map(|d| d + c.scan_left_bytes.unwrap_or(0));
    let left = left.map_or(String::new(), |l| format!(", {} to copy", format_size(l)));
    match c.state {
        CopyState::Stale => format!(
            "{name}: node {}'s copy is stale{left}: it resyncs when node {} is back",
            c.node, c.node
        ),
        CopyState::Resyncing => format!("{name}: node {}'s copy is resyncing{left}", c.node),
        CopyState::Active => format!("{name}: node {}'s copy is active", c.node),
    }
}

/// The owner's API address, from the cluster's member list (`None` if unknown).
fn owner_api(client: &Client, owner: u64) -> Option<String> {
    let members = client.try_call("GET", "/v1/cluster/nodes", None).ok()?;
    let member = members.as_array()?.iter().find(|m| m["id"].as_u64() == Some(owner))?;
    let http = member["record"]["http"].as_str()?;
    // A wildcard listener is reached at the host of the node's RPC address.
    let http = match http.strip_prefix("0.0.0.0:").or_else(|| http.strip_prefix("[::]:")) {
        Some(port) => {
            let rpc = member["rpc"].as_str()?;
            format!("{}:{port}", rpc.rsplit_once(':')?.0)
        }
        None => http.to_owned(),
    };
    // Every node of a cluster serves HTTPS when this one does (each with its tls_dir).
    let scheme = if client.base().starts_with("https://") { "https" } else { "http" };
    Some(format!("{scheme}://{http}"))
}

/// `strata volume info NAME --watch`: follows the volume until every copy is active.
///
/// One bar for the whole volume, not one per copy: the question it answers is when the
/// volume is fully redundant again, which is when the last copy is done; a terminal
/// redraws one line in place, where several would need cursor movement; and the plain
/// lines of a log stay one per step. Each copy's change of state gets its own line.
/// The figures are the owner's (bytes its bitmap marks, plus what a digest scan still
/// has to compare); when the node asked is not the owner, the owner's API is asked for
/// them too. The total grows while a stale copy misses more writes.
pub fn watch_volume(client: &Client, name: &str, first: &VolumeInfo) -> anyhow::Result<()> {
    if first.components.is_empty() {
        eprintln!("{name} has one copy: nothing to resync");
        return Ok(());
    }
    if all_active(&first.components) {
        eprintln!("every copy of {name} is active: nothing to resync");
        return Ok(());
    }
    let path = format!("/v1/volumes/{}", crate::apiclient::encode(name));
    let mut poller = Poller { client, down_since: None };
    let mut bar: Option<Progress> = None;
    let mut states: BTreeMap<u64, CopyState> = BTreeMap::new();
    let mut owner: Option<(u64, Option<Client>)> = None;
    let (mut done, mut last_left): (u64, Option<u64>) = (0, None);
    let mut info = first.clone();
    let started = Instant::now();
    loop {
        for c in &info.components {
            if states.get(&c.node) != Some(&c.state) {
                if states.contains_key(&c.node) || c.state != CopyState::Active {
                    note(&mut bar, &copy_line(name, c));
                }
                states.insert(c.node, c.state);
            }
        }
        if all_active(&info.components) {
            // What was left at the last look got copied too.
            done += last_left.unwrap_or(0);
            // A copy can go from stale to active between two looks: the bar still ends
            // at 100 %, with what was copied.
            if done > 0 || bar.is_some() {
                let bar =
                    bar.get_or_insert_with(|| Progress::new(format!("resyncing {name}"), done));
                bar.set_total(done);
                bar.finish();
            }
            eprintln!(
                "every copy of {name} is active (copied {} in {}s)",
                format_size(done),
                started.elapsed().as_secs()
            );
            return Ok(());
        }
        let mut left = resync_left(&info.components);
        if left.is_none() {
            // Not the owner: ask the owner for the live figures.
            if owner.as_ref().is_none_or(|(n, _)| *n != info.node) {
                let api = owner_api(client, info.node);
                if let Some(api) = &api {
                    note(
                        &mut bar,
                        &format!("{name}: figures from its owner, node {} ({api})", info.node),
                    );
                }
                owner = Some((info.node, api.map(|a| client.other(&a))));
            }
            if let Some((_, Some(owner_client))) = &owner {
                let live = owner_client.try_call("GET", &path, None).ok();
                let live = live.and_then(|v| serde_json::from_value::<VolumeInfo>(v).ok());
                left = live.and_then(|v| resync_left(&v.components));
            }
        }
        if let Some(left) = left {
            // Done is what left fell by; the total is that and what is left, so a copy
            // that misses more writes while stale grows the total, not the done.
            done += last_left.map_or(0, |l| l.saturating_sub(left));
            last_left = Some(left);
            // The bar (and its rate's clock) starts with the copying: while every copy
            // not active waits for its node, the line above says so.
            let copying =
                done > 0 || info.components.iter().any(|c| c.state == CopyState::Resyncing);
            if copying || bar.is_some() {
                let bar =
                    bar.get_or_insert_with(|| Progress::new(format!("resyncing {name}"), left));
                bar.set_total(done + left);
                bar.update(done);
            }
        }
        std::thread::sleep(POLL);
        let v = match poller.get(&path, &mut bar) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                if let Some(bar) = &mut bar {
                    bar.stop();
                }
                bail!("while watching {name}: {e:#}");
            }
        };
        info = serde_json::from_value(v)?;
    }
}

/// `strata snapshot delete VOL@SNAP --wait`: after the delete, follows the space the
/// snapshot held alone until the log has reused all of it, or until it stops moving
/// ([`STALL_MAX`]), then says what remains and why.
pub fn wait_reclaim(client: &Client, full: &str, id: &str) -> anyhow::Result<()> {
    let mut poller = Poller { client, down_since: None };
    let mut bar: Option<Progress> = None;
    let mut moved = (u64::MAX, Instant::now());
    loop {
        let Some(node) = poller.get("/v1/node", &mut bar)? else {
            std::thread::sleep(POLL);
            continue;
        };
        let reclaim: Reclaim = serde_json::from_value(node["reclaim"].clone())?;
        let Some(r) = reclaim.snapshots.iter().find(|s| s.id == id) else {
            bail!(
                "the node no longer follows the deletion of {full} (it restarted, or {} \
                 snapshots were deleted since); GET /v1/node shows the space still dead",
                strata_store::store::RECLAIMS_TRACKED
            );
        };
        if r.freed_bytes == 0 {
            eprintln!("{full} held no space of its own: nothing to reclaim");
            return Ok(());
        }
        let bar = bar.get_or_insert_with(|| Progress::new("reclaiming", r.freed_bytes));
        bar.update(r.freed_bytes - r.waiting_bytes);
        if r.waiting_bytes == 0 {
            bar.finish();
            eprintln!(
                "the {} {full} held alone is free: the log reuses it",
                format_size(r.freed_bytes)
            );
            return Ok(());
        }
        if r.waiting_bytes != moved.0 {
            moved = (r.waiting_bytes, Instant::now());
        } else if moved.1.elapsed() >= STALL_MAX {
            bar.stop();
            eprintln!("{}", stalled(full, r.freed_bytes, r.waiting_bytes, r.held_bytes, &reclaim));
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// What remains of a reclaim that stopped moving, and why.
fn stalled(full: &str, freed: u64, waiting: u64, held: u64, node: &Reclaim) -> String {
    let mut why = Vec::new();
    if !node.cleaner_running {
        why.push(format!(
            "the cleaner is not running: it runs once at least {} and more than {:.0}% of \
             the log are dead (now {} of {})",
            format_size(strata_store::store::CLEAN_DEAD_MIN_BYTES),
            strata_store::store::CLEAN_DEAD_SHARE * 100.0,
            format_size(node.dead_bytes),
            format_size(node.log_bytes)
        ));
    }
    if held > 0 {
        why.push(format!(
            "{} is in segments still more than a quarter live, or being written: the \
             cleaner leaves them until more of their blocks are overwritten or deleted",
            format_size(held)
        ));
    }
    if waiting > held && node.cleaner_running {
        why.push(format!("{} waits for the cleaner's next rounds", format_size(waiting - held)));
    }
    format!(
        "{full}: {} of {} reclaimed; {} remains, dead but not yet reusable:\n  {}\n\
         (the snapshot is deleted; its space is reused as the cleaner gets to it)",
        format_size(freed - waiting),
        format_size(freed),
        format_size(waiting),
        why.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(node: u64, state: CopyState, dirty: Option<u64>, scan: Option<u64>) -> ComponentRecord {
        ComponentRecord {
            node,
            id: node,
            state,
            dirty_bytes: dirty,
            resynced_bytes: None,
            scan_left_bytes: scan,
            lsn: None,
            stale_lsn: None,
            suspect: false,
        }
    }

    #[test]
    fn what_is_left_counts_the_copies_not_active_and_needs_the_owners_figures() {
        let copies = [
            copy(1, CopyState::Active, Some(0), Some(0)),
            copy(2, CopyState::Resyncing, Some(3 << 20), Some(1 << 20)),
            copy(3, CopyState::Stale, Some(1 << 20), None),
        ];
        assert_eq!(resync_left(&copies), Some(5 << 20));
        assert!(!all_active(&copies));
        let record =
            [copy(1, CopyState::Active, None, None), copy(2, CopyState::Stale, None, None)];
        assert_eq!(resync_left(&record), None, "a record without live figures");
        assert!(copy_line("r1", &copies[2]).contains("stale, 1M to copy: it resyncs when node 3"));
    }

    #[test]
    fn a_stalled_reclaim_says_what_remains_and_why() {
        let node = Reclaim {
            waiting_bytes: 3 << 20,
            cleaner_running: false,
            dead_bytes: 5 << 20,
            log_bytes: 64 << 20,
            snapshots: Vec::new(),
        };
        let text = stalled("vm1@s1", 4 << 20, 3 << 20, 1 << 20, &node);
        assert!(text.starts_with("vm1@s1: 1M of 4M reclaimed; 3M remains"), "{text}");
        assert!(text.contains("1M is in segments still more than a quarter live"), "{text}");
        assert!(text.contains("the cleaner is not running: it runs once at least 256M"), "{text}");
        assert!(text.contains("(now 5M of 64M)"), "{text}");
        let running = Reclaim { cleaner_running: true, ..node };
        let text = stalled("vm1@s1", 4 << 20, 3 << 20, 1 << 20, &running);
        assert!(text.contains("2M waits for the cleaner's next rounds"), "{text}");
        assert!(!text.contains("not running"), "{text}");
    }
}
