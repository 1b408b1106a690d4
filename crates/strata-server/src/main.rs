//! `strata`: the one binary. `strata up` runs a node; the other subcommands are the
//! operator's CLI, which talks to a node's HTTP API.
//!
//! This crate wires the cores to the OS (sockets, signals, files); it holds no storage or
//! protocol logic of its own beyond the catalog. See ARCHITECTURE.md.

mod api;
mod cli;
mod error;
mod fsck;
mod node;
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
  strata fsck --data-dir ./strata-data        # offline check (stop the node first)";

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Strata: a virtual-disk store serving thin volumes to VMs over NBD.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The node's HTTP API (for volume commands).
    #[arg(long, global = true, env = "STRATA_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a one-node Strata in the foreground (the embedded default).
    #[command(after_help = "Example:\n  strata up --data-dir /var/lib/strata --nbd 0.0.0.0:10809")]
    Up(up::UpArgs),
    /// Create, list, inspect, resize, clone, roll back and delete volumes.
    #[command(subcommand)]
    Volume(cli::VolumeCommand),
    /// Take, list and delete snapshots (VOL@SNAP).
    #[command(subcommand)]
    Snapshot(cli::SnapshotCommand),
    /// Check a stopped node's data directory: every tree, the VBA map, and with --data
    /// every block's checksum. Exits 1 on any inconsistency.
    #[command(after_help = "Example:\n  strata fsck --data-dir /var/lib/strata --data")]
    Fsck(fsck::FsckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Volume(cmd) => cli::volume(&cli.api, cli.json, cmd),
        Command::Snapshot(cmd) => cli::snapshot(&cli.api, cli.json, cmd),
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
