//! The HTTP API (axum): JSON under `/v1`, described by `/v1/openapi.json`; Prometheus
//! metrics at `/metrics`; the dashboard at `/` for browsers (`Accept: text/html`; others
//! get one line of text), its files under `/ui/`, all embedded in the binary.
//!
//! Every error is `{"code": "...", "message": "..."}` with a 4xx/5xx status, including
//! malformed JSON, unknown routes and wrong methods. Every request passes
//! [`crate::guard`] first, which refuses what a web page could send. Operations that sync
//! the disk run on the blocking pool.

use crate::access;
use crate::error::{ApiError, ApiResult};
use crate::node::{Node, SnapshotInfo, VolumeInfo};
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use strata_meta::service::{ClientReply, ClientRequest, Member, ServiceError};
use strata_replica::record::VolumeState;
use strata_types::{check_size, parse_size, AccessList, ErrorCode, VolumeName};

/// The OpenAPI document, kept beside the code it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The dashboard: a page, its style and its script (no other files, nothing fetched from
/// elsewhere: the page's Content-Security-Policy allows this node only).
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSP: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    /// The node.
    pub node: Arc<Node>,
    /// Where NBD listens.
    pub nbd_addr: String,
    /// Where HTTP listens.
    pub http_addr: String,
    /// When the node started.
    pub started: Instant,
    /// The data directory.
    pub data_dir: String,
    /// The node's metadata member.
    pub meta: Arc<Member>,
    /// The bearer token every request must carry (when HTTP listens beyond loopback).
    pub token: Option<String>,
    /// The cluster's volume registry.
    pub registry: Arc<crate::registry::Registry>,
}

impl Api {
    /// A replicated volume this node owns, with its copies as the owner sees them now.
    fn live(&self, mut v: VolumeInfo) -> VolumeInfo {
        if let Some(copies) = crate::replicated::live_copies(&self.node, &v.name) {
            v.components = copies;
        }
        crate::replicated::mark_suspects(&self.node, &self.meta, &mut v.components);
        // A replicated volume's id and space are its copy's here (the owner's, when this
        // node owns it; copies hold the same blocks once level).
        let me = self.meta.id();
        let here = v.components.iter().find(|c| c.node == me).map(|c| c.id);
        if let Some((id, allocated)) =
            here.and_then(|id| self.node.component_allocated(id).map(|a| (id, a)))
        {
            v.id = strata_io::VolumeId(id).to_string();
            v.allocated_bytes = allocated;
            v.exclusive_bytes = allocated;
        }
        v
    }

    /// Whether `name` is a replicated volume (not one of this node's own).
    fn replicated(&self, name: &str) -> bool {
        self.node.get(name).is_err() && self.registry.record(name).is_some_and(|r| r.replicated())
    }

