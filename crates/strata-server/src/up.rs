//! Running a node in the foreground: `strata up` (a one-node cluster on the embedded
//! defaults) and `strata serve --config FILE` (a member of a cluster). Both take the same
//! path: the volumes, the metadata member (Raft, RPC, the node's session), NBD and HTTP.

use crate::api::{self, Api};
use crate::config::{Config, NbdTls, UP_RPC};
use crate::node::{Exports, Node};
use anyhow::Context;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_meta::service::{Member, Options, ServiceError, Timing};
use tokio::sync::watch;

/// How long a stop waits for NBD clients to finish their in-flight requests.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Arguments of `strata up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where the node keeps its data (created if missing).
    #[arg(long, default_value = "./strata-data")]
    data_dir: PathBuf,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: SocketAddr,
    /// HTTP API listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Inter-node RPC listen address (of this one-node cluster's metadata member).
    #[arg(long, default_value = UP_RPC)]
    rpc: SocketAddr,
    /// x509 credentials in qemu's layout (ca-cert.pem, server-cert.pem, server-key.pem):
    /// NBD then requires TLS and HTTP serves HTTPS.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// NBD's TLS mode (default: require with --tls-dir, else off). Plain NBD beyond
    /// loopback needs `--nbd-tls off` written out.
    #[arg(long, value_enum, value_name = "MODE")]
    nbd_tls: Option<NbdTls>,
    /// NBD clients must present a certificate signed by the CA in --tls-dir.
    #[arg(long)]
    tls_verify_peer: bool,
    /// A host name the HTTP API answers to besides its address, localhost and loopback
    /// (repeatable).
    #[arg(long = "http-allowed-host", value_name = "NAME")]
    http_allowed_hosts: Vec<String>,
    /// Close an NBD connection idle this long: no request in flight and none arriving
    /// (0: never).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = strata_types::limits::NBD_IDLE_TIMEOUT_SECS_DEFAULT
    )]
    nbd_idle_timeout_secs: u64,
    /// Space client writes leave free on the data directory's file system: a size (10G)
    /// or a percentage of it (5%). Below it writes get ENOSPC, while trims, deletes and
    /// the node's own work go on. Default 5%, at least 64M, at most half the file system.
    #[arg(long, value_parser = strata_types::Reserve::parse)]
    reserve: Option<strata_types::Reserve>,
}

/// Arguments of `strata serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The node's TOML configuration (node_id, data_dir, rpc, nbd, http, join, site,
    /// rack, secret_file).
    #[arg(long)]
    config: PathBuf,
}

/// How a node writes its log on stderr (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line an event (colored on a terminal).
    #[default]
    Human,
    /// One JSON object a line: timestamp, level, target, fields (message and the
    /// event's fields, such as volume and offset) and the spans it happened in.
    Json,
}

/// Sends the process's `tracing` events to stderr in `format`, filtered by `RUST_LOG`
/// (default: info, and only errors of the Raft library). Each of the Raft library's log
/// sites gets through at most once a [`LIBRARY_QUIET`]: it logs every retry to reach a
/// member that is down (five a second) and every call a shutdown cut short as an error;
/// this node says itself, once, that a member is unreachable and when it is back.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error"));
    let quiet = LibraryQuiet::new(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Human => {
            let layer = layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            registry.with(layer.with_filter(quiet)).init()
        }
        LogFormat::Json => registry.with(layer.json().with_ansi(false).with_filter(quiet)).init(),
    }
}

/// How often one log site of the Raft library may speak ([`init_logging`]).
const LIBRARY_QUIET: Duration = Duration::from_secs(60);

/// `filter` (the `RUST_LOG` one), and then an event of the Raft library only if its log
/// site has not spoken for [`LIBRARY_QUIET`].
struct LibraryQuiet<F> {
    filter: F,
    last: std::sync::Mutex<HashMap<tracing::callsite::Identifier, Instant>>,
}

impl<F> LibraryQuiet<F> {
    fn new(filter: F) -> Self {
        LibraryQuiet { filter, last: std::sync::Mutex::default() }
    }

