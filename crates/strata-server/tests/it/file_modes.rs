//! The node's files are private whatever the umask it starts under: after `strata up`
//! under umask 022 (the usual default), a volume written and the API token made, the data
//! directory and every directory in it are 0700 and every file 0600; a data directory an
//! earlier run left readable is tightened at start; a TLS key others can read is warned
//! about (the operator's file: Strata does not change it).

use crate::harness::{make_tls_dir, qemu_io, Node, STRATA};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        out.push((d.display().to_string(), std::fs::metadata(&d).unwrap().permissions().mode()));
        for e in std::fs::read_dir(&d).unwrap().map_while(Result::ok) {
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                todo.push(e.path());
            } else if kind.is_file() {
                let mode = e.metadata().unwrap().permissions().mode();
                out.push((e.path().display().to_string(), mode));
            }
        }
    }
    out
}

/// `strata up ARGS` under umask 022, through a shell (the umask is the shell's to set).
fn up_under_umask_022(dir: &Path, extra: &[&str]) -> Node {
    let mut command = Command::new("sh");
    command
        .args(["-c", "umask 022; exec \"$0\" \"$@\"", STRATA, "up"])
        .args(["--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args(extra);
    Node::launch_command(command, dir)
}

#[test]
fn under_umask_022_the_data_directory_is_0700_and_every_file_in_it_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // An earlier run (or a `cp -r`) left it readable by everyone.
    std::fs::create_dir_all(dir.join("old")).unwrap();
    std::fs::write(dir.join("old/notes"), "x").unwrap();
    for (p, m) in [(dir.clone(), 0o755), (dir.join("old"), 0o755), (dir.join("old/notes"), 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let node = up_under_umask_022(&dir, &[]);
    node.create("vm1", "16M");
    qemu_io(&node.uri("vm1"), &["write -P 0xab 0 1M", "flush"]);
    let (status, stderr) = node.stop();
    assert!(status.success(), "{stderr}");
    let all = modes(&dir);
    assert!(all.len() > 5, "the node made its files: {all:?}");
    for (path, mode) in all {
        let is_dir = std::fs::metadata(&path).unwrap().is_dir();
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode & 0o777 & !want, 0, "{path} is {:04o}", mode & 0o777);
    }
}

#[test]
fn a_tls_key_others_can_read_is_warned_about_and_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &[]);
    let key = tls.join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tmp.path().join("data");
    let tls_arg = tls.display().to_string();
    let node = up_under_umask_022(&dir, &["--tls-dir", &tls_arg]);
    let (status, stderr) = node.stop();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("the TLS private key") && stderr.contains("chmod 600"), "{stderr}");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o644);
}
