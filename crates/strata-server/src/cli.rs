//! The operator's volume, snapshot, cluster and node commands, over the HTTP API (the
//! client in `apiclient`; following a long operation in `follow`).
//!
//! Every line for stdout goes through `outln!` ([`print_out`]): when the reader has gone
//! (`strata cluster status | head -1`) the command ends quietly with success, as a
//! filter's output cut short by the pipe is no error of the command (Rust ignores
//! SIGPIPE, so a plain `println!` would panic on EPIPE).

use crate::apiclient::{encode, Client};
use crate::node::{SnapshotInfo, VolumeInfo};
use anyhow::bail;
use serde_json::{json, Value};
use strata_types::{format_size, parse_size};

/// Writes one line to stdout; when stdout is a pipe whose reader has gone, exits at once
/// with success and without a word (the other lines would go nowhere either). Any other
/// write error ends the process with a one-line message.
pub fn print_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("strata: writing the output: {e}");
        std::process::exit(1);
    }
}

/// `strata volume …`
#[derive(clap::Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume.
    #[command(after_help = "Examples:\n  strata volume create vm1 --size 10G\n  \
        strata volume create db1 --size 100G --replicas 3   # copies on 3 nodes\n  \
        strata volume create vm2 --size 10G --allow client-a --allow-net 10.0.0.0/8")]
    Create {
        /// Name: 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -).
        name: String,
        /// Size in bytes or with a binary suffix: 512M, 10G, 1T (multiple of 4096).
        #[arg(long)]
        size: String,
        /// Copies on distinct nodes (1-3); every write goes to each.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Copies that must be active for a write to succeed (default: 1, or 2 of 3);
        /// below it writes fail rather than silently lose redundancy.
        #[arg(long)]
        min_replicas: Option<u32>,
        /// Only NBD clients presenting a certificate (of the node's CA) with this
        /// subject CN may open it and its snapshots (repeatable; with --allow-net: either).
        #[arg(long = "allow", value_name = "SUBJECT")]
        allow: Vec<String>,
        /// Only NBD clients from this network may open it (CIDR such as 10.0.0.0/8, or
        /// one address; repeatable). Without --allow and --allow-net: anyone.
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_net: Vec<String>,
    },
    /// List volumes: every volume of the cluster, with the node holding (owning) it.
    #[command(after_help = "Examples:\n  strata volume list\n  \
        strata volume list --json   # for scripts")]
    List,
    /// Show one volume: size, space (exclusive and shared), snapshots, connections,
    /// export, and for a replicated volume its owner, epoch and each copy's state.
    #[command(after_help = "Examples:\n  strata volume info vm1\n  \
        strata volume info vm1 --json\n  \
        strata volume info db1 --watch   # then a bar until every copy is active\n  \
        strata volume info db1 --watch 2> resync.log   # plain lines when not a terminal")]
    Info {
        /// Volume name.
        name: String,
        /// Then follow a replicated volume's resync on stderr (a bar with the rate and
        /// the time to go on a terminal, plain lines otherwise) until every copy is
        /// active; exits at once when there is nothing to resync, and non-zero if the
        /// volume goes away or the node does not answer for 30 s.
        #[arg(long)]
        watch: bool,
    },
    /// Grow a volume (clients see the new size when they reconnect), or shrink it.
    #[command(after_help = "Examples:\n  strata volume resize vm1 --size 20G\n  \
        strata volume resize vm1 --size 5G --allow-shrink           # no clients attached\n  \
        strata volume resize vm1 --size 5G --allow-shrink --force   # disconnects them")]
    Resize {
        /// Volume name.
        name: String,
        /// The new size.
        #[arg(long)]
        size: String,
        /// Allow a smaller size (discards the data past the new end).
        #[arg(long)]
        allow_shrink: bool,
        /// Shrink even while NBD clients are attached (disconnects them first).
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume, its snapshots and their data (refused while clones depend on
    /// them). A replicated volume's copies are removed from every node; a node that is
    /// down removes its copy when it returns.
    #[command(after_help = "Examples:\n  strata volume delete vm2\n  \
        strata volume delete vm2 --force   # even while NBD clients are attached")]
    Delete {
        /// Volume name.
        name: String,
        /// Delete even while NBD clients are attached (disconnects them).
        #[arg(long)]
        force: bool,
    },
    /// Make a writable volume from a snapshot; it shares the snapshot's blocks.
    #[command(after_help = "Examples:\n  strata volume clone vm1@golden vm2\n  \
        strata volume clone vm1@golden vm3 --allow client-c   # its own access list")]
    Clone {
        /// The snapshot, as VOL@SNAP.
        source: String,
        /// The new volume's name.
        name: String,
        /// The clone's own access list: certificate subjects (CN) admitted (repeatable).
        /// Without --allow and --allow-net the clone takes its source volume's list.
        #[arg(long = "allow", value_name = "SUBJECT")]
        allow: Vec<String>,
        /// The clone's own access list: networks (CIDR) admitted (repeatable).
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_net: Vec<String>,
    },
    /// Show or replace a volume's NBD access list: who may open it and its snapshots.
    /// With --allow/--allow-net the list becomes exactly those (a client matching any
    /// entry is admitted; others get NBD_REP_ERR_POLICY and do not see it listed); with
    /// --clear anyone may open it; with neither it is shown. Open connections stay.
    #[command(after_help = "Examples:\n  strata volume access vm1\n  \
        strata volume access vm1 --allow client-a --allow-net 192.0.2.0/24\n  \
        strata volume access vm1 --clear")]
    Access {
        /// Volume name.
        name: String,
        /// A client certificate subject (CN) admitted (repeatable).
        #[arg(long = "allow", value_name = "SUBJECT")]
        allow: Vec<String>,
        /// A network (CIDR, or one address) admitted (repeatable).
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_net: Vec<String>,
        /// Remove the list: anyone who reaches NBD (and passes TLS) may open it.
        #[arg(long, conflicts_with_all = ["allow", "allow_net"])]
        clear: bool,
    },
    /// Move a replicated volume's ownership to a node holding an active copy: that node
    /// then orders its I/O (clients of every node keep their connections; their requests
    /// are forwarded to the owner). If that node owns it already, nothing moves (it says
    /// so).
    #[command(after_help = "Example:\n  strata volume attach vm1 --node 2")]
    Attach {
        /// Volume name.
        name: String,
        /// The node to own it.
        #[arg(long)]
        node: u64,
    },
    /// Return a volume to one of its snapshots (its writes since are discarded; every
    /// snapshot stays).
    #[command(after_help = "Example:\n  strata volume rollback vm1@before-upgrade")]
    Rollback {
        /// The snapshot, as VOL@SNAP.
        snapshot: String,
        /// Roll back even while NBD clients are attached (disconnects them first).
        #[arg(long)]
        force: bool,
    },
}

/// `strata snapshot …`
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot: instant, whatever the volume's size. It is exported read-only over
    /// NBD as VOL@SNAP.
    #[command(after_help = "Example:\n  strata snapshot create vm1@before-upgrade\n  \
        qemu-img info nbd://127.0.0.1:10809/vm1@before-upgrade")]
    Create {
        /// VOL@SNAP (the snapshot name follows the volume name rules).
        snapshot: String,
    },
    /// List a volume's snapshots, oldest first, with the space each holds alone.
    #[command(after_help = "Example:\n  strata snapshot list vm1")]
    List {
        /// Volume name.
        volume: String,
    },
    /// Delete a snapshot, freeing the blocks only it holds (refused while clones depend
    /// on it). The delete is instant; the log reuses the space as the background cleaner
    /// frees the segments it lay in.
    #[command(after_help = "Examples:\n  strata snapshot delete vm1@before-upgrade\n  \
        strata snapshot delete vm1@before-upgrade --wait   # and follow its space's reuse")]
    Delete {
        /// VOL@SNAP.
        snapshot: String,
        /// Delete even while NBD clients read it (disconnects them).
        #[arg(long)]
        force: bool,
        /// Then follow the space only this snapshot held until the log can reuse it (a
        /// bar on stderr); stops when it has not moved for 10 s, saying what remains
        /// and why (the cleaner leaves segments more than a quarter live, and runs only
        /// once 256 MiB and a quarter of the log are dead).
        #[arg(long)]
        wait: bool,
    },
}