    fn library(meta: &tracing::Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with("openraft")
    }
}

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S>
    for LibraryQuiet<F>
{
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.filter.enabled(meta, cx)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        let interest = self.filter.callsite_enabled(meta);
        // The library's events are asked about one by one (never cached as always).
        if Self::library(meta) && interest.is_always() {
            tracing::subscriber::Interest::sometimes()
        } else {
            interest
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.filter.max_level_hint()
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if !self.filter.event_enabled(event, cx) {
            return false;
        }
        let meta = event.metadata();
        if !Self::library(meta) {
            return true;
        }
        // A rate limit's times, harmless if a panic left them half-changed (and a log
        // filter must not log: `poison` would).
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match last.get(&meta.callsite()) {
            Some(t) if now.duration_since(*t) < LIBRARY_QUIET => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.filter.on_new_span(attrs, id, cx)
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.filter.on_record(id, values, cx)
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.filter.on_enter(id, cx)
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.filter.on_exit(id, cx)
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.filter.on_close(id, cx)
    }
}

/// Holds the data directory's lock for the process's life. The lock is an flock, which
/// the kernel drops when the process dies, so a killed node never blocks its restart.
pub struct DirLock {
    _file: std::fs::File,
}

/// Locks `dir` for this process, or explains who holds it.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    use rustix::fs::{flock, FlockOperation};
    if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        let holder = holder.trim();
        anyhow::bail!(
            "data directory {} is in use by another strata process{} ({e}); stop it first",
            dir.display(),
            if holder.is_empty() { String::new() } else { format!(" (pid {holder})") }
        );
    }
    file.set_len(0).context("truncate the lock file")?;
    writeln!(file, "{}", std::process::id()).context("write the lock file")?;
    Ok(DirLock { _file: file })
}

/// `strata up`: a one-node cluster until Ctrl-C or SIGTERM.
pub fn up(args: UpArgs) -> anyhow::Result<()> {
    // A relative --tls-dir is the operator's, from where they ran the command.
    let tls_dir = match args.tls_dir {
        Some(d) if d.is_relative() => {
            Some(std::env::current_dir().context("the current directory")?.join(d))
        }
        d => d,
    };
    let config = Config {
        node_id: 1,
        data_dir: args.data_dir,
        rpc: args.rpc,
        nbd: args.nbd,
        http: args.http,
        join: Vec::new(),
        site: String::new(),
        rack: String::new(),
        secret_file: PathBuf::from("secret"),
        move_after_secs: 60,
        move_hold_secs: 300,
        scrub_every_secs: 7 * 24 * 3600,
        resync_jobs: crate::resync::JOBS_DEFAULT,
        tls_dir,
        nbd_tls: args.nbd_tls,
        tls_verify_peer: args.tls_verify_peer,
        http_allowed_hosts: args.http_allowed_hosts,
        nbd_idle_timeout_secs: args.nbd_idle_timeout_secs,
        reserve: args.reserve,
    };
    config.nbd_tls_mode()?;
    run(config, true)
}

/// `strata serve --config FILE`: a cluster member until Ctrl-C or SIGTERM.
pub fn serve_config(args: ServeArgs) -> anyhow::Result<()> {
    run(Config::load(&args.config)?, false)
}

/// Runs the node until Ctrl-C or SIGTERM. `one_node`: found a cluster of this node alone
/// if it belongs to none (`strata up`).
fn run(config: Config, one_node: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let tightened = crate::files::make_private(&config.data_dir)?;
    if tightened > 0 {
        tracing::info!(
            "made the data directory {} private ({tightened} modes tightened to 0700/0600)",
            config.data_dir.display()
        );
    }
    let _lock = lock_data_dir(&config.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(config, one_node))
}

/// Set only by `bench/replicated.sh` to measure what inter-node encryption costs; see
/// [`internode_setup`].
const BENCH_PLAINTEXT_ENV: &str = "STRATA_BENCH_INTERNODE_PLAINTEXT";

