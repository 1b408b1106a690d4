//! A node's configuration: `strata serve --config FILE` reads it from TOML; `strata up`
//! builds the one-node default. Unknown keys are errors (a misspelt key must not be
//! silently ignored).
//!
//! ```toml
//! node_id = 2
//! data_dir = "/var/lib/strata"
//! rpc = "127.0.0.1:10820"       # inter-node; `strata up` uses 127.0.0.1:10810
//! nbd = "127.0.0.1:10829"
//! http = "127.0.0.1:8082"
//! join = ["127.0.0.1:10810"]    # any existing member; empty on the first node
//! site = "a"
//! rack = "r1"
//! secret_file = "secret"        # the cluster secret, relative to data_dir if relative
//! move_after_secs = 60          # optional: a volume used only through one other node
//! move_hold_secs = 300          # moves there (0: never), once owned this long
//! scrub_every_secs = 604800     # optional: an owner compares its copies this often (0: never)
//! resync_jobs = 2               # optional: resync jobs this node sends at once, and jobs
//!                               # writing to its copies it lets in at once (1 or more)
//! tls_dir = "/etc/strata/tls"   # optional: x509 credentials in qemu's layout (ca-cert.pem,
//!                               # server-cert.pem, server-key.pem): NBD over TLS, HTTPS
//! nbd_tls = "require"           # "require" (the default with tls_dir) or "off"
//! tls_verify_peer = false       # true: NBD clients must present a certificate of the CA
//! http_allowed_hosts = []       # names the API answers to beside its address and localhost
//! nbd_idle_timeout_secs = 0     # an NBD connection idle this long is closed (0: never)
//! reserve = "5%"                # optional: space client writes leave free (or "10G")
//! ```
//!
//! `reserve`: client writes get ENOSPC (qemu's `werror=enospc` pauses the VM) once the
//! data directory's file system has no more than this free, so that the store's journal,
//! checkpoints and cleaner, the metadata service's database, trims and deletes always
//! have room. A size (`"10G"`) or a percentage of the file system (`"5%"`, 1 to 50); the
//! default is 5 %, at least 64 MiB and at most half the file system.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The cluster secret's length in bytes.
pub const SECRET_BYTES: usize = 32;

/// A node's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node's id: unique in the cluster, 1 or more, never reused.
    pub node_id: u64,
    /// Where the node keeps its data (created if missing).
    pub data_dir: PathBuf,
    /// Inter-node RPC address (listened on, and given to other members).
    pub rpc: SocketAddr,
    /// NBD listen address.
    #[serde(default = "default_nbd")]
    pub nbd: SocketAddr,
    /// HTTP API listen address.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Members to join through (any one suffices); empty on the first node.
    #[serde(default)]
    pub join: Vec<String>,
    /// Site (failure domain above racks).
    #[serde(default)]
    pub site: String,
    /// Rack.
    #[serde(default)]
    pub rack: String,
    /// The cluster secret's file, relative to `data_dir` if relative.
    #[serde(default = "default_secret")]
    pub secret_file: PathBuf,
    /// A replicated volume whose clients have all been on one other node (holding an
    /// active copy) for this many seconds moves there; 0: never by itself.
    #[serde(default = "default_move_after")]
    pub move_after_secs: u64,
    /// A volume keeps an owner at least this many seconds before it moves by itself
    /// (hysteresis: never ping-pong).
    #[serde(default = "default_move_hold")]
    pub move_hold_secs: u64,
    /// An owner compares every copy of each replicated volume with its own this often
    /// (a scrub: a block that rotted on a copy is found and rewritten); 0: never.
    #[serde(default = "default_scrub_every")]
    pub scrub_every_secs: u64,
    /// Resync jobs this node runs at once (sending copies' data), and resync jobs of
    /// other nodes writing to its copies at once (`resync.rs` invariant 1); 1 or more.
    #[serde(default = "default_resync_jobs")]
    pub resync_jobs: usize,
    /// x509 credentials in qemu's layout (`ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`), relative to `data_dir` if relative: NBD serves TLS and HTTP
    /// serves HTTPS with them.
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    /// NBD's TLS mode: `require` (the default when `tls_dir` is set) or `off`. An NBD
    /// address beyond loopback without TLS needs `off` written out.
    #[serde(default)]
    pub nbd_tls: Option<NbdTls>,
    /// NBD clients must present a certificate signed by `ca-cert.pem` (qemu's
    /// verify-peer).
    #[serde(default)]
    pub tls_verify_peer: bool,
    /// Host names the HTTP API answers to besides its listen address, `localhost` and
    /// loopback addresses (a request naming any other host is refused: DNS rebinding).
    #[serde(default)]
    pub http_allowed_hosts: Vec<String>,
    /// An NBD connection with no request in flight and none arriving for this many
    /// seconds is closed (a client that went away without a FIN); 0: never.
    #[serde(default = "default_nbd_idle_timeout")]
    pub nbd_idle_timeout_secs: u64,
    /// Space client writes leave free on the data directory's file system (see the
    /// module doc); `None`: [`strata_types::RESERVE_DEFAULT`].
    #[serde(default, deserialize_with = "de_reserve")]
    pub reserve: Option<strata_types::Reserve>,
}

