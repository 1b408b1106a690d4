//! `strata`: the one binary. `strata up` runs a node; the other subcommands are the
//! operator's CLI, which talks to a node's HTTP API.
//!
//! This crate wires the cores to the OS (sockets, signals, files); it holds no storage or
//! protocol logic of its own beyond the catalog. See ARCHITECTURE.md.

/// `println!` for the CLI's output: a reader that went away (`strata volume list | head -1`)
/// ends the process quietly instead of a panic (see `cli::print_out`).
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::print_out(format_args!($($arg)*)) };
}

mod api;
mod apiclient;
// Decoders of untrusted bytes, in the library so the fuzz targets run them.
use strata_server::{access, catalog, error};
mod cli;
mod config;
mod dataplane;
mod fencing;
mod files;
mod follow;
mod fsck;
mod guard;
mod https;
mod metrics;
mod node;
mod poison;
mod progress;
mod registry;
mod replicated;
mod report;
mod resync;
mod tls;
mod up;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

const AFTER_HELP: &str = "\
Examples:
  strata up                                   # one-node Strata in ./strata-data
  strata volume create vm1 --size 10G
  qemu-img info nbd://127.0.0.1:10809/vm1
  nbdinfo --map nbd://127.0.0.1:10809/vm1
  strata volume list --json
  strata snapshot create vm1@before-upgrade   # instant; read-only export vm1@before-upgrade
  strata volume clone vm1@before-upgrade vm2
  strata volume rollback vm1@before-upgrade
  strata fsck --data-dir ./strata-data        # offline check (stop the node first)
  strata serve --config n1.toml               # a cluster member (see strata serve --help)
  strata cluster status                       # leader, term, nodes, incarnations
  strata volume create db1 --size 50G --replicas 3   # a copy on each of 3 nodes
  strata volume attach db1 --node 2           # node 2 orders db1's I/O from now on
  strata up --log-format json                 # the node's log as JSON lines on stderr

Every command's --help has examples; the operator's guide is docs/operations.md.";