    /// A local operation's result on volume `name`: on success the registry is told; a
    /// volume this node does not hold but another does gets an error saying where.
    fn local<T>(&self, name: &str, result: ApiResult<T>) -> ApiResult<T> {
        match result {
            Ok(v) => {
                self.registry.kick();
                Ok(v)
            }
            Err(e) if e.code == ErrorCode::NotFound => {
                Err(self.registry.elsewhere(name).unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes a volume named `name` here: the name is taken in the registry first, and
    /// given back if making it fails.
    async fn make<T: Send + 'static>(
        &self,
        name: &str,
        size_bytes: u64,
        f: impl FnOnce() -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        self.registry.reserve(name, size_bytes).await?;
        let made = blocking(f).await;
        if made.is_err() {
            self.registry.release(name).await;
        }
        self.registry.kick();
        made
    }
}

/// The file (in the data directory) holding the HTTP API's bearer token.
pub const TOKEN_FILE: &str = "api-token";

/// The bearer token the API requires when it listens on `http`: none on loopback; else
/// the one in `DIR/api-token`, created (random, mode 0600) on first use.
pub fn token_for(
    dir: &std::path::Path,
    http: std::net::SocketAddr,
) -> anyhow::Result<Option<String>> {
    if http.ip().is_loopback() {
        return Ok(None);
    }
    let path = dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            crate::files::warn_if_exposed(&path, "the API token");
            Ok(Some(t.trim().to_owned()))
        }
        Ok(_) => anyhow::bail!("the API token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = crate::config::random_bytes(24)?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            crate::config::write_private(&path, format!("{token}\n").as_bytes())
                .map_err(|e| anyhow::anyhow!("create {}: {e}", path.display()))?;
            Ok(Some(token))
        }
        Err(e) => anyhow::bail!("read {}: {e}", path.display()),
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time for equal lengths (the length of the token is no secret).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(api): State<Api>, request: Request, next: Next) -> Response {
    // The dashboard's files hold no data (its script asks for the token to read any).
    let path = request.uri().path();
    let public = path == "/" || path.starts_with("/ui/");
    if let (Some(token), false) = (&api.token, public) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.trim().as_bytes(), token.as_bytes())) {
            return ApiError::new(
                ErrorCode::Unauthorized,
                "this API needs `Authorization: Bearer TOKEN` (the token is in the node's \
                 data directory, file api-token; the CLI reads STRATA_TOKEN)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Builds the router (serve it inside [`crate::guard::Guard::around`]).
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ui/dashboard.css", get(|| asset("text/css; charset=utf-8", DASHBOARD_CSS)))
        .route("/ui/dashboard.js", get(|| asset("text/javascript; charset=utf-8", DASHBOARD_JS)))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/node", get(node_status))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/rollback", post(rollback_volume))
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/access", axum::routing::put(set_access))
        .route("/v1/volumes/{name}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/volumes/{name}/snapshots/{snapshot}", get(get_snapshot).delete(delete_snapshot))
        .route("/v1/volumes/{name}/snapshots/{snapshot}/clone", post(clone_snapshot))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/cluster/nodes", get(list_nodes).post(add_node))
        .route("/v1/cluster/nodes/{id}", axum::routing::delete(remove_node))
        .fallback(|| async {
            ApiError::new(ErrorCode::NotFound, "no such endpoint; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            let e = ApiError::invalid("method not allowed on this endpoint; see /v1/openapi.json");
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"code": "method_not_allowed", "message": e.message})),
            )
        })
        .layer(axum::middleware::from_fn_with_state(api.clone(), authenticate))
        .with_state(api)
}

