//! Starting and stopping real `strata up` processes, and running external tools.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// A running node.
pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    pub nbd: String,
    pub http: String,
    /// The CA of the node's TLS credentials when it serves HTTPS (`--tls-dir`): the CLI
    /// and `api()` then speak HTTPS and verify the node with it.
    pub cacert: Option<PathBuf>,
    /// Everything the node printed on stderr so far (drained by a thread, so a chatty
    /// node never blocks on a full pipe).
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts a node in a fresh temporary data directory.
    pub fn start() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut node = Node::start_in(tmp.path());
        node._tmp = Some(tmp);
        node
    }

    /// Starts a node on `dir`, panicking if it does not come up.
    pub fn start_in(dir: &Path) -> Node {
        Node::try_start_in(dir).unwrap_or_else(|e| panic!("strata up failed: {e}"))
    }

    /// Starts a node on `dir`; on failure returns what it printed.
    pub fn try_start_in(dir: &Path) -> Result<Node, String> {
        Node::try_start_with(dir, "127.0.0.1:0")
    }

    /// Starts a node on `dir` with its HTTP API on `http`.
    pub fn try_start_with(dir: &Path, http: &str) -> Result<Node, String> {
        let mut command = Command::new(STRATA);
        command
            .args(["up", "--nbd", "127.0.0.1:0", "--http", http, "--rpc", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir);
        Node::launch(command, dir)
    }

    /// Starts `strata GLOBAL_ARGS up …` on `dir`, its log filtered by `rust_log`.
    pub fn start_args(dir: &Path, global_args: &[&str], rust_log: &str) -> Node {
        let mut command = Command::new(STRATA);
        command
            .args(global_args)
            .args(["up", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", rust_log);
        Node::launch(command, dir).unwrap_or_else(|e| panic!("strata up failed: {e}"))
    }

    /// Starts `strata serve --config CONFIG` (its data directory `dir`).
    pub fn serve(config: &Path, dir: &Path) -> Node {
        Node::serve_with_env(config, dir, &[])
    }

    /// [`Node::serve`] with these environment variables set.
    pub fn serve_with_env(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(STRATA);
        command.arg("serve").arg("--config").arg(config);
        command.envs(env.iter().copied());
        Node::launch(command, dir).unwrap_or_else(|e| panic!("strata serve failed: {e}"))
    }

    /// Runs `command` (a `strata up` or `serve`, perhaps through a shell) as a node,
    /// panicking if it does not come up.
    pub fn launch_command(command: Command, dir: &Path) -> Node {
        Node::launch(command, dir).unwrap_or_else(|e| panic!("the node did not start: {e}"))
    }

    /// Runs a node command until it prints its NBD and HTTP addresses.
    fn launch(mut command: Command, dir: &Path) -> Result<Node, String> {
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "warn,strata::replicated=info,openraft=error");
        }
        let mut child =
            command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn strata");
        let stdout = child.stdout.take().expect("piped");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let stderr_thread = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut nbd, mut http) = (None, None);
        let (mut tls_dir, mut https) = (None::<PathBuf>, false);
        while nbd.is_none() || http.is_none() {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("NBD listening on ") {
                        nbd = rest.split_whitespace().next().map(str::to_owned);
                    }
                    if let Some(rest) = line.trim().strip_prefix("TLS credentials from ") {
                        let dir = rest.rsplit_once(" (").map_or(rest, |(dir, _)| dir);
                        tls_dir = Some(PathBuf::from(dir));
                    }
                    if line.contains("HTTPS: https://") {
                        https = true;
                    }
                    if let Some(rest) = line.trim().strip_prefix("HTTP listening on ") {
                        // A wildcard listener is reached over loopback.
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        http = Some(addr.replace("0.0.0.0:", "127.0.0.1:"));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = stderr_thread.join();
                    return Err(stderr.lock().unwrap().clone());
                }
            }
        }
        Ok(Node {
            child: Some(child),
            dir: dir.to_owned(),
            nbd: nbd.expect("set"),
            http: http.expect("set"),
            cacert: tls_dir.filter(|_| https).map(|d| d.join("ca-cert.pem")),
            stderr,
            stderr_thread: Some(stderr_thread),
            _tmp: None,
        })
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    pub fn api(&self) -> String {
        let scheme = if self.cacert.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http)
    }

    /// Runs `strata --api … ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(STRATA);
        command.arg("--api").arg(self.api());
        if let Some(ca) = &self.cacert {
            command.arg("--cacert").arg(ca);
        }
        command.args(args).output().expect("run strata")
    }

    /// Creates a volume through the CLI.
    pub fn create(&self, name: &str, size: &str) {
        let out = self.cli(&["volume", "create", name, "--size", size]);
        assert!(out.status.success(), "create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The last `lines` lines the node printed on stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.stderr.lock().unwrap().clone();
        let all: Vec<&str> = text.lines().filter(|l| !l.contains(" openraft::")).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill9(mut self) -> PathBuf {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
        self.dir.clone()
    }

    /// SIGTERM and wait; returns the exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        assert!(status.expect("kill").success());
        let status = child.wait().expect("wait");
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        (status, stderr)
    }

    /// Waits for a process that ended by itself; returns its exit status and stderr.
    pub fn stop_exited(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.take().expect("running").wait().expect("wait");
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        (status, stderr)
    }

    /// Keeps the data directory after the node is gone (for restarts).
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a tool, panicking with its output if it is missing or fails.
pub fn run(program: &str, args: &[&str]) -> String {
    run_in(Path::new("."), program, args)
}

/// Like [`run`], in the working directory `cwd`.
pub fn run_in(cwd: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).current_dir(cwd).output().unwrap_or_else(|e| {
        panic!("{program} is required by this test (install it; .ci/run does): {e}")
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io on a raw NBD export with a list of commands; returns stdout, asserting no
/// command reported a failure or a pattern mismatch.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    if uri.contains('@') {
        args.push("-r"); // a snapshot export is read-only; qemu opens it only so
    }
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported an error:\n{out}"
    );
    out
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(seed: u64, length: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..length)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A port to listen on, below Linux's ephemeral range (32768 and up): a port the kernel
/// handed out for a moment could go to a node's outgoing connection before the node
/// listens on it ("Address already in use"). Random (tests run in parallel processes)
/// and checked free on every loopback address the tests' nodes use
/// (127.0.0.1, .10-.19, .40-.49).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos(),
        );
        let port = 20000 + (h.finish() % 12000) as u16;
        let free = (10..=19)
            .chain(40..=49)
            .all(|last| std::net::TcpListener::bind(format!("127.0.0.{last}:{port}")).is_ok())
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and client certificates, made
/// with openssl in qemu's x509 layout: `dir` holds `ca-cert.pem`, `server-cert.pem` and
/// `server-key.pem` (what `strata up --tls-dir` and qemu's server read); each client `CN`
/// gets `dir/clients/CN/{ca-cert,client-cert,client-key}.pem` (what qemu's
/// `tls-creds-x509,endpoint=client,dir=…` and libnbd's `tls-certificates=…` read).
pub fn make_tls_dir(dir: &Path, clients: &[&str]) {
    std::fs::create_dir_all(dir).expect("mkdir tls");
    let d = |f: &str| dir.join(f).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=strata test CA",
        "-keyout",
        &d("ca-key.pem"),
        "-out",
        &d("ca-cert.pem"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let issue = |key: &str, cert: &str, cn: &str, ext: &str| {
        let csr = format!("{cert}.csr");
        let extfile = format!("{cert}.ext");
        std::fs::write(&extfile, ext).expect("write ext");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &d("ca-cert.pem"),
            "-CAkey",
            &d("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            cert,
            "-extfile",
            &extfile,
        ]);
    };
    issue(
        &d("server-key.pem"),
        &d("server-cert.pem"),
        "strata test server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
    );
    for cn in clients {
        let c = dir.join("clients").join(cn);
        std::fs::create_dir_all(&c).expect("mkdir client");
        std::fs::copy(dir.join("ca-cert.pem"), c.join("ca-cert.pem")).expect("copy ca");
        let f = |n: &str| c.join(n).display().to_string();
        issue(
            &f("client-key.pem"),
            &f("client-cert.pem"),
            cn,
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        );
    }
    // Private keys are the owner's only, as a careful operator keeps them.
    for entry in walk(dir) {
        if entry.to_string_lossy().ends_with("-key.pem") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o600))
                .expect("chmod key");
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").map_while(Result::ok) {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A tmpfs of `size` (`"300m"`) mounted on `dir` (made if missing), unmounted on drop: a
/// small disk to fill. Mounting needs root; elsewhere `None`, saying the test is skipped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mkdir the mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here (not root?): skipped");
            return None;
        }
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