const SERVE_HELP: &str = "\
The config file (TOML):
  node_id = 2                     # unique, 1 or more, never reused
  data_dir = \"/var/lib/strata\"
  rpc = \"10.0.0.2:10810\"          # inter-node; other nodes reach this node here
  nbd = \"0.0.0.0:10809\"
  http = \"10.0.0.2:8080\"          # beyond loopback, the API needs its bearer token
  join = [\"10.0.0.1:10810\"]       # any existing member; empty on the first node
  site = \"a\"
  rack = \"r1\"
  secret_file = \"secret\"          # relative to data_dir; copy it from the first node
  move_after_secs = 60            # a volume used only through one other node moves there
  move_hold_secs = 300            # ...but keeps an owner this long first (0 after: never)
  scrub_every_secs = 604800       # an owner compares its volumes' copies weekly (0: never)
  resync_jobs = 2                 # resync jobs sent at once, and let in at once (1 or more)
  reserve = \"5%\"                 # client writes get ENOSPC below this much free (or \"10G\");
                                  # default 5%, at least 64M: room for deletes and the node
  tls_dir = \"/etc/strata/tls\"     # x509 in qemu's layout: NBD requires TLS, HTTP is HTTPS
  nbd_tls = \"require\"             # the default with tls_dir; \"off\" must be written out to
                                  # serve plain NBD beyond loopback
  tls_verify_peer = false         # true: NBD clients need a certificate of the CA
  http_allowed_hosts = []         # names the API answers to (beside its address, localhost)
  nbd_idle_timeout_secs = 0       # close NBD connections idle this long (0: never)

Examples:
  strata serve --config n1.toml   # the first node; then, once: strata cluster init
  strata serve --config n2.toml   # the others: copy n1's data_dir/secret, set join
  strata serve --config n1.toml --log-format json 2>> /var/log/strata.json

Ctrl-C or SIGTERM finishes in-flight I/O, hands the replicated volumes this node owns to
other nodes, syncs every volume and exits.";

const UP_HELP: &str = "\
Examples:
  strata up                                    # data in ./strata-data, loopback only
  strata up --data-dir /var/lib/strata --nbd 0.0.0.0:10809 --tls-dir /etc/strata/tls
  strata up --log-format json 2>> strata.json  # one JSON object a log line
  strata up --reserve 2G                       # writes get ENOSPC below 2 GiB free

It prints where NBD, HTTP (dashboard at /, metrics at /metrics, API under /v1) and RPC
listen. Ctrl-C or SIGTERM finishes in-flight I/O, syncs every volume and exits.";

const VOLUME_HELP: &str = "\
Examples:
  strata volume create vm1 --size 10G
  strata volume create db1 --size 50G --replicas 3   # a copy on each of 3 nodes
  strata volume list
  strata volume info vm1
  strata volume info db1 --watch       # follow a resync until every copy is active
  strata volume resize vm1 --size 20G
  strata volume clone vm1@golden vm2
  strata volume rollback vm1@before-upgrade
  strata volume delete vm2
  strata volume attach db1 --node 2

The commands talk to the API given by --api or STRATA_API (default http://127.0.0.1:8080);
beyond loopback it needs the token of the node's data_dir/api-token (--token, STRATA_TOKEN,
--token-file). An https:// API (a node with tls_dir) is verified with --cacert FILE
(STRATA_CACERT), else the system's CAs:
  strata --api https://10.0.0.1:8080 --cacert /etc/strata/tls/ca-cert.pem volume list";

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Strata: a virtual-disk store serving thin volumes to VMs over NBD.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The node's HTTP API (for volume commands): http://… or, for a node with TLS
    /// credentials, https://….
    #[arg(long, global = true, env = "STRATA_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// The API's bearer token (needed when the node's HTTP listens beyond loopback; it
    /// is in the node's data directory, file api-token).
    #[arg(long, global = true, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the API's bearer token from FILE (such as the node's data_dir/api-token)
    /// instead of --token.
    #[arg(long, global = true, env = "STRATA_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Verify an https:// API with this CA certificate (or a credential directory
    /// holding ca-cert.pem, such as the node's tls_dir) instead of the system's CAs.
    #[arg(long, global = true, env = "STRATA_CACERT", value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    /// The node's log on stderr (strata up, strata serve): human lines, or one JSON
    /// object a line for log collectors. RUST_LOG filters either (default: info).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "STRATA_LOG_FORMAT",
        default_value_t = up::LogFormat::Human,
        value_name = "FORMAT"
    )]
    log_format: up::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a one-node Strata in the foreground (the embedded default: a cluster of one).
    #[command(after_help = UP_HELP)]
    Up(up::UpArgs),
    /// Run a cluster member in the foreground, configured by a TOML file.
    #[command(after_help = SERVE_HELP)]
    Serve(up::ServeArgs),
    /// Found a cluster, or show its leader, term, members and their sessions.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        strata cluster init      # once, on the first node started with strata serve\n  \
        strata cluster status"
    )]
    Cluster(cli::ClusterCommand),
    /// Add, remove and list the cluster's nodes (1, 3 or 5 vote; the rest follow).
    #[command(
        subcommand,
        after_help = "Examples:\n  strata node list\n  \
        strata node add 4 10.0.0.4:10810\n  strata node remove 4   # once it is down (else --force)"
    )]
    Node(cli::NodeCommand),
    /// Create, list, inspect, resize, clone, roll back and delete volumes.
    #[command(subcommand, after_help = VOLUME_HELP)]
    Volume(cli::VolumeCommand),
    /// Take, list and delete snapshots (VOL@SNAP).
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        strata snapshot create vm1@before-upgrade\n  strata snapshot list vm1\n  \
        strata snapshot delete vm1@before-upgrade\n  \
        strata snapshot delete vm1@before-upgrade --wait   # follow its space's reuse"
    )]
    Snapshot(cli::SnapshotCommand),
    /// Check a stopped node's data directory: every tree, the VBA map, and with --data
    /// every block's checksum. Exits 1 on any inconsistency.
    #[command(after_help = "Example:\n  strata fsck --data-dir /var/lib/strata --data")]
    Fsck(fsck::FsckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (token, token_file) = (cli.token.as_deref(), cli.token_file.as_deref());
    let client = || apiclient::Client::new(&cli.api, token, token_file, cli.cacert.as_deref());
    let result = match cli.command {
        Command::Up(args) => {
            up::init_logging(cli.log_format);
            up::up(args)
        }
        Command::Serve(args) => {
            up::init_logging(cli.log_format);
            up::serve_config(args)
        }
        Command::Cluster(cmd) => client().and_then(|c| cli::cluster(&c, cli.json, cmd)),
        Command::Node(cmd) => client().and_then(|c| cli::node(&c, cli.json, cmd)),
        Command::Volume(cmd) => client().and_then(|c| cli::volume(&c, cli.json, cmd)),
        Command::Snapshot(cmd) => client().and_then(|c| cli::snapshot(&c, cli.json, cmd)),
        Command::Fsck(args) => match fsck::run(args, cli.json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            ExitCode::FAILURE
        }
    }
}
