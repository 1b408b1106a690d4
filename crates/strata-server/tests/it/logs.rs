//! The node's log: human lines by default, one JSON object a line with `--log-format json`,
//! a clear refusal of any other format, and a volume's I/O error logged once, with the
//! volume, offset and length, where the NBD server answers it.

use crate::harness::{qemu_io, Node, STRATA};
use crate::raw::{Raw, CMD_READ, EINVAL};
use crate::snapshots::find_in_log;
use serde_json::Value;
use std::process::Command;

/// Every line of `stderr` as a JSON object with the fields of a tracing event.
fn json_lines(stderr: &str) -> Vec<Value> {
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for v in &lines {
        assert!(v["timestamp"].is_string() && v["target"].is_string(), "{v}");
        let level = v["level"].as_str().unwrap_or_default();
        assert!(["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level), "{v}");
        assert!(v["fields"]["message"].is_string(), "{v}");
    }
    lines
}

#[test]
fn logs_are_human_by_default_json_on_request_and_an_io_error_is_logged_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Human by default: readable lines, not JSON.
    let node = Node::start_args(dir, &[], "info,openraft=error");
    node.create("f", "8M");
    qemu_io(&node.uri("f"), &["write -P 0x77 1M 4k", "write -P 0x5a 0 4k"]);
    let (status, stderr) = node.stop();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("INFO") && stderr.contains("stopped cleanly"), "{stderr}");
    assert!(stderr.lines().all(|l| !l.trim_start().starts_with('{')), "{stderr}");

    // A block that fails its checksum: reading it is an I/O error of volume f.
    let at = find_in_log(dir, &[0x77; 4096]);
    let mut log = std::fs::read(dir.join("store/log")).unwrap();
    log[at as usize + 100] ^= 0x01;
    std::fs::write(dir.join("store/log"), &log).unwrap();

    // JSON, the flag after the subcommand (it is global).
    let node = Node::start_args(dir, &["--log-format", "json"], "info,openraft=error");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x77 1M 4k", &node.uri("f")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    // A client's mistake (a read past the end) is answered, not logged; the block next
    // to the damaged one still reads.
    let mut raw = Raw::connect(&node.nbd);
    raw.go("f");
    raw.request(0, CMD_READ, 1, (8 << 20) - 4096, 8192);
    assert_eq!(raw.reply(0).error, EINVAL, "read past the end");
    assert_eq!(raw.read_ok(2, 0, 4096), vec![0x5a; 4096]);
    let (status, stderr) = node.stop();
    assert!(status.success(), "{stderr}");
    let lines = json_lines(&stderr);
    assert!(
        lines.iter().any(|v| v["fields"]["message"] == "stopped cleanly; all data synced"),
        "{stderr}"
    );
    let io_errors: Vec<&Value> =
        lines.iter().filter(|v| v["fields"]["message"] == "I/O failed").collect();
    assert_eq!(io_errors.len(), 1, "one failed read, one line: {stderr}");
    let e = &io_errors[0];
    assert_eq!(e["level"], "ERROR", "{e}");
    let fields = &e["fields"];
    assert_eq!(fields["volume"], "f", "{e}");
    assert_eq!(fields["offset"], 1 << 20, "{e}");
    assert_eq!(fields["length"], 4096, "{e}");
    assert_eq!(fields["command"], "read", "{e}");
    assert!(fields["error"].as_str().unwrap().contains("checksum"), "{e}");
}

#[test]
fn a_bad_log_format_is_refused_clearly() {
    for args in [&["--log-format", "xml", "up"][..], &["up", "--log-format", "JSONL"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new(STRATA)
            .args(args)
            .args(["--data-dir", tmp.path().to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail: {err}");
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("invalid value") && err.contains("--log-format"), "{err}");
        assert!(err.contains("human") && err.contains("json"), "{err}");
        // Nothing was started: the data directory stays empty.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "{args:?}");
    }
}