/// The dashboard for a browser (`Accept` names `text/html`); one line of text otherwise,
/// as before there was a dashboard.
async fn index(headers: axum::http::HeaderMap) -> Response {
    let html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    if html {
        return (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            DASHBOARD_HTML,
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Strata node. API under /v1 (see /v1/openapi.json); metrics at /metrics; \
         open / in a browser for the dashboard.\n",
    )
        .into_response()
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    let text = crate::report::exposition(&api.node, &api.meta, || all_volumes(&api)).await;
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn stats(State(api): State<Api>) -> Json<crate::report::Stats> {
    Json(crate::report::stats(&api.node, api.started))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// What `GET /v1/node` returns.
#[derive(Serialize, Deserialize, Debug)]
pub struct NodeStatus {
    /// Strata version.
    pub version: String,
    /// Data directory.
    pub data_dir: String,
    /// NBD address.
    pub nbd: String,
    /// HTTP address.
    pub http: String,
    /// Number of volumes.
    pub volumes: usize,
    /// Free bytes in the file system holding the store.
    pub free_bytes: u64,
    /// Bytes the store's log occupies.
    pub log_bytes: u64,
    /// Bytes of live data in the store (shared blocks counted once).
    pub live_bytes: u64,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// This node's metadata member as it sees itself.
    pub meta: strata_meta::service::LocalStatus,
    /// Resync jobs this node runs now (at most `resync_jobs`, 2 by default).
    pub resync_running: usize,
    /// Resync jobs waiting for their turn.
    pub resync_waiting: usize,
    /// The space deleted snapshots held alone, until the log reuses it.
    pub reclaim: crate::node::Reclaim,
    /// The file system's space, the reserve client writes leave free, and whether the
    /// node is nearly full or refusing writes (absent from older nodes).
    #[serde(default)]
    pub space: crate::node::SpaceStatus,
}

async fn node_status(State(api): State<Api>) -> Json<NodeStatus> {
    Json(NodeStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        data_dir: api.data_dir.clone(),
        nbd: api.nbd_addr.clone(),
        http: api.http_addr.clone(),
        volumes: api.node.list().len(),
        free_bytes: api.node.free_bytes(),
        log_bytes: api.node.log_bytes(),
        live_bytes: api.node.live_bytes(),
        uptime_seconds: api.started.elapsed().as_secs(),
        meta: api.meta.local_status(),
        resync_running: api.node.resync_scheduler().load().running,
        resync_waiting: api.node.resync_scheduler().load().waiting,
        reclaim: api.node.reclaim(),
        space: api.node.space(),
    })
}

/// Every volume of the cluster: this node's, then the registry's others (a replicated
/// volume this node owns with its copies' live state), by name.
pub fn all_volumes(api: &Api) -> Vec<VolumeInfo> {
    let mut volumes = api.node.list();
    let local: std::collections::HashSet<String> = volumes.iter().map(|v| v.name.clone()).collect();
    let remote = api.registry.remote().into_iter().filter(|r| !local.contains(&r.name));
    volumes.extend(remote.map(|v| api.live(v)));
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    volumes
}

async fn list_volumes(State(api): State<Api>) -> Json<Vec<VolumeInfo>> {
    Json(all_volumes(&api))
}

async fn get_volume(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<Json<VolumeInfo>> {
    match api.node.get(&name) {
        Ok(v) => Ok(Json(v)),
        Err(e) => {
            let found = api.registry.remote().into_iter().find(|v| v.name == name);
            let deleting = || {
                let record =
                    api.registry.record(&name).filter(|r| r.state == VolumeState::Deleting);
                record.and_then(|_| api.registry.elsewhere(&name)).unwrap_or(e)
            };
            found.map(|v| Json(api.live(v))).ok_or_else(deleting)
        }
    }
}

/// A size: bytes as a number, or text with a suffix (`"10G"`); see [`SizeArg::bytes`].
#[derive(Deserialize, Debug)]
#[serde(transparent)]
pub struct SizeArg(serde_json::Value);

impl SizeArg {
    /// The size in bytes. A number is bytes; text is digits and M, G or T (any case, `B`
    /// or `iB` may follow; no spaces), which always names a multiple of 4096 bytes. Text
    /// in bytes or K (`"6K"`) is refused: which of those are multiples of 4096 no pattern
    /// of the OpenAPI document can say, and the CLI sends bytes.
    fn bytes(&self) -> ApiResult<u64> {
        let invalid = |e: strata_types::SizeError| ApiError::invalid(e.to_string());
        match &self.0 {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(b) => check_size(b).map_err(invalid),
                None => Err(ApiError::invalid(format!(
                    "size {n} is not a whole number of bytes (a multiple of 4096)"
                ))),
            },
            serde_json::Value::String(t) => {
                let digits = t.bytes().take_while(u8::is_ascii_digit).count();
                let unit = t[digits..].to_ascii_uppercase();
                let units = ["M", "MB", "MIB", "G", "GB", "GIB", "T", "TB", "TIB"];
                if digits == 0 || !units.contains(&unit.as_str()) {
                    return Err(ApiError::invalid(format!(
                        "size {t:?} is not digits and M, G or T (\"10G\" is 10 GiB); give \
                         other sizes as a number of bytes (a multiple of 4096)"
                    )));
                }
                parse_size(t).map_err(invalid)
            }
            other => Err(ApiError::invalid(format!(
                "size {other} is neither a number of bytes nor text like \"10G\""
            ))),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size: SizeArg,
    /// Copies on distinct nodes (1-3).
    #[serde(default)]
    replicas: Option<u32>,
    /// Copies that must be active for a write to succeed (default 1, 2 for 3 copies).
    #[serde(default)]
    min_replicas: Option<u32>,
    /// NBD access list: client certificate subjects (CN) admitted.
    #[serde(default)]
    allow: Vec<String>,
    /// NBD access list: networks (CIDR) admitted.
    #[serde(default)]
    allow_net: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ResizeVolume {
    size: SizeArg,
    #[serde(default)]
    allow_shrink: bool,
    /// Shrink even while clients are attached (they are disconnected first).
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad request body: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, format!("task failed: {e}"))))
}

async fn create_volume(
    State(api): State<Api>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<VolumeInfo>)> {
    let req: CreateVolume = parse_json(&body)?;
    let name = VolumeName::new(&req.name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let access = access::checked(req.allow, req.allow_net)?;
    let size = req.size.bytes()?;
    let replicas = req.replicas.unwrap_or(1);
    if !(1..=3).contains(&replicas) {
        return Err(ApiError::invalid(format!("replicas must be 1, 2 or 3, not {replicas}")));
    }
    let min_replicas = req.min_replicas.unwrap_or(if replicas == 3 { 2 } else { 1 });
    if !(1..=replicas).contains(&min_replicas) {
        return Err(ApiError::invalid(format!(
            "min_replicas must be between 1 and replicas ({replicas}), not {min_replicas}"
        )));
    }
    if replicas > 1 {
        if api.node.get(name.as_str()).is_ok() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {:?} already exists", name.as_str()),
            ));
        }
        // The arguments are checked by now: what create refuses as invalid (too few nodes
        // up for the copies) is the cluster's state.
        let info = crate::replicated::create(
            &api.node,
            &api.meta,
            &api.registry,
            name.as_str(),
            size,
            replicas,
            min_replicas,
            access,
        )
        .await
        .map_err(state_refusal)?;
        return Ok((StatusCode::CREATED, Json(info)));
    }
    let node = api.node.clone();
    let key = name.to_string();
    let info = api.make(&key, size, move || node.create(name, size, access)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn resize_volume(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<VolumeInfo>> {
    let req: ResizeVolume = parse_json(&body)?;
    let size = req.size.bytes()?;
    if api.replicated(&name) {
        let record = crate::replicated::resize(&api.node, &api.meta, &name, size).await?;
        return Ok(Json(api.live(crate::registry::info(&record, &api.nbd_addr))));
    }
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.resize(&n, size, req.allow_shrink, req.force)).await)
        .map(Json)
}

async fn delete_volume(
    State(api): State<Api>,
    Path(name): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("bad query: {e}")))?;
    if api.replicated(&name) {
        let left = crate::replicated::delete(&api.meta, &name, q.force).await?;
        if left.is_empty() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let nodes: Vec<String> = left.iter().map(u64::to_string).collect();
        let body = serde_json::json!({
            "message": format!(
                "{name} is deleted and no longer served; its copies on node(s) {} are \
                 removed when each is up again (the name is taken until then)",
                nodes.join(", ")
            ),
            "pending_nodes": left,
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.delete(&n, q.force)).await)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CloneBody {
    name: String,
    /// The clone's own access list; both absent: the source volume's.
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    allow_net: Option<Vec<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    snapshot: String,
    #[serde(default)]
    force: bool,
}

fn valid_name(name: &str, what: &str) -> ApiResult<VolumeName> {
    VolumeName::new(name).map_err(|e| ApiError::invalid(format!("{what}: {e}")))
}

async fn list_snapshots(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.snapshot_list(&n)).await).map(Json)
}