/// `strata cluster …`
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Found a cluster with the node the API belongs to as its one member (a node started
    /// with `strata serve` and no `join`). `strata up` does this by itself.
    #[command(after_help = "Example:\n  strata serve --config n1.toml &\n  strata cluster init")]
    Init,
    /// Show the leader, the term, and every member: role, RPC address, site/rack, session
    /// state and incarnation.
    #[command(after_help = "Examples:\n  strata cluster status\n  \
        strata cluster status --json")]
    Status,
}

/// `strata node …`
#[derive(clap::Subcommand, Debug)]
pub enum NodeCommand {
    /// List the cluster's nodes: role, state (up/down), incarnation and addresses.
    #[command(after_help = "Example:\n  strata node list")]
    List,
    /// Add a running node (started with `strata serve`, the cluster's secret, no `join`)
    /// as a learner; it becomes a voter when the count of voters can grow to 3 or 5.
    #[command(after_help = "Example:\n  strata node add 4 10.0.0.4:10810")]
    Add {
        /// Its node_id.
        id: u64,
        /// Its rpc address.
        rpc: String,
    },
    /// Remove a node from the cluster (a voter is replaced by a learner when one exists).
    /// Each replicated volume with a copy there gets a new copy on a member holding none,
    /// once one is up. A node that is up is refused, saying what its removal would cost
    /// (the metadata service's voters left, the copies placed again), unless --force.
    #[command(
        after_help = "Examples:\n  strata node remove 4           # node 4 stopped (down)\n  \
        strata node remove 4 --force   # even while it runs"
    )]
    Remove {
        /// Its node_id.
        id: u64,
        /// Remove it even while it is up.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a cluster command.
pub fn cluster(client: &Client, json_out: bool, cmd: ClusterCommand) -> anyhow::Result<()> {
    let v = match cmd {
        ClusterCommand::Init => client.call("POST", "/v1/cluster/init", None)?,
        ClusterCommand::Status => match client.call("GET", "/v1/cluster", None) {
            Ok(v) => v,
            Err(e) => {
                // Without a leader, say what this node knows of itself.
                if let Ok(node) = client.call("GET", "/v1/node", None) {
                    let m = &node["meta"];
                    eprintln!(
                        "this node: id {} {} term {} leader {} incarnation {}",
                        m["id"],
                        m["state"].as_str().unwrap_or("?"),
                        m["term"],
                        m["leader"],
                        m["incarnation"]
                    );
                }
                return Err(e);
            }
        },
    };
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let c = &v["cluster"];
    outln!("leader: node {}   term: {}   revision: {}", c["leader"], c["term"], c["revision"]);
    print_members(&c["members"]);
    Ok(())
}

fn print_members(members: &Value) {
    let rows: Vec<Vec<String>> = members
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let record = &m["record"];
            let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
            let session = &m["session"];
            let state = match session["up"].as_bool() {
                Some(true) => "up",
                Some(false) => "down",
                None => "unregistered",
            };
            vec![
                m["id"].to_string(),
                text(&m["role"]),
                state.to_owned(),
                session["incarnation"].as_u64().map_or("-".into(), |i| i.to_string()),
                text(&m["rpc"]),
                text(&record["http"]),
                text(&record["nbd"]),
                format!("{}/{}", text(&record["site"]), text(&record["rack"])),
            ]
        })
        .collect();
    table(&["NODE", "ROLE", "STATE", "INCARNATION", "RPC", "HTTP", "NBD", "SITE/RACK"], &rows);
}