/// Raises the open-file limit (a flood of connections must meet the listener's limits,
/// not EMFILE), and takes the bench-only plaintext switch: records unencrypted after an
/// authenticating handshake, bound into the handshake's prologue so that a node without
/// the same switch refuses this one. Not an operator's setting (not in the config or the
/// docs): it says so loudly.
fn internode_setup() {
    match strata_io::net::raise_descriptor_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    if std::env::var_os(BENCH_PLAINTEXT_ENV).is_some_and(|v| v == "1") {
        strata_io::net::channel::bench_plaintext_records();
        tracing::warn!(
            "{BENCH_PLAINTEXT_ENV}=1: INTER-NODE TRAFFIC IS NOT ENCRYPTED OR AUTHENTICATED \
             AFTER THE HANDSHAKE (a benchmark's switch; never run a real cluster with it; \
             nodes without it refuse this one)"
        );
    }
}

/// Starts the metadata member; founds or joins a cluster when it belongs to none.
async fn start_member(
    config: &Config,
    secret: Vec<u8>,
    one_node: bool,
) -> anyhow::Result<Arc<Member>> {
    // Several nodes on one machine, each on its own 127.0.0.x: their connections to each
    // other come from their own addresses (fault tests cut one off by address).
    strata_io::net::set_source_address(config.rpc.ip());
    internode_setup();
    let listener = tokio::net::TcpListener::bind(config.rpc)
        .await
        .with_context(|| format!("listen for inter-node RPC on {}", config.rpc))?;
    // The bound address (a port 0 in the config becomes the one the kernel chose).
    let advertise = listener.local_addr().context("the RPC listener's address")?.to_string();
    let options = Options {
        id: config.node_id,
        dir: config.data_dir.join("meta"),
        listener,
        advertise,
        secret,
        timing: Timing::default(),
    };
    let member = Member::start(options).await.context("start the metadata service")?;
    if !member.initialized().await {
        if one_node {
            member.initialize().await.context("found the one-node cluster")?;
        } else if !config.join.is_empty() {
            println!("Joining the cluster through {} ...", config.join.join(", "));
            let _ = std::io::stdout().flush();
            loop {
                match member.join(&config.join, Duration::from_secs(30)).await {
                    Ok(()) => break,
                    Err(e @ (ServiceError::Refused(_) | ServiceError::Membership(_))) => {
                        anyhow::bail!("cannot join the cluster: {e}")
                    }
                    Err(e) => tracing::warn!("still trying to join: {e}"),
                }
            }
        } else {
            println!(
                "Not part of a cluster yet: run `strata cluster init` to found one with this \
                 node, or set `join` in the config."
            );
        }
    }
    Ok(member)
}