async fn get_snapshot(
    State(api): State<Api>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<SnapshotInfo>> {
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.snapshot_get(&n, &snapshot)).await).map(Json)
}

async fn create_snapshot(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let req: NameBody = parse_json(&body)?;
    let snapshot = valid_name(&req.name, "snapshot name")?;
    let node = api.node.clone();
    let n = name.clone();
    let info = api.local(&name, blocking(move || node.snapshot_create(&n, snapshot)).await)?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete_snapshot(
    State(api): State<Api>,
    Path((name, snapshot)): Path<(String, String)>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("bad query: {e}")))?;
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.snapshot_delete(&n, &snapshot, q.force)).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clone_snapshot(
    State(api): State<Api>,
    Path((name, snapshot)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<VolumeInfo>)> {
    let req: CloneBody = parse_json(&body)?;
    let clone = valid_name(&req.name, "clone name")?;
    let access = match (req.allow, req.allow_net) {
        (None, None) => None,
        (allow, net) => Some(access::checked(allow.unwrap_or_default(), net.unwrap_or_default())?),
    };
    let node = api.node.clone();
    let source = format!("{name}@{snapshot}");
    // The source must be here (a clone shares its blocks), before its name is taken.
    let size = api.local(&name, api.node.snapshot_get(&name, &snapshot))?.size_bytes;
    let key = clone.to_string();
    let info = api.make(&key, size, move || node.clone_volume(&source, clone, access)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn rollback_volume(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<VolumeInfo>> {
    let req: RollbackBody = parse_json(&body)?;
    let node = api.node.clone();
    let source = format!("{name}@{}", req.snapshot);
    api.local(&name, blocking(move || node.rollback(&source, req.force)).await).map(Json)
}

/// `PUT /v1/volumes/{name}/access`: replaces the volume's NBD access list (both lists
/// empty: anyone may open it).
async fn set_access(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<VolumeInfo>> {
    let access: AccessList = parse_json(&body)?;
    access::check(&access)?;
    if api.replicated(&name) {
        let record = api.registry.set_access(&name, access).await?;
        return Ok(Json(api.live(crate::registry::info(&record, &api.nbd_addr))));
    }
    let node = api.node.clone();
    let n = name.clone();
    api.local(&name, blocking(move || node.set_access(&n, access)).await).map(Json)
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    node: u64,
}

async fn attach_volume(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<VolumeInfo>> {
    let req: AttachBody = parse_json(&body)?;
    // The body is well formed by now: what attach refuses as invalid (a volume of one
    // copy, a node without an active copy) is the volume's state.
    let record =
        crate::replicated::attach(&api.meta, &name, req.node).await.map_err(state_refusal)?;
    Ok(Json(api.live(crate::registry::info(&record, &api.nbd_addr))))
}

/// An error of an operation whose arguments were checked before it: an invalid argument
/// it finds is the state of the volume or cluster, not the request (409 conflict).
fn state_refusal(e: ApiError) -> ApiError {
    match e.code {
        ErrorCode::InvalidArgument => ApiError::new(ErrorCode::Conflict, e.message),
        _ => e,
    }
}

fn service_error(e: ServiceError) -> ApiError {
    let code = match e {
        ServiceError::Membership(_) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Unavailable,
    };
    ApiError::new(code, e.to_string())
}

async fn meta_request(api: &Api, request: ClientRequest) -> ApiResult<ClientReply> {
    api.meta.request(request).await.map_err(service_error)
}

/// What `GET /v1/cluster` returns.
#[derive(Serialize, Deserialize, Debug)]
pub struct ClusterView {
    /// This node's view of itself.
    pub local: strata_meta::service::LocalStatus,
    /// The cluster as its leader sees it.
    pub cluster: strata_meta::service::ClusterStatus,
}

async fn cluster_status(State(api): State<Api>) -> ApiResult<Json<ClusterView>> {
    match meta_request(&api, ClientRequest::Status).await? {
        ClientReply::Status(cluster) => {
            Ok(Json(ClusterView { local: api.meta.local_status(), cluster }))
        }
        other => Err(ApiError::new(ErrorCode::Internal, format!("unexpected reply {other:?}"))),
    }
}

async fn cluster_init(State(api): State<Api>) -> ApiResult<Json<ClusterView>> {
    api.meta.initialize().await.map_err(|e| match e {
        ServiceError::Membership(m) => ApiError::new(ErrorCode::AlreadyExists, m),
        e => service_error(e),
    })?;
    cluster_status(State(api)).await
}

async fn list_nodes(
    State(api): State<Api>,
) -> ApiResult<Json<Vec<strata_meta::service::MemberStatus>>> {
    Ok(Json(cluster_status(State(api)).await?.0.cluster.members))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    id: u64,
    rpc: String,
}

async fn add_node(State(api): State<Api>, body: Bytes) -> ApiResult<Json<ClusterView>> {
    let add: AddNode = parse_json(&body)?;
    if add.id == 0 {
        return Err(ApiError::invalid("node ids start at 1"));
    }
    if add.rpc.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::invalid(format!("rpc {:?} is not IP:PORT", add.rpc)));
    }
    let members = cluster_status(State(api.clone())).await?.0.cluster.members;
    if let Some(m) = members.iter().find(|m| m.id == add.id && m.rpc != add.rpc) {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!(
                "node {} is already a member at {}; remove it first to re-add it at {}",
                m.id, m.rpc, add.rpc
            ),
        ));
    }
    if let Some(m) = members.iter().find(|m| m.id != add.id && m.rpc == add.rpc) {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("{} is the address of member node {}", m.rpc, m.id),
        ));
    }
    // What the leader still refuses is about the node at that address: it did not answer
    // (or not as that node), or did not catch up. Retrying may help; nothing was added.
    let join = ClientRequest::Join { id: add.id, addr: add.rpc };
    api.meta.request(join).await.map_err(|e| match e {
        ServiceError::Membership(m) => ApiError::new(ErrorCode::Unavailable, m),
        e => service_error(e),
    })?;
    cluster_status(State(api)).await
}

