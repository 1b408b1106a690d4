//! One node's volumes: the catalog (names → ids), the open volumes, attachment counts.
//!
//! Data directory layout (format 1):
//! ```text
//! DIR/lock           flock'ed by the running process; holds its pid (informational)
//! DIR/catalog.json   {"format":1,"next_id":N,"volumes":[{"id":..,"name":..,"created_unix":..}]}
//! DIR/volumes/       the store (strata_io::FileStore), volumes keyed by id
//! ```
//! Invariants:
//! - The catalog is replaced atomically (write, fsync, rename, fsync dir): a crash leaves
//!   the old or the new catalog, never a mix.
//! - A volume exists iff the catalog names it. Create writes the store first and the
//!   catalog last; delete removes from the catalog first and the store last. A store
//!   volume the catalog does not name is the leftover of a crash and is removed at open.
//! - Names are never paths: the store only sees ids.

use crate::error::{ApiError, ApiResult};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use strata_io::{BlockVolume, FileStore, GroupSync, Store, VolumeId};
use strata_nbd::{Export, ExportProvider, ExportSummary};
use strata_types::limits::VOLUMES_MAX;
use strata_types::{format_size, ErrorCode, VolumeName};
use tokio::sync::watch;

const CATALOG_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Default)]
struct Catalog {
    format: u32,
    next_id: u64,
    volumes: Vec<CatalogEntry>,
}

#[derive(Serialize, Deserialize, Clone)]
struct CatalogEntry {
    id: u64,
    name: VolumeName,
    created_unix: u64,
}

struct OpenVolume {
    entry: CatalogEntry,
    volume: Arc<dyn BlockVolume>,
    group_sync: GroupSync,
    attached: Arc<AtomicUsize>,
    close: watch::Sender<bool>,
}

/// What the API shows of a volume.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VolumeInfo {
    /// The name.
    pub name: String,
    /// The store id (hex).
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Size for humans.
    pub size: String,
    /// Bytes the volume occupies on disk.
    pub allocated_bytes: u64,
    /// NBD connections attached now.
    pub connections: usize,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The NBD URI to connect to.
    pub export_uri: String,
}

/// A node's volumes.
pub struct Node {
    dir: PathBuf,
    store: FileStore,
    nbd_addr: Mutex<String>,
    state: Mutex<State>,
}

struct State {
    next_id: u64,
    volumes: BTreeMap<String, OpenVolume>,
}

fn internal(context: &str) -> impl FnOnce(strata_io::StoreError) -> ApiError + '_ {
    move |e| match e {
        strata_io::StoreError::NoSpace => {
            ApiError::new(ErrorCode::NoSpace, format!("{context}: {e}"))
        }
        e => ApiError::new(ErrorCode::Io, format!("{context}: {e}")),
    }
}