/// Runs a node command.
pub fn node(client: &Client, json_out: bool, cmd: NodeCommand) -> anyhow::Result<()> {
    let v = match cmd {
        NodeCommand::List => {
            let members = client.call("GET", "/v1/cluster/nodes", None)?;
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&members)?);
            } else {
                print_members(&members);
            }
            return Ok(());
        }
        NodeCommand::Add { id, rpc } => {
            client.call("POST", "/v1/cluster/nodes", Some(json!({"id": id, "rpc": rpc})))?
        }
        NodeCommand::Remove { id, force } => {
            client.call("DELETE", &format!("/v1/cluster/nodes/{id}?force={force}"), None)?
        }
    };
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_members(&v["cluster"]["members"]);
    }
    Ok(())
}

/// Splits `VOL@SNAP` for the URL, or explains the expected shape.
fn split(full: &str) -> anyhow::Result<(String, String)> {
    match full.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((encode(v), encode(s))),
        _ => bail!("{full:?} is not VOL@SNAP (e.g. vm1@before-upgrade) (invalid_argument)"),
    }
}

/// Runs a volume command.
pub fn volume(client: &Client, json_out: bool, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create { name, size, replicas, min_replicas, allow, allow_net } => {
            // Parsed here, so a typo fails before any request; the API takes bytes (as
            // text it takes only M, G and T).
            let size = parse_size(&size)?;
            let mut body = json!({"name": name, "size": size, "replicas": replicas});
            if let Some(m) = min_replicas {
                body["min_replicas"] = json!(m);
            }
            if !allow.is_empty() || !allow_net.is_empty() {
                body["allow"] = json!(allow);
                body["allow_net"] = json!(allow_net);
            }
            let v = client.call("POST", "/v1/volumes", Some(body))?;
            print_volume(json_out, &v, "created")
        }
        VolumeCommand::List => {
            let v = client.call("GET", "/v1/volumes", None)?;
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let volumes: Vec<VolumeInfo> = serde_json::from_value(v)?;
            print_table(&volumes);
            warn_if_full(client);
            Ok(())
        }
        VolumeCommand::Info { name, watch } => {
            let v = client.call("GET", &format!("/v1/volumes/{}", encode(&name)), None)?;
            print_volume(json_out, &v, "")?;
            if watch {
                let info: VolumeInfo = serde_json::from_value(v)?;
                crate::follow::watch_volume(client, &name, &info)?;
            }
            Ok(())
        }
        VolumeCommand::Resize { name, size, allow_shrink, force } => {
            let size = parse_size(&size)?;
            let body = json!({"size": size, "allow_shrink": allow_shrink, "force": force});
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/resize", encode(&name)),
                Some(body),
            )?;
            print_volume(json_out, &v, "resized")
        }
        VolumeCommand::Delete { name, force } => {
            let path = format!("/v1/volumes/{}?force={force}", encode(&name));
            let answer = client.call("DELETE", &path, None)?;
            // A replicated volume whose copies are not all removed yet (nodes down).
            match answer["pending_nodes"].as_array() {
                Some(pending) if json_out => {
                    outln!("{}", json!({"deleted": name, "pending_nodes": pending}))
                }
                Some(_) => outln!("{}", answer["message"].as_str().unwrap_or_default()),
                None => print_deleted(json_out, &name),
            }
            Ok(())
        }
        VolumeCommand::Clone { source, name, allow, allow_net } => {
            let (v, s) = split(&source)?;
            let path = format!("/v1/volumes/{v}/snapshots/{s}/clone");
            let mut body = json!({"name": name});
            if !allow.is_empty() || !allow_net.is_empty() {
                body["allow"] = json!(allow);
                body["allow_net"] = json!(allow_net);
            }
            let v = client.call("POST", &path, Some(body))?;
            print_volume(json_out, &v, "cloned")
        }
        VolumeCommand::Access { name, allow, allow_net, clear } => {
            let v = if clear || !allow.is_empty() || !allow_net.is_empty() {
                let path = format!("/v1/volumes/{}/access", encode(&name));
                let body = json!({"allow": allow, "allow_net": allow_net});
                client.call("PUT", &path, Some(body))?
            } else {
                client.call("GET", &format!("/v1/volumes/{}", encode(&name)), None)?
            };
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&v["access"])?);
                return Ok(());
            }
            let info: VolumeInfo = serde_json::from_value(v)?;
            outln!("{}: {}", info.name, info.access.describe());
            Ok(())
        }
        VolumeCommand::Attach { name, node } => {
            // Whether it is there already decides what to say (the API then moves
            // nothing: it checks the node can own it and answers at once).
            let before = client.call("GET", &format!("/v1/volumes/{}", encode(&name)), None)?;
            let path = format!("/v1/volumes/{}/attach", encode(&name));
            let v = client.call("POST", &path, Some(json!({"node": node})))?;
            let there = before["node"].as_u64() == Some(node)
                && before["epoch"].is_u64()
                && before["epoch"] == v["epoch"];
            if there && !json_out {
                outln!("{name} is on node {node} already (it owns the volume): nothing moved");
                return Ok(());
            }
            print_volume(json_out, &v, "moved")
        }
        VolumeCommand::Rollback { snapshot, force } => {
            let (v, s) = split(&snapshot)?;
            let path = format!("/v1/volumes/{v}/rollback");
            let snap = snapshot.split_once('@').map(|(_, s)| s).unwrap_or(&s);
            let v = client.call("POST", &path, Some(json!({"snapshot": snap, "force": force})))?;
            print_volume(json_out, &v, "rolled back")
        }
    }
}