async fn remove_node(
    State(api): State<Api>,
    Path(id): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ClusterView>> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("bad query: {e}")))?;
    let id: u64 = id.parse().map_err(|_| ApiError::invalid(format!("{id:?} is not a node id")))?;
    let members = cluster_status(State(api.clone())).await?.0.cluster.members;
    let Some(member) = members.iter().find(|m| m.id == id) else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("node {id} is not a member")));
    };
    if members.len() == 1 {
        return Err(ApiError::new(ErrorCode::Conflict, "cannot remove the last member"));
    }
    // A live node is removed only when asked twice over: it costs redundancy.
    if member.session.as_ref().is_some_and(|s| s.up) && !q.force {
        let left: Vec<u64> = members.iter().map(|m| m.id).filter(|&m| m != id).collect();
        let copies: Vec<String> = api.meta.read_local(|s| {
            crate::registry::records(s)
                .filter(|r| r.components.iter().any(|c| c.node == id))
                .map(|r| r.name)
                .collect()
        });
        return Err(ApiError::new(ErrorCode::Busy, removal_cost(id, &left, &copies)));
    }
    // The id is a member's: what is still refused is the membership's state.
    api.meta.request(ClientRequest::Remove { id }).await.map_err(|e| match e {
        ServiceError::Membership(m) => ApiError::new(ErrorCode::Conflict, m),
        e => service_error(e),
    })?;
    cluster_status(State(api)).await
}