fn default_nbd_idle_timeout() -> u64 {
    strata_types::limits::NBD_IDLE_TIMEOUT_SECS_DEFAULT
}

/// NBD's TLS mode (config key `nbd_tls`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    /// Every client must start TLS before any other option (NBD_REP_ERR_TLS_REQD).
    Require,
    /// Plain NBD (on a network beyond loopback only when written out).
    Off,
}

fn de_reserve<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<strata_types::Reserve>, D::Error> {
    let text = String::deserialize(d)?;
    strata_types::Reserve::parse(&text).map(Some).map_err(serde::de::Error::custom)
}

fn default_scrub_every() -> u64 {
    7 * 24 * 3600
}

fn default_resync_jobs() -> usize {
    crate::resync::JOBS_DEFAULT
}

fn default_move_after() -> u64 {
    60
}

fn default_move_hold() -> u64 {
    300
}

fn default_nbd() -> SocketAddr {
    "127.0.0.1:10809".parse().expect("valid")
}

fn default_http() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid")
}

fn default_secret() -> PathBuf {
    PathBuf::from("secret")
}

/// `strata up`'s inter-node address.
pub const UP_RPC: &str = "127.0.0.1:10810";

impl Config {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.node_id == 0 {
            bail!("node_id must be 1 or more");
        }
        if self.data_dir.as_os_str().is_empty() {
            bail!("data_dir must not be empty");
        }
        if self.resync_jobs == 0 {
            bail!("resync_jobs must be 1 or more");
        }
        for addr in &self.join {
            if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
                bail!("join address {addr:?} is not HOST:PORT");
            }
        }
        if self.rpc.ip().is_unspecified() {
            bail!("rpc must be the address other nodes reach this node at, not {}", self.rpc.ip());
        }
        self.nbd_tls_mode()?;
        let ports = [self.rpc, self.nbd, self.http];
        for (i, a) in ports.iter().enumerate() {
            if a.port() != 0 && ports[..i].contains(a) {
                bail!("rpc, nbd and http must listen on different addresses ({a} twice)");
            }
        }
        Ok(())
    }

    /// NBD's TLS mode: `nbd_tls` as written, else `require` with credentials and `off`
    /// without. Refuses `require` without credentials, and plain NBD on an address beyond
    /// loopback unless `nbd_tls = "off"` is written out (anyone who reaches the port could
    /// read and overwrite every volume).
    pub fn nbd_tls_mode(&self) -> anyhow::Result<NbdTls> {
        match (self.nbd_tls, &self.tls_dir) {
            (Some(NbdTls::Require), None) => {
                bail!("nbd_tls = \"require\" needs tls_dir (the x509 credentials)")
            }
            (Some(mode), _) => Ok(mode),
            (None, Some(_)) => Ok(NbdTls::Require),
            (None, None) if self.nbd.ip().is_loopback() => Ok(NbdTls::Off),
            (None, None) => bail!(
                "NBD listens on {} beyond loopback without TLS: anyone who reaches it could \
                 read and overwrite every volume; set tls_dir (x509 credentials, then NBD \
                 requires TLS) or write nbd_tls = \"off\" to serve plain NBD anyway",
                self.nbd
            ),
        }
    }

    /// The TLS credential directory's path, if one is set.
    pub fn tls_path(&self) -> Option<PathBuf> {
        self.tls_dir
            .as_ref()
            .map(|d| if d.is_absolute() { d.clone() } else { self.data_dir.join(d) })
    }

    /// The secret file's path.
    pub fn secret_path(&self) -> PathBuf {
        if self.secret_file.is_absolute() {
            self.secret_file.clone()
        } else {
            self.data_dir.join(&self.secret_file)
        }
    }

    /// Reads the cluster secret. A node that founds a cluster (no `join`) creates it when
    /// missing (32 random bytes, mode 0600); a joining node must be given the cluster's.
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        let path = self.secret_path();
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 16 => {
                crate::files::warn_if_exposed(&path, "the cluster secret");
                Ok(bytes)
            }
            Ok(_) => bail!("the secret file {} is shorter than 16 bytes", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.join.is_empty() => {
                let secret = random_bytes(SECRET_BYTES)?;
                write_private(&path, &secret)
                    .with_context(|| format!("create the cluster secret {}", path.display()))?;
                tracing::info!("created the cluster secret {}", path.display());
                Ok(secret)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "the cluster secret {} is missing: copy the file `secret` from an existing \
                 member's data directory (a node cannot join without it)",
                path.display()
            ),
            Err(e) => Err(e).with_context(|| format!("read the secret {}", path.display())),
        }
    }
}