fn print_deleted(json_out: bool, name: &str) {
    if json_out {
        outln!("{}", json!({"deleted": name}));
    } else {
        outln!("deleted {name}");
    }
}

/// Runs a snapshot command.
pub fn snapshot(client: &Client, json_out: bool, cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { snapshot } => {
            let (v, _) = split(&snapshot)?;
            let name = snapshot.split_once('@').map(|(_, s)| s).unwrap_or_default();
            let path = format!("/v1/volumes/{v}/snapshots");
            let s = client.call("POST", &path, Some(json!({"name": name})))?;
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let info: SnapshotInfo = serde_json::from_value(s)?;
                outln!("created {} (read-only export {})", info.name, info.export_uri);
            }
            Ok(())
        }
        SnapshotCommand::List { volume } => {
            let path = format!("/v1/volumes/{}/snapshots", encode(&volume));
            let s = client.call("GET", &path, None)?;
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let snapshots: Vec<SnapshotInfo> = serde_json::from_value(s)?;
            let rows: Vec<Vec<String>> = snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        format_size(s.size_bytes),
                        format_size(s.allocated_bytes),
                        format_size(s.exclusive_bytes),
                        s.clones.join(","),
                        s.export_uri.clone(),
                    ]
                })
                .collect();
            table(&["SNAPSHOT", "SIZE", "REFERENCED", "EXCLUSIVE", "CLONES", "EXPORT"], &rows);
            if rows.is_empty() {
                outln!("(no snapshots; take one with `strata snapshot create {volume}@NAME`)");
            }
            Ok(())
        }
        SnapshotCommand::Delete { snapshot, force, wait } => {
            let (v, s) = split(&snapshot)?;
            // Its store id names its space in GET /v1/node's reclaim after the delete.
            let id = if wait {
                let info = client.call("GET", &format!("/v1/volumes/{v}/snapshots/{s}"), None)?;
                Some(serde_json::from_value::<SnapshotInfo>(info)?.id)
            } else {
                None
            };
            let path = format!("/v1/volumes/{v}/snapshots/{s}?force={force}");
            client.call("DELETE", &path, None)?;
            print_deleted(json_out, &snapshot);
            match id {
                Some(id) => crate::follow::wait_reclaim(client, &snapshot, &id),
                None => Ok(()),
            }
        }
    }
}