/// Why removing live node `id` is refused without `force`, and what it would cost: the
/// metadata service's voters among the members `left` (the first 1, 3 or 5), and the
/// replicated volumes (`copies`) whose copy there is placed again elsewhere.
fn removal_cost(id: u64, left: &[u64], copies: &[String]) -> String {
    let voters = strata_meta::service::voter_target(left.len());
    let tolerated = (voters - 1) / 2;
    let quorum = match voters {
        1 => format!(
            "1 of them voting: the metadata service stops whenever that voter (node {}) \
             is down",
            left.first().copied().unwrap_or_default()
        ),
        v => format!(
            "{v} of them voting: the metadata service survives {tolerated} of them down, \
             not {}",
            tolerated + 1
        ),
    };
    let copies = match copies.len() {
        0 => "it holds no copy of a replicated volume".to_owned(),
        n => {
            let names: Vec<&str> = copies.iter().take(5).map(String::as_str).collect();
            let more = if n > 5 { format!(" and {} more", n - 5) } else { String::new() };
            format!(
                "its copies of {n} replicated volume(s) ({}{more}) are placed again on \
                 members holding none (a full copy each; until then they run one copy short)",
                names.join(", ")
            )
        }
    };
    format!(
        "node {id} is up: removing it leaves {} member(s), {quorum}; {copies}. Stop it \
         first (a node down is removed as asked), or remove it anyway with --force \
         (force=true)",
        left.len()
    )
}

#[cfg(test)]
mod tests {
    use super::removal_cost;

    #[test]
    fn removing_a_live_node_says_what_the_quorum_and_the_copies_lose() {
        let two = removal_cost(3, &[1, 2], &["r1".into()]);
        assert!(two.contains("leaves 2 member(s), 1 of them voting"), "{two}");
        assert!(two.contains("that voter (node 1) is down"), "{two}");
        assert!(two.contains("copies of 1 replicated volume(s) (r1)"), "{two}");
        assert!(two.contains("--force"), "{two}");
        let three = removal_cost(4, &[1, 2, 3], &[]);
        assert!(three.contains("3 of them voting") && three.contains("survives 1"), "{three}");
        assert!(three.contains("no copy"), "{three}");
        let many: Vec<String> = (0..7).map(|i| format!("v{i}")).collect();
        assert!(removal_cost(2, &[1, 3], &many).contains("v4 and 2 more"));
    }
}
