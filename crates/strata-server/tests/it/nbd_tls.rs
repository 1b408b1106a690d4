//! NBD over TLS and per-volume access lists, black box: a real `strata up --tls-dir`
//! with credentials made by openssl in qemu's layout (`harness::make_tls_dir`), driven by
//! qemu-img, qemu-io and nbdinfo with client certificates, and by the raw-socket client
//! for what real clients never send (options before STARTTLS).

use crate::harness::{make_tls_dir, Node, STRATA};
use crate::raw::{Raw, OPT_GO, OPT_LIST, REP_ACK};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const OPT_STARTTLS: u32 = 5;
const OPT_ABORT: u32 = 2;
const ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// A node requiring TLS, its credentials (clients `client-a`, `client-b`) beside it.
struct TlsNode {
    node: Node,
    tls: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TlsNode {
    fn start(extra: &[&str]) -> TlsNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tls = tmp.path().join("tls");
        make_tls_dir(&tls, &["client-a", "client-b"]);
        let data = tmp.path().join("data");
        let mut command = Command::new(STRATA);
        command
            .args(["up", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--tls-dir")
            .arg(&tls)
            .args(extra);
        let node = Node::launch_command(command, &data);
        TlsNode { node, tls, _tmp: tmp }
    }

    fn client_dir(&self, cn: &str) -> PathBuf {
        self.tls.join("clients").join(cn)
    }

    fn port(&self) -> &str {
        self.node.nbd.rsplit_once(':').expect("host:port").1
    }

    /// qemu's `--object` and `--image-opts` for `export` as client `cn`.
    fn qemu_args(&self, cn: &str, export: &str) -> Vec<String> {
        vec![
            "--object".into(),
            format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", self.client_dir(cn).display()),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
                self.port()
            ),
        ]
    }

    fn nbds(&self, cn: &str, export: &str) -> String {
        format!(
            "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
            self.port(),
            self.client_dir(cn).display()
        )
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.node.cli(args);
        assert!(out.status.success(), "strata {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn tool(program: &str, args: &[String]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("{program} is required by this test (install it; .ci/run does): {e}")
    })
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn qemu_io(t: &TlsNode, cn: &str, export: &str, commands: &[&str]) -> Output {
    let mut args = t.qemu_args(cn, export);
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    tool("qemu-io", &args)
}

fn assert_io_ok(out: &Output) {
    let all = text(out);
    assert!(
        out.status.success() && !all.contains("failed") && !all.contains("Pattern verification"),
        "qemu-io: {all}"
    );
}

fn nbdinfo(args: &[String]) -> Output {
    tool("nbdinfo", args)
}

#[test]
fn qemu_and_nbdinfo_work_over_tls_and_plaintext_clients_are_refused() {
    let t = TlsNode::start(&[]);
    t.node.create("vm", "64M");
    // qemu-io writes and reads back over TLS.
    let out = qemu_io(&t, "client-a", "vm", &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    assert_io_ok(&out);
    let mut info = vec!["info".to_owned()];
    info.extend(t.qemu_args("client-a", "vm"));
    let out = tool("qemu-img", &info);
    assert!(out.status.success() && text(&out).contains("64 MiB"), "qemu-img: {}", text(&out));
    // libnbd through an nbds:// URI.
    let out = nbdinfo(&[t.nbds("client-a", "vm")]);
    assert!(out.status.success(), "nbdinfo: {}", text(&out));
    assert!(text(&out).contains("67108864"), "{}", text(&out));
    // Plaintext clients get the TLS-required refusal and nothing else.
    let out = tool("qemu-img", &["info".into(), t.node.uri("vm")]);
    assert!(!out.status.success(), "plain qemu-img must fail: {}", text(&out));
    assert!(text(&out).to_lowercase().contains("tls"), "qemu-img says why: {}", text(&out));
    let out = nbdinfo(&[t.node.uri("vm")]);
    assert!(!out.status.success(), "plain nbdinfo must fail: {}", text(&out));
    assert!(text(&out).to_lowercase().contains("tls"), "nbdinfo says why: {}", text(&out));
    // Without --tls-verify-peer a TLS client without a certificate is served.
    let anon = t.tls.join("anonymous");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(t.tls.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let uri = format!("nbds://127.0.0.1:{}/vm?tls-certificates={}", t.port(), anon.display());
    let out = nbdinfo(&[uri]);
    assert!(out.status.success(), "no certificate, no verify-peer: {}", text(&out));
}

#[test]
fn with_verify_peer_a_client_without_a_certificate_is_refused() {
    let t = TlsNode::start(&["--tls-verify-peer"]);
    t.node.create("vm", "16M");
    let anon = t.tls.join("anonymous");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(t.tls.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let uri = format!("nbds://127.0.0.1:{}/vm?tls-certificates={}", t.port(), anon.display());
    let out = nbdinfo(&[uri]);
    assert!(!out.status.success(), "no certificate must be refused: {}", text(&out));
    let out = nbdinfo(&[t.nbds("client-b", "vm")]);
    assert!(out.status.success(), "a certificate of the CA is served: {}", text(&out));
}

#[test]
fn access_lists_admit_named_subjects_and_networks_only() {
    let t = TlsNode::start(&[]);
    t.cli_ok(&["volume", "create", "secret", "--size", "16M", "--allow", "client-a"]);
    t.node.create("open", "16M");
    let info = t.cli_ok(&["volume", "info", "secret"]);
    assert!(info.contains("access:       client-a"), "{info}");
    // client-a reads and writes it.
    assert_io_ok(&qemu_io(
        &t,
        "client-a",
        "secret",
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    ));
    // client-b is refused by policy, in qemu and nbdinfo, and does not see it listed.
    let out = qemu_io(&t, "client-b", "secret", &["read 0 4k"]);
    assert!(!out.status.success() || text(&out).contains("failed"), "{}", text(&out));
    assert!(
        text(&out).to_lowercase().contains("policy") || text(&out).contains("access list"),
        "qemu says why: {}",
        text(&out)
    );
    let out = nbdinfo(&[t.nbds("client-b", "secret")]);
    assert!(!out.status.success(), "nbdinfo client-b: {}", text(&out));
    let list_b = text(&nbdinfo(&["--list".into(), t.nbds("client-b", "")]));
    assert!(list_b.contains("open") && !list_b.contains("secret"), "client-b's list: {list_b}");
    let list_a = text(&nbdinfo(&["--list".into(), t.nbds("client-a", "")]));
    assert!(list_a.contains("secret"), "client-a's list: {list_a}");
    // The snapshot export takes the volume's list.
    t.cli_ok(&["snapshot", "create", "secret@s1"]);
    assert!(!nbdinfo(&[t.nbds("client-b", "secret@s1")]).status.success(), "snapshot, client-b");
    assert!(nbdinfo(&[t.nbds("client-a", "secret@s1")]).status.success(), "snapshot, client-a");
    // A clone takes it too, unless given its own.
    t.cli_ok(&["volume", "clone", "secret@s1", "copy"]);
    assert!(!nbdinfo(&[t.nbds("client-b", "copy")]).status.success(), "clone, client-b");
    t.cli_ok(&["volume", "clone", "secret@s1", "copy-b", "--allow", "client-b"]);
    assert!(nbdinfo(&[t.nbds("client-b", "copy-b")]).status.success(), "own list, client-b");
    assert!(!nbdinfo(&[t.nbds("client-a", "copy-b")]).status.success(), "own list, client-a");
    // A network alone: 127.0.0.1 is not in 10.0.0.0/8, whatever the certificate.
    t.cli_ok(&["volume", "access", "secret", "--allow-net", "10.0.0.0/8"]);
    assert!(!nbdinfo(&[t.nbds("client-a", "secret")]).status.success(), "10/8 only");
    t.cli_ok(&["volume", "access", "secret", "--allow-net", "127.0.0.0/8"]);
    assert!(nbdinfo(&[t.nbds("client-b", "secret")]).status.success(), "127/8 admits");
    // Cleared: anyone again. And the list shows in `volume list --json`.
    t.cli_ok(&["volume", "access", "secret", "--allow", "client-a"]);
    let json: serde_json::Value =
        serde_json::from_str(&t.cli_ok(&["--json", "volume", "list"])).unwrap();
    let secret = json.as_array().unwrap().iter().find(|v| v["name"] == "secret").unwrap();
    assert_eq!(secret["access"]["allow"], serde_json::json!(["client-a"]), "{secret}");
    t.cli_ok(&["volume", "access", "secret", "--clear"]);
    assert!(nbdinfo(&[t.nbds("client-b", "secret")]).status.success(), "cleared");
    let shown = t.cli_ok(&["volume", "access", "secret"]);
    assert!(shown.contains("anyone"), "{shown}");
}

#[test]
fn access_lists_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start_in(tmp.path());
    let out = node.cli(&["volume", "create", "v", "--size", "16M", "--allow-net", "10.0.0.0/8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Plain NBD (loopback): the network list still holds, 127.0.0.1 is not in it.
    let out = nbdinfo(&[node.uri("v")]);
    assert!(!out.status.success(), "refused: {}", text(&out));
    node.stop();
    let node = Node::start_in(tmp.path());
    let out = nbdinfo(&[node.uri("v")]);
    assert!(!out.status.success(), "still refused after a restart: {}", text(&out));
    let out = node.cli(&["volume", "access", "v", "--clear"]);
    assert!(out.status.success());
    assert!(nbdinfo(&[node.uri("v")]).status.success());
    // Bad entries are refused with a clear error.
    let out = node.cli(&["volume", "access", "v", "--allow-net", "10.0.0.0/33"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10.0.0.0/33"));
}

/// The raw client in require mode: every option before STARTTLS is refused with
/// ERR_TLS_REQD, EXPORT_NAME closes, ABORT is answered; nothing about exports leaks.
#[test]
fn an_unauthenticated_client_gets_nothing_but_the_refusal() {
    let t = TlsNode::start(&[]);
    t.node.create("vm", "16M");
    let mut raw = Raw::connect(&t.node.nbd);
    for option in [OPT_LIST, OPT_GO, 8, 6, 999] {
        let data = if option == OPT_GO { Raw::go_data("vm") } else { Vec::new() };
        let replies = raw.option(option, &data);
        assert_eq!(replies.len(), 1, "one reply: {replies:?}");
        assert_eq!(replies[0].kind, ERR_TLS_REQD, "option {option}: {replies:?}");
        assert!(!String::from_utf8_lossy(&replies[0].data).contains("vm"));
    }
    let replies = raw.option(OPT_ABORT, &[]);
    assert_eq!(replies[0].kind, REP_ACK);
    // EXPORT_NAME before TLS: closed, no export data.
    let mut raw = Raw::connect(&t.node.nbd);
    raw.send_option(1, b"vm");
    assert!(raw.is_closed(), "EXPORT_NAME before STARTTLS closes");
    // Many options before TLS: the connection closes after a few.
    let mut raw = Raw::connect(&t.node.nbd);
    for _ in 0..16 {
        assert_eq!(raw.option(OPT_LIST, &[])[0].kind, ERR_TLS_REQD);
    }
    raw.send_option(OPT_LIST, &[]);
    let _ = raw.read_option_reply();
    assert!(raw.is_closed(), "closed past the bound");
    // Bytes sent in the clear behind STARTTLS are never taken as TLS.
    let mut raw = Raw::connect(&t.node.nbd);
    let mut both = Vec::new();
    for option in [OPT_STARTTLS, OPT_LIST] {
        both.extend_from_slice(&crate::raw::IHAVEOPT.to_be_bytes());
        both.extend_from_slice(&option.to_be_bytes());
        both.extend_from_slice(&0u32.to_be_bytes());
    }
    std::io::Write::write_all(&mut raw.s, &both).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(raw.read_option_reply().kind, REP_ACK);
    assert!(raw.is_closed(), "plaintext behind STARTTLS closes");
}

/// With TLS off, STARTTLS is unsupported (ERR_UNSUP) and everything else works.
#[test]
fn without_tls_starttls_is_unsupported() {
    let node = Node::start();
    node.create("vm", "16M");
    let mut raw = Raw::connect(&node.nbd);
    let replies = raw.option(OPT_STARTTLS, &[]);
    assert_eq!(replies[0].kind, crate::raw::ERR_UNSUP);
    raw.go("vm");
    let _ = Path::new(".");
}
