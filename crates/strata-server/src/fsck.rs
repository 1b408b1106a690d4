//! `strata fsck`: the offline check of a data directory. It takes the directory's lock
//! (so it refuses while a node runs on it), replays the store's log read-only (nothing is
//! written: no orphan is removed, no catalog rewritten), and checks every tree of every
//! volume and snapshot, sharing the work for pages snapshots share, the VBA map against
//! the trees both ways, and with `--data` every live block's crc32c. It reports leftovers
//! of an interrupted operation (which the node repairs when it opens) as notes, and any
//! inconsistency as a finding with a non-zero exit.

use crate::up::lock_data_dir;
use anyhow::Context;
use std::path::PathBuf;
use strata_store::engine::ViewInfo;

/// Arguments of `strata fsck`.
#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// The data directory to check (the node must be stopped).
    #[arg(long, default_value = "./strata-data")]
    data_dir: PathBuf,
    /// Also read every live block and check its checksum.
    #[arg(long)]
    data: bool,
}

/// What fsck found.
#[derive(serde::Serialize, Debug, Default)]
pub struct Report {
    /// Volumes checked.
    pub volumes: usize,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Whether block checksums were read.
    pub data_checked: bool,
    /// Inconsistencies: each one makes fsck fail.
    pub findings: Vec<String>,
    /// Harmless leftovers the node repairs at its next start.
    pub notes: Vec<String>,
}

/// Runs fsck; the exit is non-zero when there are findings.
pub fn run(args: FsckArgs, json_out: bool) -> anyhow::Result<bool> {
    let dir = &args.data_dir;
    if !dir.join("store").join(strata_store::store::LOG_FILE).exists() {
        anyhow::bail!("{} holds no Strata store (no store/log)", dir.display());
    }
    let _lock = lock_data_dir(dir)?;
    let report = check(&args)?;
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "checked {} volume(s), {} snapshot(s){}",
            report.volumes,
            report.snapshots,
            if report.data_checked { ", every live block's checksum" } else { "" }
        );
        for note in &report.notes {
            outln!("note: {note}");
        }
        for finding in &report.findings {
            outln!("FINDING: {finding}");
        }
        if report.findings.is_empty() {
            outln!("clean");
        }
    }
    Ok(report.findings.is_empty())
}

fn check(args: &FsckArgs) -> anyhow::Result<Report> {
    let dir = &args.data_dir;
    let mut report = Report { data_checked: args.data, ..Report::default() };
    let store = match strata_store::LogStore::open_read_only(&dir.join("store")) {
        Ok(store) => store,
        Err(e) => {
            report.findings.push(format!("the store's log does not open: {e}"));
            return Ok(report);
        }
    };
    let ids = store.view_ids();
    for id in &ids {
        match store.info(*id) {
            Ok(ViewInfo::Volume { .. }) => report.volumes += 1,
            Ok(ViewInfo::Snapshot { .. }) => report.snapshots += 1,
            Err(e) => report.findings.push(format!("view {id}: {e}")),
        }
    }
    // Reading every block takes a while: its progress on stderr (`progress.rs`).
    let mut bar: Option<crate::progress::Progress> = None;
    let findings = store.check_with(args.data, &mut |done, total| {
        bar.get_or_insert_with(|| crate::progress::Progress::new("checking blocks", total))
            .update(done)
    });
    if let Some(bar) = &mut bar {
        bar.finish();
    }
    report.findings.extend(findings);
    // The catalog names what the store holds; differences are an interrupted operation.
    let catalog_path = dir.join("catalog.json");
    match std::fs::read(&catalog_path) {
        Ok(bytes) => {
            let catalog: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not JSON", catalog_path.display()))?;
            let mut named = std::collections::HashSet::new();
            for v in catalog["volumes"].as_array().into_iter().flatten() {
                let name = v["name"].as_str().unwrap_or("?");
                for (id, what) in std::iter::once((v["id"].as_u64(), name.to_owned())).chain(
                    v["snapshots"].as_array().into_iter().flatten().map(|s| {
                        (s["id"].as_u64(), format!("{name}@{}", s["name"].as_str().unwrap_or("?")))
                    }),
                ) {
                    match id {
                        Some(id) if ids.contains(&id) => {
                            named.insert(id);
                        }
                        Some(_) => report.notes.push(format!(
                            "{what} is in the catalog but not in the store (an interrupted \
                             delete; the node drops it at start)"
                        )),
                        None => report.findings.push(format!("{what}: catalog entry has no id")),
                    }
                }
            }
            for c in catalog["components"].as_array().into_iter().flatten() {
                match c["id"].as_u64() {
                    Some(id) if ids.contains(&id) => {
                        named.insert(id);
                    }
                    Some(id) => report.notes.push(format!(
                        "component {id} is in the catalog but not in the store (an \
                         interrupted removal; the node drops it at start)"
                    )),
                    None => report.findings.push("a component entry has no id".into()),
                }
                // A replicated volume's snapshots on this copy (by the cluster's key).
                for snap in c["snapshots"].as_array().into_iter().flatten() {
                    let key = snap["key"].as_u64().unwrap_or(0);
                    match snap["id"].as_u64() {
                        Some(id) if ids.contains(&id) => {
                            named.insert(id);
                        }
                        Some(_) => report.notes.push(format!(
                            "snapshot {key} of component {} is in the catalog but not in the \
                             store (an interrupted removal; the node drops it at start)",
                            c["id"].as_u64().unwrap_or(0)
                        )),
                        None => report.findings.push(format!(
                            "snapshot {key} of a component: catalog entry has no id"
                        )),
                    }
                }
            }
            for id in ids.iter().filter(|id| !named.contains(id)) {
                report.notes.push(format!(
                    "store view {id} has no catalog entry (an interrupted create; the node \
                     removes it at start)"
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !ids.is_empty() {
                report.findings.push("the store holds volumes but there is no catalog".into());
            }
        }
        Err(e) => return Err(e).context("read the catalog"),
    }
    Ok(report)
}