impl Node {
    /// Opens the node's data in `dir` (which the caller has locked): reads the catalog,
    /// opens every volume and removes what a crash left half-made.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Node>> {
        use anyhow::Context;
        let store = FileStore::open(&dir.join("volumes")).context("open the volume store")?;
        let catalog_path = dir.join("catalog.json");
        let catalog: Catalog = match std::fs::read(&catalog_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is corrupt or not a Strata catalog", catalog_path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Catalog { format: CATALOG_FORMAT, next_id: 1, volumes: Vec::new() }
            }
            Err(e) => return Err(e).context("read the catalog"),
        };
        if catalog.format != CATALOG_FORMAT {
            anyhow::bail!(
                "{} has format {}, this strata reads format {CATALOG_FORMAT}",
                catalog_path.display(),
                catalog.format
            );
        }
        let mut volumes = BTreeMap::new();
        let mut next_id = catalog.next_id;
        for entry in catalog.volumes {
            let volume = store
                .open_volume(VolumeId(entry.id))
                .with_context(|| format!("open volume {}", entry.name))?;
            next_id = next_id.max(entry.id + 1);
            volumes.insert(entry.name.to_string(), Self::opened(entry, volume));
        }
        for id in store.volume_ids().context("list the store")? {
            if !volumes.values().any(|v: &OpenVolume| v.entry.id == id.0) {
                tracing::warn!(%id, "removing a volume a crash left without a catalog entry");
                store.remove_volume(id).context("remove an orphan volume")?;
            }
        }
        let node = Node {
            dir: dir.to_owned(),
            store,
            nbd_addr: Mutex::new(String::from("127.0.0.1:10809")),
            state: Mutex::new(State { next_id, volumes }),
        };
        Ok(Arc::new(node))
    }

    fn opened(entry: CatalogEntry, volume: Arc<dyn BlockVolume>) -> OpenVolume {
        OpenVolume {
            entry,
            group_sync: GroupSync::spawn(volume.clone()),
            volume,
            attached: Arc::new(AtomicUsize::new(0)),
            close: watch::channel(false).0,
        }
    }

    /// Records the NBD address, for export URIs.
    pub fn set_nbd_addr(&self, addr: String) {
        *self.nbd_addr.lock().expect("not poisoned") = addr;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, state: &State) -> ApiResult<()> {
        let catalog = Catalog {
            format: CATALOG_FORMAT,
            next_id: state.next_id,
            volumes: state.volumes.values().map(|v| v.entry.clone()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&catalog).expect("catalog serializes");
        write_atomically(&self.dir, "catalog.json", &bytes)
            .map_err(|e| ApiError::new(ErrorCode::Io, format!("write the catalog: {e}")))
    }

    fn info(&self, v: &OpenVolume) -> VolumeInfo {
        let size_bytes = v.volume.size_bytes();
        VolumeInfo {
            name: v.entry.name.to_string(),
            id: VolumeId(v.entry.id).to_string(),
            size_bytes,
            size: format_size(size_bytes),
            allocated_bytes: v.volume.allocated_bytes().unwrap_or(0),
            connections: v.attached.load(Ordering::Relaxed),
            created_unix: v.entry.created_unix,
            export_uri: format!(
                "nbd://{}/{}",
                self.nbd_addr.lock().expect("not poisoned"),
                v.entry.name
            ),
        }
    }

    /// Every volume.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let state = self.lock();
        state.volumes.values().map(|v| self.info(v)).collect()
    }

    /// One volume.
    pub fn get(&self, name: &str) -> ApiResult<VolumeInfo> {
        let state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.info(v))
    }

    /// Creates a volume. Blocks on disk syncs: call from a blocking context.
    pub fn create(&self, name: VolumeName, size_bytes: u64) -> ApiResult<VolumeInfo> {
        let mut state = self.lock();
        if state.volumes.contains_key(name.as_str()) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        if state.volumes.len() >= VOLUMES_MAX {
            return Err(ApiError::new(
                ErrorCode::NoSpace,
                format!("this node holds the maximum of {VOLUMES_MAX} volumes"),
            ));
        }
        let free = self.store.free_bytes().unwrap_or(u64::MAX);
        let id = state.next_id;
        let volume = self
            .store
            .create_volume(VolumeId(id), size_bytes)
            .map_err(internal("create the volume"))?;
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let entry = CatalogEntry { id, name: name.clone(), created_unix };
        state.next_id = id + 1;
        state.volumes.insert(name.to_string(), Self::opened(entry, volume));
        if let Err(e) = self.persist(&state) {
            // Undo: the volume must not exist unless the catalog names it.
            state.volumes.remove(name.as_str());
            let _ = self.store.remove_volume(VolumeId(id));
            return Err(e);
        }
        if size_bytes > free {
            tracing::info!(volume = %name, "volume is larger than the free space (thin)");
        }
        tracing::info!(volume = %name, size = size_bytes, "volume created");
        Ok(self.info(&state.volumes[name.as_str()]))
    }

    /// Resizes a volume. Shrinking needs `allow_shrink`.
    pub fn resize(&self, name: &str, size_bytes: u64, allow_shrink: bool) -> ApiResult<VolumeInfo> {
        let state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        let current = v.volume.size_bytes();
        if size_bytes < current && !allow_shrink {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "shrinking {name} from {} to {} discards data; \
                     pass --allow-shrink (API: allow_shrink) to do it",
                    format_size(current),
                    format_size(size_bytes)
                ),
            ));
        }
        if size_bytes != current {
            v.volume.resize(size_bytes).map_err(internal("resize the volume"))?;
            tracing::info!(volume = %name, from = current, to = size_bytes, "volume resized");
        }
        Ok(self.info(v))
    }

    /// Deletes a volume; refused while attached unless `force`, which drops the clients.
    pub fn delete(&self, name: &str, force: bool) -> ApiResult<()> {
        let mut state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        let attached = v.attached.load(Ordering::Relaxed);
        if attached > 0 && !force {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!("{name} has {attached} NBD connection(s); disconnect them or pass --force"),
            ));
        }
        let v = state.volumes.remove(name).expect("checked above");
        if let Err(e) = self.persist(&state) {
            state.volumes.insert(name.to_owned(), v);
            return Err(e);
        }
        v.close.send_replace(true);
        self.store.remove_volume(VolumeId(v.entry.id)).map_err(internal("remove the volume"))?;
        tracing::info!(volume = %name, forced = force && attached > 0, "volume deleted");
        Ok(())
    }

    /// Syncs every volume (at shutdown).
    pub fn sync_all(&self) -> anyhow::Result<()> {
        let state = self.lock();
        for v in state.volumes.values() {
            v.volume.sync().map_err(|e| anyhow::anyhow!("sync volume {}: {e}", v.entry.name))?;
        }
        Ok(())
    }

    /// Free bytes in the store.
    pub fn free_bytes(&self) -> u64 {
        self.store.free_bytes().unwrap_or(0)
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}"))
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new file.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Decrements the attachment count when a connection ends.
struct Attachment(Arc<AtomicUsize>);

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the node's volumes as NBD exports.
pub struct Exports(pub Arc<Node>);

impl ExportProvider for Exports {
    fn list(&self) -> Vec<ExportSummary> {
        let state = self.0.lock();
        state
            .volumes
            .values()
            .map(|v| ExportSummary {
                name: v.entry.name.to_string(),
                description: format!("Strata volume, {}", format_size(v.volume.size_bytes())),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Export, String> {
        let state = self.0.lock();
        let Some(v) = state.volumes.get(name) else {
            return Err(if name.is_empty() {
                "there is no default export: name a volume (see `strata volume list`)".to_owned()
            } else {
                format!("no volume named {name:?} (see `strata volume list`)")
            });
        };
        v.attached.fetch_add(1, Ordering::Relaxed);
        Ok(Export {
            name: v.entry.name.to_string(),
            description: format!("Strata volume, {}", format_size(v.volume.size_bytes())),
            volume: v.volume.clone(),
            group_sync: v.group_sync.clone(),
            read_only: false,
            closed: v.close.subscribe(),
            attachment: Box::new(Attachment(v.attached.clone())),
        })
    }
}