async fn serve(config: Config, one_node: bool) -> anyhow::Result<()> {
    let node = Node::open(&config.data_dir)
        .with_context(|| format!("open data directory {}", config.data_dir.display()))?;
    node.set_reserve(config.reserve.unwrap_or(strata_types::RESERVE_DEFAULT));
    if crate::replicated::lost_power(&config.data_dir) {
        tracing::warn!(
            "the last run ended without a clean stop in another boot (a power loss?): this \
             node's copies may lack writes they had not synced, so it takes ownership of a \
             replicated volume only after every other node with an active copy, until an \
             owner has levelled its copy"
        );
        node.mark_suspect().context("mark this node's copies suspect")?;
    }
    let nbd_tls = config.nbd_tls_mode()?;
    let tls = match config.tls_path() {
        Some(dir) => Some(
            crate::tls::Credentials::load(&dir, config.tls_verify_peer)
                .with_context(|| format!("load the TLS credentials in {}", dir.display()))?,
        ),
        None => None,
    };
    if nbd_tls == NbdTls::Off && !config.nbd.ip().is_loopback() {
        tracing::warn!(
            "NBD on {} without TLS (nbd_tls = \"off\"): anyone who reaches it can read and \
             overwrite every volume",
            config.nbd
        );
    }
    let secret = config.secret()?;
    let data = crate::dataplane::DataService::new(node.clone(), &secret);
    let member = start_member(&config, secret, one_node).await?;
    member.set_data_plane(Arc::new(crate::dataplane::Plane(Arc::new(data))));
    let nbd = tokio::net::TcpListener::bind(config.nbd)
        .await
        .with_context(|| format!("listen for NBD on {}", config.nbd))?;
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("listen for HTTP on {}", config.http))?;
    let nbd_addr = nbd.local_addr()?.to_string();
    let http_addr = http.local_addr()?.to_string();
    node.set_nbd_addr(nbd_addr.clone());
    node.set_nbd_tls(nbd_tls == NbdTls::Require);
    let record = serde_json::json!({
        "id": config.node_id,
        "rpc": member.addr(),
        "nbd": nbd_addr,
        "http": http_addr,
        "site": config.site,
        "rack": config.rack,
        "version": env!("CARGO_PKG_VERSION"),
    });
    tokio::spawn(member.clone().run_session(record));
    node.set_node_id(config.node_id);
    node.set_scrub_every(Duration::from_secs(config.scrub_every_secs));
    node.resync_scheduler().set_jobs(config.resync_jobs);
    let registry = crate::registry::Registry::new(node.clone(), member.clone());
    tokio::spawn(registry.clone().run());
    let moves = crate::replicated::MovePolicy {
        after: Duration::from_secs(config.move_after_secs),
        hold: Duration::from_secs(config.move_hold_secs),
    };
    tokio::spawn(crate::replicated::steward(node.clone(), member.clone(), moves));
    {
        let (member, runtime) = (member.clone(), tokio::runtime::Handle::current());
        node.set_discover(Box::new(move |node, name| {
            crate::replicated::discover(node, &member, &runtime, name)
        }));
    }
    {
        let member = member.clone();
        node.set_access_of(Box::new(move |name| {
            crate::registry::applied_record(&member, name).map(|r| r.access)
        }));
    }
    let token = api::token_for(&config.data_dir, config.http)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let exports = Arc::new(Exports(node.clone()));
    let nbd_options = strata_nbd::Options {
        tls: tls.as_ref().filter(|_| nbd_tls == NbdTls::Require).map(|t| t.nbd()),
        idle_timeout: Some(Duration::from_secs(config.nbd_idle_timeout_secs))
            .filter(|d| !d.is_zero()),
    };
    let nbd_task = tokio::spawn(strata_nbd::serve(nbd, exports, nbd_options, stop_rx.clone()));
    let router = api::router(Api {
        node: node.clone(),
        nbd_addr: nbd_addr.clone(),
        http_addr: http_addr.clone(),
        started: Instant::now(),
        data_dir: config.data_dir.display().to_string(),
        meta: member.clone(),
        token: token.clone(),
        registry,
    });
    let guard = crate::guard::Guard::new(config.http, tls.is_some(), &config.http_allowed_hosts);
    let router = guard.around(router);
    let https = tls.as_ref().map(|t| t.https());
    let http_task = tokio::spawn(crate::https::serve(http, https.clone(), router, stop_rx.clone()));

    println!(
        "Strata {} is up. Data directory: {}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display()
    );
    // Before the listeners: whoever reads the banner up to them knows the credentials.
    if let Some(tls) = &tls {
        println!(
            "  TLS credentials from {} (NBD TLS {})",
            tls.dir().display(),
            if nbd_tls == NbdTls::Require { "required" } else { "off" }
        );
    }
    let scheme = if nbd_tls == NbdTls::Require { "nbds" } else { "nbd" };
    println!(
        "  NBD listening on {nbd_addr}   (export name = volume name: {scheme}://{nbd_addr}/VOLUME)"
    );
    let https_url =
        https.as_ref().map_or(String::new(), |_| format!("HTTPS: https://{http_addr}/; "));
    println!(
        "  HTTP listening on {http_addr}  ({https_url}dashboard at /, metrics at /metrics, API \
         under /v1)"
    );
    if token.is_some() {
        println!(
            "  The HTTP API requires the bearer token in {} (STRATA_TOKEN for the CLI)",
            config.data_dir.join(api::TOKEN_FILE).display()
        );
    }
    println!("  RPC listening on {}  (node {}, cluster members)", member.addr(), config.node_id);
    match (&tls, nbd_tls) {
        (Some(tls), NbdTls::Require) => {
            let (host, port) = nbd_addr.rsplit_once(':').unwrap_or((&nbd_addr, "10809"));
            println!(
                "Try:  strata volume create vm1 --size 10G && qemu-img info --object \
                 tls-creds-x509,id=tls0,endpoint=client,dir=CLIENT_DIR --image-opts \
                 driver=nbd,host={host},port={port},export=vm1,tls-creds=tls0   (CLIENT_DIR: \
                 ca-cert.pem, client-cert.pem, client-key.pem signed by {}/ca-cert.pem)",
                tls.dir().display()
            )
        }
        _ => println!(
            "Try:  strata volume create vm1 --size 10G && qemu-img info nbd://{nbd_addr}/vm1"
        ),
    }
    println!("Ctrl-C or SIGTERM stops it cleanly.");
    let _ = std::io::stdout().flush();

    // A node whose metadata service failed (its disk full, say) stops as a whole, its
    // volumes synced as far as they can be: half alive, it would keep its NBD clients
    // waiting on an ownership it can no longer hold.
    let failed = tokio::select! {
        signalled = wait_for_signal() => {
            signalled?;
            None
        }
        why = member.failed() => Some(why),
    };
    match &failed {
        Some(why) => tracing::error!(
            "the metadata service stopped: {why}; stopping this node (other nodes take its \
             replicated volumes)"
        ),
        None => tracing::info!("stopping: finishing in-flight I/O"),
    }
    stop_tx.send_replace(true);
    // A client that stops reading its replies must not hold the shutdown forever: after the
    // grace period its connection is abandoned (what it was sent is already written) and the
    // volumes are synced all the same.
    if tokio::time::timeout(SHUTDOWN_GRACE, nbd_task).await.is_err() {
        tracing::warn!("NBD clients did not finish within {SHUTDOWN_GRACE:?}; closing them");
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("HTTP server ended with an error: {e}"),
        Ok(Err(e)) => tracing::warn!("HTTP task failed: {e}"),
        Err(_) => tracing::warn!("HTTP clients did not finish within {SHUTDOWN_GRACE:?}"),
    }
    // Replicated volumes this node owns go to another node before it leaves.
    crate::replicated::hand_over(&node, &member, Duration::from_secs(10)).await;
    member.shutdown().await;
    let synced = tokio::task::spawn_blocking(move || node.sync_all()).await?;
    synced.context("sync volumes at shutdown")?;
    crate::replicated::mark_clean_stop(&config.data_dir);
    if let Some(why) = failed {
        anyhow::bail!(
            "the metadata service stopped: {why} (all data synced; fix the cause, then \
             start the node again)"
        );
    }
    tracing::info!("stopped cleanly; all data synced");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod log_tests {
    use super::LibraryQuiet;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::prelude::*;

    /// A log written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_raft_library_speaks_once_a_minute_a_site_and_the_rest_as_filtered() {
        let lines = Lines::default();
        let writer = lines.clone();
        let filter = tracing_subscriber::EnvFilter::new("info,openraft=error");
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_filter(LibraryQuiet::new(filter));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for i in 0..5 {
                tracing::error!(target: "openraft::replication", "retry {i} failed");
                tracing::warn!(target: "openraft::replication", "a warning {i}");
                tracing::warn!(target: "strata_meta::rpc", "member {i} unreachable");
                tracing::debug!(target: "strata_meta::rpc", "detail {i}");
            }
            tracing::error!(target: "openraft::core", "another site");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("retry").count(), 1, "{text}");
        assert!(text.contains("retry 0 failed") && text.contains("another site"), "{text}");
        assert!(!text.contains("a warning"), "below openraft=error: {text}");
        assert_eq!(text.matches("unreachable").count(), 5, "others pass: {text}");
        assert!(!text.contains("detail"), "below info: {text}");
    }
}