fn print_volume(json_out: bool, v: &Value, verb: &str) -> anyhow::Result<()> {
    if json_out {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let info: VolumeInfo = serde_json::from_value(v.clone())?;
    if !verb.is_empty() {
        outln!("{verb} {} ({})", info.name, info.size);
    }
    outln!("name:         {}", info.name);
    outln!("id:           {}", info.id);
    outln!("size:         {} ({} bytes)", info.size, info.size_bytes);
    outln!("allocated:    {}", format_size(info.allocated_bytes));
    outln!("  exclusive:  {}", format_size(info.exclusive_bytes));
    outln!("  shared:     {}", format_size(info.shared_bytes));
    outln!(
        "snapshots:    {} holding {} alone",
        info.snapshots.len(),
        format_size(info.snapshot_exclusive_bytes)
    );
    for s in &info.snapshots {
        outln!(
            "  {:<24} exclusive {:>8}  shared {:>8}",
            s.name,
            format_size(s.exclusive_bytes),
            format_size(s.shared_bytes)
        );
    }
    if let Some(origin) = &info.origin {
        outln!("cloned from:  {origin}");
    }
    outln!("connections:  {}", info.connections);
    outln!("export:       {}", info.export_uri);
    outln!("access:       {}", info.access.describe());
    if !info.components.is_empty() {
        outln!("replicas:     {} (owner: node {}, epoch {})", info.replicas, info.node, info.epoch);
        for c in &info.components {
            let missed = c.dirty_bytes.map_or(String::new(), |d| {
                if d == 0 {
                    String::new()
                } else {
                    format!("  missed {}", format_size(d))
                }
            });
            let missed = match c.resynced_bytes {
                Some(r) if r > 0 => format!("{missed}  resynced {}", format_size(r)),
                _ => missed,
            };
            let missed = match c.scan_left_bytes {
                Some(l) if l > 0 => format!("{missed}  scan: {} left", format_size(l)),
                _ => missed,
            };
            let missed = match c.stale_lsn {
                Some(l) => format!("{missed}  missed from lsn {l}"),
                None => missed,
            };
            let missed = if c.suspect {
                format!("{missed}  suspect: back from a power loss, may lack unsynced writes")
            } else {
                missed
            };
            let lsn = c.lsn.map_or(String::new(), |l| format!("  lsn {l}"));
            outln!("  node {:<4} component {:<6} {}{lsn}{missed}", c.node, c.id, c.state);
        }
    }
    Ok(())
}

fn print_table(volumes: &[VolumeInfo]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.node.to_string(),
                v.size.clone(),
                format_size(v.allocated_bytes),
                v.snapshots.len().to_string(),
                v.connections.to_string(),
                v.export_uri.clone(),
            ]
        })
        .collect();
    table(&["NAME", "NODE", "SIZE", "ALLOCATED", "SNAPS", "CONNS", "EXPORT"], &rows);
    if rows.is_empty() {
        outln!("(no volumes; create one with `strata volume create NAME --size 10G`)");
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let parts: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// Prints a warning line when the node the CLI talks to is nearly full or refusing writes
/// (nothing if it cannot tell: an older node, or the request failed).
fn warn_if_full(client: &Client) {
    let Ok(node) = client.call("GET", "/v1/node", None) else { return };
    let Ok(space) = serde_json::from_value::<crate::node::SpaceStatus>(node["space"].clone())
    else {
        return;
    };
    if let Some(warning) = crate::node::Node::space_warning(&space) {
        outln!("warning: {warning}");
    }
}
