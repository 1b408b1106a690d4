//! `strata up`: one node in the foreground.

use crate::api::{self, Api};
use crate::node::{Exports, Node};
use anyhow::Context;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
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

/// Runs the node until Ctrl-C or SIGTERM.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data directory {}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: UpArgs) -> anyhow::Result<()> {
    let node = Node::open(&args.data_dir)
        .with_context(|| format!("open data directory {}", args.data_dir.display()))?;
    let nbd = tokio::net::TcpListener::bind(args.nbd)
        .await
        .with_context(|| format!("listen for NBD on {}", args.nbd))?;
    let http = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("listen for HTTP on {}", args.http))?;
    let nbd_addr = nbd.local_addr()?.to_string();
    let http_addr = http.local_addr()?.to_string();
    node.set_nbd_addr(nbd_addr.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let exports = Arc::new(Exports(node.clone()));
    let nbd_task = tokio::spawn(strata_nbd::serve(nbd, exports, stop_rx.clone()));
    let router = api::router(Api {
        node: node.clone(),
        nbd_addr: nbd_addr.clone(),
        http_addr: http_addr.clone(),
        started: Instant::now(),
        data_dir: args.data_dir.display().to_string(),
    });
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, router)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    println!(
        "Strata {} is up. Data directory: {}",
        env!("CARGO_PKG_VERSION"),
        args.data_dir.display()
    );
    println!(
        "  NBD listening on {nbd_addr}   (export name = volume name: nbd://{nbd_addr}/VOLUME)"
    );
    println!("  HTTP listening on {http_addr}  (API under /v1, OpenAPI at /v1/openapi.json)");
    println!("Try:  strata volume create vm1 --size 10G && qemu-img info nbd://{nbd_addr}/vm1");
    println!("Ctrl-C or SIGTERM stops it cleanly.");
    let _ = std::io::stdout().flush();

    wait_for_signal().await?;
    tracing::info!("stopping: finishing in-flight I/O");
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
    let synced = tokio::task::spawn_blocking(move || node.sync_all()).await?;
    synced.context("sync volumes at shutdown")?;
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
