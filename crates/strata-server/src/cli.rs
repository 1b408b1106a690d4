//! The operator's volume commands, over the HTTP API.

use crate::node::VolumeInfo;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use strata_types::{format_size, parse_size};

/// `strata volume …`
#[derive(clap::Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume.
    #[command(after_help = "Example:\n  strata volume create vm1 --size 10G")]
    Create {
        /// Name: 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -).
        name: String,
        /// Size in bytes or with a binary suffix: 512M, 10G, 1T (multiple of 4096).
        #[arg(long)]
        size: String,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Info {
        /// Volume name.
        name: String,
    },
    /// Grow a volume (clients see the new size when they reconnect).
    #[command(after_help = "Example:\n  strata volume resize vm1 --size 20G")]
    Resize {
        /// Volume name.
        name: String,
        /// The new size.
        #[arg(long)]
        size: String,
        /// Allow a smaller size (discards the data past the new end).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Delete a volume and its data.
    Delete {
        /// Volume name.
        name: String,
        /// Delete even while NBD clients are attached (disconnects them).
        #[arg(long)]
        force: bool,
    },
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(api: &str) -> Client {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Client { base: api.trim_end_matches('/').to_owned(), agent }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(body)) => self.agent.post(&url).send_json(body),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut response =
            response.with_context(|| format!("cannot reach the Strata API at {}", self.base))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().context("read the API response")?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("the API answered {status} with non-JSON"))?
        };
        if !status.is_success() {
            let message = value["message"].as_str().unwrap_or("no message");
            let code = value["code"].as_str().unwrap_or("unknown");
            bail!("{message} ({code})");
        }
        Ok(value)
    }
}

/// Runs a volume command.
pub fn volume(api: &str, json_out: bool, cmd: VolumeCommand) -> anyhow::Result<()> {
    let client = Client::new(api);
    match cmd {
        VolumeCommand::Create { name, size } => {
            // Parse locally too, so a typo fails before any request.
            parse_size(&size)?;
            let v =
                client.call("POST", "/v1/volumes", Some(json!({"name": name, "size": size})))?;
            print_volume(json_out, &v, "created")
        }
        VolumeCommand::List => {
            let v = client.call("GET", "/v1/volumes", None)?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let volumes: Vec<VolumeInfo> = serde_json::from_value(v)?;
            print_table(&volumes);
            Ok(())
        }
        VolumeCommand::Info { name } => {
            let v = client.call("GET", &format!("/v1/volumes/{}", encode(&name)), None)?;
            print_volume(json_out, &v, "")
        }
        VolumeCommand::Resize { name, size, allow_shrink } => {
            parse_size(&size)?;
            let body = json!({"size": size, "allow_shrink": allow_shrink});
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/resize", encode(&name)),
                Some(body),
            )?;
            print_volume(json_out, &v, "resized")
        }
        VolumeCommand::Delete { name, force } => {
            let path = format!("/v1/volumes/{}?force={force}", encode(&name));
            client.call("DELETE", &path, None)?;
            if json_out {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("deleted {name}");
            }
            Ok(())
        }
    }
}

/// Percent-encodes a path segment (names are validated server-side; this keeps odd input
/// from changing the URL's shape).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_volume(json_out: bool, v: &Value, verb: &str) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let info: VolumeInfo = serde_json::from_value(v.clone())?;
    if !verb.is_empty() {
        println!("{verb} {} ({})", info.name, info.size);
    }
    println!("name:         {}", info.name);
    println!("id:           {}", info.id);
    println!("size:         {} ({} bytes)", info.size, info.size_bytes);
    println!("allocated:    {}", format_size(info.allocated_bytes));
    println!("connections:  {}", info.connections);
    println!("export:       {}", info.export_uri);
    Ok(())
}

fn print_table(volumes: &[VolumeInfo]) {
    let header = ["NAME", "SIZE", "ALLOCATED", "CONNS", "EXPORT"];
    let rows: Vec<[String; 5]> = volumes
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.size.clone(),
                format_size(v.allocated_bytes),
                v.connections.to_string(),
                v.export_uri.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let parts: Vec<String> =
            cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        println!("(no volumes; create one with `strata volume create NAME --size 10G`)");
    }
}
