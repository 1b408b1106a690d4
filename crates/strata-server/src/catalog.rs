//! The node's catalog on disk (`DIR/catalog.json`): names to store ids of its volumes,
//! snapshots and copies of replicated volumes, with their access lists. [`decode`] reads
//! untrusted bytes (a file a crash, a disk or an operator may have damaged) into a
//! [`Catalog`], or says clearly what is wrong; it never panics (the `catalog` fuzz target
//! runs it). What the catalog means, and how it is kept crash-safe, is `node`'s (see its
//! header).

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;
use strata_types::{AccessList, VolumeName};

/// The catalog format this strata reads and writes.
pub const CATALOG_FORMAT: u32 = 2;

/// The whole catalog.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// [`CATALOG_FORMAT`].
    pub format: u32,
    /// The next store id to hand out.
    pub next_id: u64,
    /// The volumes (their snapshots within).
    pub volumes: Vec<CatalogEntry>,
    /// Components this node holds of replicated volumes (owned by the data plane).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentEntry>,
}

/// A copy (component) of a replicated volume held here.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ComponentEntry {
    /// Its store id.
    pub id: u64,
    /// The volume it is a component of.
    pub volume: String,
    /// When it was made (Unix seconds).
    pub created_unix: u64,
    /// Its snapshots (its volume's, by the cluster's key: `strata_replica::snapshot`),
    /// oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<ComponentSnapshot>,
}

/// A snapshot of a component: the store snapshot that holds a replicated volume's
/// snapshot `key` on this node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ComponentSnapshot {
    /// The volume's snapshot key (the same on every copy's node).
    pub key: u64,
    /// Its store id here.
    pub id: u64,
    /// When it was taken here (Unix seconds).
    pub created_unix: u64,
}

/// A volume of this node.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// Its store id.
    pub id: u64,
    /// Its name.
    pub name: VolumeName,
    /// When it was made (Unix seconds).
    pub created_unix: u64,
    /// `VOL@SNAP` this volume was cloned from, when it is a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Who may open its exports (its snapshots' too); a catalog without it: anyone.
    #[serde(default, skip_serializing_if = "AccessList::is_empty")]
    pub access: AccessList,
    /// Its snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotEntry>,
}

/// A snapshot of a volume.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// Its store id.
    pub id: u64,
    /// Its name (after the `@`).
    pub name: VolumeName,
    /// When it was taken (Unix seconds).
    pub created_unix: u64,
}

/// Decodes the catalog file's bytes (`dir` is the data directory, for the messages).
pub fn decode(bytes: &[u8], dir: &Path) -> anyhow::Result<Catalog> {
    let path = dir.join("catalog.json");
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .with_context(|| format!("{} is corrupt or not a Strata catalog", path.display()))?;
    let format = value.get("format").and_then(|f| f.as_u64());
    if format == Some(1) {
        anyhow::bail!(
            "{} holds volumes in the format of strata 0.1 (one file per volume under {}); \
             this strata stores them in a log and does not read that format. Copy each \
             volume out with a 0.1 node (qemu-img convert nbd://...) into a new data \
             directory; this one was not changed",
            dir.display(),
            dir.join("volumes").display()
        );
    }
    if format != Some(u64::from(CATALOG_FORMAT)) {
        anyhow::bail!(
            "{} has format {}, this strata reads format {CATALOG_FORMAT}",
            path.display(),
            format.map_or("(none)".to_owned(), |f| f.to_string())
        );
    }
    serde_json::from_value(value)
        .with_context(|| format!("{} is corrupt or not a Strata catalog", path.display()))
}