/// Creates `path` (which must not exist) readable by its owner only, with `bytes`,
/// synced with its directory.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_and_bad_files_are_clear_errors() {
        let c = Config::parse(
            r#"
            node_id = 2
            data_dir = "/var/lib/strata"
            rpc = "127.0.0.1:10820"
            nbd = "127.0.0.1:10829"
            http = "127.0.0.1:8082"
            join = ["127.0.0.1:10810"]
            site = "a"
            rack = "r1"
            secret_file = "secret"
            reserve = "10%"
            resync_jobs = 3
            "#,
        )
        .unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.resync_jobs, 3);
        assert_eq!(c.reserve, Some(strata_types::Reserve::Percent(10)));
        assert_eq!(c.secret_path(), PathBuf::from("/var/lib/strata/secret"));
        assert_eq!(c.join, vec!["127.0.0.1:10810".to_owned()]);
        let bad = [
            ("node_id = 0\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"", "node_id"),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"nowhere\"", "rpc"),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nrack_id = 3", "rack_id"),
            ("node_id = 1\nrpc = \"127.0.0.1:1\"", "data_dir"),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\njoin = [\"x\"]", "join"),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:8080\"", "different"),
            ("node_id = \"one\"", "node_id"),
            (
                "node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nresync_jobs = 0",
                "resync_jobs",
            ),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"0.0.0.0:10810\"", "not 0.0.0.0"),
            (
                "node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nnbd = \"0.0.0.0:10809\"",
                "beyond loopback without TLS",
            ),
            (
                "node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nnbd_tls = \"require\"",
                "needs tls_dir",
            ),
            ("node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nnbd_tls = \"maybe\"", "maybe"),
            (
                "node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nreserve = \"60%\"",
                "1% to 50%",
            ),
        ];
        let open = "node_id = 1\ndata_dir = \"d\"\nrpc = \"127.0.0.1:1\"\nnbd = \"0.0.0.0:1\"\n";
        let c = Config::parse(&format!("{open}nbd_tls = \"off\"")).unwrap();
        assert_eq!(c.nbd_tls_mode().unwrap(), NbdTls::Off, "written out: served plain");
        let c = Config::parse(&format!("{open}tls_dir = \"tls\"")).unwrap();
        assert_eq!(c.nbd_tls_mode().unwrap(), NbdTls::Require);
        assert_eq!(c.tls_path(), Some(PathBuf::from("d/tls")));
        for (text, needle) in bad {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_joining_node_without_the_secret_is_told_where_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::parse(&format!(
            "node_id = 1\ndata_dir = {:?}\nrpc = \"127.0.0.1:1\"",
            dir.path()
        ))
        .unwrap();
        let s = c.secret().unwrap();
        assert_eq!(s.len(), SECRET_BYTES);
        assert_eq!(c.secret().unwrap(), s, "read back, not made again");
        c.secret_file = PathBuf::from("other");
        c.join = vec!["127.0.0.1:2".into()];
        let e = c.secret().unwrap_err().to_string();
        assert!(e.contains("copy the file"), "{e}");
        assert!(!dir.path().join("other").exists());
    }
}
