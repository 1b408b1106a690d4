//! Issue 15, item 1: the loopback HTTP API could be driven by any web page its operator
//! visited. A cross-site `text/plain` POST was parsed as JSON: a page on
//! `http://evil.example` created a volume, and a second POST shrank an attached 10G
//! volume to 4K under its client; and any `Host` was served, so a DNS-rebinding page could
//! read the API too. Now what a web page could send is refused (real curl, with the
//! headers a browser would send), shrinking or rolling back a volume under its clients
//! needs force, and with `--tls-dir` the API is HTTPS, which the CLI verifies with
//! `--cacert`.

use crate::harness::{make_tls_dir, Node, STRATA};
use crate::raw::Raw;
use std::process::Command;

/// `curl -s ARGS URL`: the status and the body.
fn curl(args: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl is required by this test (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.parse().unwrap_or(0), body.to_owned())
}

fn code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    v["code"].as_str().unwrap_or_default().to_owned()
}

fn size_of(node: &Node, volume: &str) -> u64 {
    let (s, b) = curl(&[], &format!("{}/v1/volumes/{volume}", node.api()));
    assert_eq!(s, 200, "{b}");
    serde_json::from_str::<serde_json::Value>(&b).unwrap()["size_bytes"].as_u64().unwrap()
}

fn cli_fails(node: &Node, args: &[&str], needle: &str) {
    let out = node.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn issue_15_what_a_web_page_could_send_is_refused_and_changes_nothing() {
    let node = Node::start();
    node.create("vm", "10G");
    // A client has it open, as in the report.
    let mut client = Raw::connect(&node.nbd);
    client.go("vm");
    let api = node.api();
    let list = || curl(&[], &format!("{api}/v1/volumes"));
    let before = list();
    assert_eq!(before.0, 200);
    let json = ["-H", "Content-Type: application/json"];
    let evil = ["-H", "Origin: http://evil.example", json[0], json[1]];
    let plain = ["-H", "Content-Type: text/plain"];
    let cross = ["-H", "Sec-Fetch-Site: cross-site", json[0], json[1]];
    // curl's -d would say a form; a bare `Content-Type:` sends none.
    let none = ["-H", "Content-Type:"];
    let create = r#"{"name": "evil", "size": "16M"}"#;
    let shrink = r#"{"size": 4096, "allow_shrink": true, "force": true}"#;
    for (what, headers, status, expected) in [
        ("a cross-origin POST", &evil[..], 403, "forbidden"),
        ("a text/plain POST", &plain[..], 415, "unsupported_media_type"),
        ("a cross-site POST", &cross[..], 403, "forbidden"),
        ("a POST without a content type", &none[..], 415, "unsupported_media_type"),
    ] {
        for (path, body) in [("/v1/volumes", create), ("/v1/volumes/vm/resize", shrink)] {
            let mut args = headers.to_vec();
            args.extend(["-X", "POST", "--data-binary", body]);
            let (s, b) = curl(&args, &format!("{api}{path}"));
            assert_eq!((s, code(&b).as_str()), (status, expected), "{what} to {path}: {b}");
        }
        let mut args = headers.to_vec();
        args.extend(["-X", "DELETE"]);
        let (s, b) = curl(&args, &format!("{api}/v1/volumes/vm?force=true"));
        assert_eq!(s, status, "{what} DELETE: {b}");
        assert_eq!(list(), before, "{what} changed something");
        assert_eq!(size_of(&node, "vm"), 10 << 30, "{what} resized the attached volume");
    }
    // A page on a name rebound to 127.0.0.1 reads nothing, not even the dashboard.
    for path in ["/v1/volumes", "/metrics", "/", "/ui/dashboard.js", "/v1/nothing"] {
        let (s, b) = curl(&["-H", "Host: evil.example"], &format!("{api}{path}"));
        assert_eq!((s, code(&b).as_str()), (421, "misdirected_request"), "{path}: {b}");
        assert!(!b.contains("\"vm\""), "{b}");
    }
    assert_eq!(client.read_ok(1, 0, 512), vec![0u8; 512], "the client is still served");

    // The same requests as the node's own page or the CLI send them succeed.
    let port = node.http.rsplit_once(':').unwrap().1;
    let own = format!("Origin: http://{}", node.http);
    let (s, b) = curl(
        &["-H", &own, json[0], json[1], "-H", "Sec-Fetch-Site: same-origin", "-d", create],
        &format!("{api}/v1/volumes"),
    );
    assert_eq!(s, 201, "{b}");
    let localhost = format!("Host: localhost:{port}");
    let (s, b) = curl(&["-H", &localhost], &format!("{api}/v1/volumes/evil"));
    assert_eq!(s, 200, "{b}");
    // The CLI says JSON on a DELETE, which has no body.
    cli_ok(&node, &["volume", "delete", "evil"]);
    let (s, b) = curl(&[json[0], json[1], "-X", "DELETE"], &format!("{api}/v1/volumes/nope"));
    assert_eq!((s, code(&b).as_str()), (404, "not_found"), "{b}");
    assert_eq!(list(), before);
}

#[test]
fn issue_15_an_allowed_host_name_is_served_and_others_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = Command::new(STRATA);
    command
        .args(["up", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
        .args(["--http-allowed-host", "strata.example"])
        .arg("--data-dir")
        .arg(tmp.path());
    let node = Node::launch_command(command, tmp.path());
    let url = format!("{}/v1/volumes", node.api());
    assert_eq!(curl(&["-H", "Host: Strata.Example:8080"], &url).0, 200);
    assert_eq!(curl(&["-H", "Host: other.example"], &url).0, 421);
}

#[test]
fn issue_15_shrink_and_rollback_of_an_attached_volume_need_force() {
    let node = Node::start();
    node.create("held", "16M");
    cli_ok(&node, &["snapshot", "create", "held@before"]);
    let mut client = Raw::connect(&node.nbd);
    client.go("held");

    // Growing is harmless: the client sees it when it reconnects.
    cli_ok(&node, &["volume", "resize", "held", "--size", "32M"]);
    let shrink = ["volume", "resize", "held", "--size", "8M", "--allow-shrink"];
    cli_fails(&node, &shrink, "1 NBD client connection(s) attached");
    cli_fails(&node, &["volume", "rollback", "held@before"], "--force");
    // The API says the same, with `force` in the body it takes.
    let (s, b) = curl(
        &["-H", "Content-Type: application/json", "-d", r#"{"size": "8M", "allow_shrink": true}"#],
        &format!("{}/v1/volumes/held/resize", node.api()),
    );
    assert_eq!((s, code(&b).as_str()), (409, "busy"), "{b}");
    assert!(b.contains("force"), "{b}");
    assert_eq!(size_of(&node, "held"), 32 << 20, "nothing changed");
    assert_eq!(client.read_ok(1, 0, 512), vec![0u8; 512], "the client is still served");

    let mut forced = shrink.to_vec();
    forced.push("--force");
    cli_ok(&node, &forced);
    assert_eq!(size_of(&node, "held"), 8 << 20);
    assert!(client.is_closed(), "a forced shrink disconnects the client first");

    let mut client = Raw::connect(&node.nbd);
    assert_eq!(client.go("held").0, 8 << 20, "it reconnects to the new size");
    cli_ok(&node, &["volume", "rollback", "held@before", "--force"]);
    assert!(client.is_closed(), "a forced rollback disconnects the client first");
    assert_eq!(size_of(&node, "held"), 16 << 20, "the snapshot's size");

    // An exported snapshot is deleted only with force, too.
    let mut reader = Raw::connect(&node.nbd);
    reader.go("held@before");
    cli_fails(&node, &["snapshot", "delete", "held@before"], "1 NBD client connection(s)");
    cli_ok(&node, &["snapshot", "delete", "held@before", "--force"]);
    assert!(reader.is_closed());
}

#[test]
fn issue_15_with_tls_dir_the_api_is_https_which_the_cli_verifies_with_cacert() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &[]);
    let data = tmp.path().join("data");
    let mut command = Command::new(STRATA);
    command
        .args(["up", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
        .arg("--tls-dir")
        .arg(&tls)
        .arg("--data-dir")
        .arg(&data);
    let node = Node::launch_command(command, &data);
    let https = format!("https://{}", node.http);
    let ca = tls.join("ca-cert.pem").display().to_string();
    let strata = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(STRATA)
            .args(["--api", &https])
            .args(args)
            .env_remove("STRATA_CACERT")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = strata(&["--cacert", &ca, "volume", "create", "v1", "--size", "1G"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The credential directory names its CA too, and so does STRATA_CACERT.
    let dir = tls.display().to_string();
    let out = strata(&["--cacert", &dir, "volume", "create", "v2", "--size", "1G"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = strata(&["volume", "list"], &[("STRATA_CACERT", &ca)]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("v1") && table.contains("v2"), "{table}");

    // Unverified, the CLI and curl refuse the node's certificate.
    let out = strata(&["volume", "list"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--cacert"), "{stderr}");
    let status = Command::new("curl").args(["-s", &format!("{https}/v1/volumes")]).status();
    assert_eq!(status.unwrap().code(), Some(60), "curl: the certificate is not verified");
    let (s, b) = curl(&["--cacert", &ca], &format!("{https}/v1/volumes"));
    assert!(s == 200 && b.contains("v2"), "{s} {b}");

    // Plain HTTP to it is told to use HTTPS.
    let plain = format!("http://{}", node.http);
    let out = Command::new(STRATA).args(["--api", &plain, "volume", "list"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the node serves HTTPS: use --api https://"), "{stderr}");

    // The guard knows its scheme: the page at https:// is its own, http:// is not.
    let body = r#"{"name": "v3", "size": "1G"}"#;
    let json = "Content-Type: application/json";
    let foreign = format!("Origin: http://{}", node.http);
    let url = format!("{https}/v1/volumes");
    let (s, b) = curl(&["--cacert", &ca, "-H", json, "-H", &foreign, "-d", body], &url);
    assert_eq!((s, code(&b).as_str()), (403, "forbidden"), "{b}");
    let own = format!("Origin: {https}");
    let (s, b) = curl(&["--cacert", &ca, "-H", json, "-H", &own, "-d", body], &url);
    assert_eq!(s, 201, "{b}");
}
