//! The CLI and the HTTP API: bad names, sizes and duplicates are refused with a clear
//! error and change nothing; resize and delete behave as documented.

use crate::harness::{qemu_io, Node};
use crate::raw::Raw;
use std::io::{Read, Write};

fn listing(node: &Node) -> String {
    let out = node.cli(&["volume", "list", "--json"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn fails_with(node: &Node, args: &[&str], needle: &str) {
    let before = listing(node);
    let out = node.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one-line reason: {stderr}");
    assert_eq!(listing(node), before, "{args:?} changed something");
}

#[test]
fn bad_names_sizes_and_duplicates_are_refused() {
    let node = Node::start();
    node.create("good", "1G");
    fails_with(&node, &["volume", "create", "good", "--size", "1G"], "already exists");
    fails_with(&node, &["volume", "create", "a@b", "--size", "1G"], "'@'");
    fails_with(&node, &["volume", "create", ".x", "--size", "1G"], "may not start");
    fails_with(&node, &["volume", "create", "../etc", "--size", "1G"], "has '/'");
    fails_with(&node, &["volume", "create", &"n".repeat(65), "--size", "1G"], "65 characters");
    fails_with(&node, &["volume", "create", "x", "--size", "1000"], "multiple of 4096");
    fails_with(&node, &["volume", "create", "x", "--size", "0"], "greater than zero");
    fails_with(&node, &["volume", "create", "x", "--size", "ten"], "cannot parse size");
    fails_with(&node, &["volume", "create", "x", "--size", "100T"], "maximum volume size");
    fails_with(&node, &["volume", "info", "nope"], "no volume named");
    fails_with(&node, &["volume", "delete", "nope"], "no volume named");
    fails_with(&node, &["volume", "resize", "nope", "--size", "2G"], "no volume named");
    let out = node.cli(&["volume", "info", "good", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size_bytes"], 1u64 << 30);
    assert_eq!(v["allocated_bytes"], 0, "thin");
    let out = node.cli(&["volume", "list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("good") && table.contains("1G"), "{table}");
}

#[test]
fn resize_grows_refuses_shrink_unless_allowed_and_clients_see_it_on_reconnect() {
    let node = Node::start();
    node.create("r", "8M");
    qemu_io(&node.uri("r"), &["write -P 0x61 0 8M"]);
    let out = node.cli(&["volume", "resize", "r", "--size", "16M"]);
    assert!(out.status.success());
    qemu_io(&node.uri("r"), &["read -P 0x61 0 8M", "read -P 0 8M 8M", "write -P 1 15M 1M"]);
    fails_with(&node, &["volume", "resize", "r", "--size", "4M"], "--allow-shrink");
    let out = node.cli(&["volume", "resize", "r", "--size", "4M", "--allow-shrink", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size_bytes"], 4u64 << 20);
    let mut raw = Raw::connect(&node.nbd);
    assert_eq!(raw.go("r").0, 4 << 20);
    qemu_io(&node.uri("r"), &["read -P 0x61 0 4M"]);
}

#[test]
fn delete_refuses_while_attached_and_force_disconnects() {
    let node = Node::start();
    node.create("busy", "4M");
    let mut raw = Raw::connect(&node.nbd);
    raw.go("busy");
    let info = node.cli(&["volume", "info", "busy", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["connections"], 1);
    fails_with(&node, &["volume", "delete", "busy"], "--force");
    assert_eq!(raw.read_ok(1, 0, 512), vec![0u8; 512], "still served");
    let out = node.cli(&["volume", "delete", "busy", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(raw.is_closed(), "forced delete closes the connection");
    assert!(!listing(&node).contains("busy"));
    // The name is free again, and the new volume is empty.
    node.create("busy", "4M");
    qemu_io(&node.uri("busy"), &["read -P 0 0 4M"]);
}

fn http(node: &Node, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(&node.http).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn post(node: &Node, path: &str, body: &str) -> (u16, String) {
    http(
        node,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            node.http,
            body.len()
        ),
    )
}

fn get(node: &Node, path: &str) -> (u16, String) {
    http(node, &format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", node.http))
}

/// `METHOD path` without a body, saying JSON as every request that may change something
/// must.
fn send(node: &Node, method: &str, path: &str) -> (u16, String) {
    http(
        node,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            node.http
        ),
    )
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    v["code"].as_str().unwrap().to_owned()
}

#[test]
fn api_errors_are_json_with_proper_statuses() {
    let node = Node::start();
    let (s, b) = post(&node, "/v1/volumes", r#"{"name":"a","size":4096}"#);
    assert_eq!(s, 201, "{b}");
    let (s, b) = post(&node, "/v1/volumes", r#"{"name":"a","size":"1G"}"#);
    assert_eq!((s, error_code(&b).as_str()), (409, "already_exists"));
    let (s, b) = post(&node, "/v1/volumes", r#"{"name":"b","size":"#);
    assert_eq!((s, error_code(&b).as_str()), (400, "invalid_argument"));
    let (s, b) = post(&node, "/v1/volumes", r#"{"name":"b","size":"1G","color":"red"}"#);
    assert_eq!((s, error_code(&b).as_str()), (400, "invalid_argument"));
    let (s, b) = post(&node, "/v1/volumes", r#"{"name":"b","size":-5}"#);
    assert_eq!((s, error_code(&b).as_str()), (400, "invalid_argument"));
    let (s, b) = get(&node, "/v1/volumes/zzz");
    assert_eq!((s, error_code(&b).as_str()), (404, "not_found"));
    let (s, b) = get(&node, "/v1/nothing");
    assert_eq!((s, error_code(&b).as_str()), (404, "not_found"));
    let (s, b) = send(&node, "PUT", "/v1/volumes");
    assert_eq!((s, error_code(&b).as_str()), (405, "method_not_allowed"));
    let (s, b) = send(&node, "DELETE", "/v1/volumes/a?force=maybe");
    assert_eq!((s, error_code(&b).as_str()), (400, "invalid_argument"));
    let (s, b) = get(&node, "/v1/volumes");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "only the one good create happened");
    let (s, b) = get(&node, "/v1/node");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["volumes"], 1);
    assert_eq!(v["nbd"], node.nbd.as_str());
}

/// Every (path, method) the router in `api.rs` serves, read from its source: a route
/// added there must be added to the document too.
fn routes() -> Vec<(String, String)> {
    let source = include_str!("../../src/api.rs");
    let start = source.find("Router::new()").expect("the router");
    let end = start + source[start..].find(".fallback(").expect("the router's fallback");
    let mut routes = Vec::new();
    for call in source[start..end].split(".route(").skip(1) {
        let path = call.split('"').nth(1).expect("a route's path");
        // Method routers: `get(…)`, `.post(…)`, `axum::routing::delete(…)`, not `widget(…)`.
        let methods: Vec<&str> = ["get", "post", "put", "patch", "delete"]
            .into_iter()
            .filter(|m| {
                call.match_indices(&format!("{m}(")).any(|(at, _)| {
                    !call[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                })
            })
            .collect();
        assert!(!methods.is_empty(), "no method found for {path}: {call}");
        routes.extend(methods.into_iter().map(|m| (path.to_owned(), m.to_owned())));
    }
    routes
}

#[test]
fn openapi_document_describes_every_route() {
    let node = Node::start();
    let (s, b) = get(&node, "/v1/openapi.json");
    assert_eq!(s, 200);
    let doc: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let routes = routes();
    assert!(routes.len() >= 23, "{routes:?}");
    for (path, method) in &routes {
        assert!(paths[path][method].is_object(), "{method} {path} missing from the document");
    }
    let methods = ["get", "post", "put", "patch", "delete"];
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys().filter(|k| methods.contains(&k.as_str())) {
            let served = routes.iter().any(|(p, m)| p == path && m == method);
            assert!(served, "{method} {path} is documented but not served");
            let operation = &item[method];
            assert!(operation["operationId"].is_string(), "{method} {path} has no operationId");
            if let Some(body) = operation.get("requestBody") {
                let media = &body["content"]["application/json"];
                let example = media.get("example").or_else(|| media.get("examples"));
                assert!(example.is_some(), "{method} {path}: its request body has no example");
            }
        }
    }
}

#[test]
fn cli_reports_an_unreachable_api_in_one_line() {
    let out = std::process::Command::new(crate::harness::STRATA)
        .args(["--api", "http://127.0.0.1:9", "volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the Strata API"), "{stderr}");
    let version =
        std::process::Command::new(crate::harness::STRATA).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("strata "));
}

#[test]
fn forced_delete_closes_a_client_that_stopped_reading() {
    let node = Node::start();
    node.create("stuck", "64M");
    let mut raw = Raw::connect(&node.nbd);
    raw.go("stuck");
    raw.flood_unread_reads(64);
    let out = node.cli(&["volume", "delete", "stuck", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Draining what was already sent must end in EOF or a reset, not a read timeout.
    let mut sink = Vec::new();
    match raw.s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "connection still open after a forced delete: {e}"
        ),
    }
    assert!(sink.len() < 64 << 20, "not every reply was sent");
}

#[test]
fn a_one_node_cluster_answers_and_bad_membership_requests_change_nothing() {
    let node = Node::start();
    let (s, b) = get(&node, "/v1/cluster");
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["cluster"]["leader"], 1);
    assert_eq!(v["cluster"]["members"][0]["role"], "voter");
    let (s, b) = post(&node, "/v1/cluster/init", "");
    assert_eq!((s, error_code(&b)), (409, "already_exists".into()), "{b}");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for (body, status) in [
        (r#"{"id": 2, "rpc": "nowhere"}"#.to_owned(), 400),
        (r#"{"id": 2}"#.to_owned(), 400),
        (r#"{"id": 2, "rpc": "127.0.0.1:1", "x": 1}"#.to_owned(), 400),
        (format!(r#"{{"id": 0, "rpc": "{free}"}}"#), 400),
        // The id is a member's, at another address; the address is a member's.
        (r#"{"id": 1, "rpc": "127.0.0.1:1"}"#.to_owned(), 409),
        (format!(r#"{{"id": 2, "rpc": "{}"}}"#, member_rpc(&node)), 409),
        // Nothing listens there: unavailable (retry when it runs), no ghost learner.
        (format!(r#"{{"id": 2, "rpc": "{free}"}}"#), 503),
    ] {
        let (s, b) = post(&node, "/v1/cluster/nodes", &body);
        assert_eq!(s, status, "{body}: {b}");
        error_code(&b);
    }
    // No such member: 404; the last member: 409 conflict; not an id: 400.
    for (path, status, code) in [
        ("/v1/cluster/nodes/7", 404, "not_found"),
        ("/v1/cluster/nodes/1", 409, "conflict"),
        ("/v1/cluster/nodes/x", 400, "invalid_argument"),
    ] {
        let (s, b) = send(&node, "DELETE", path);
        assert_eq!((s, error_code(&b).as_str()), (status, code), "{path}: {b}");
    }
    let out = node.cli(&["node", "list", "--json"]);
    let members: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 1, "{members}");
    let out = node.cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("leader: node 1"), "{text}");
}

/// The RPC address of the node's only member.
fn member_rpc(node: &Node) -> String {
    let (s, b) = get(node, "/v1/cluster/nodes");
    assert_eq!(s, 200, "{b}");
    let members: serde_json::Value = serde_json::from_str(&b).unwrap();
    members[0]["rpc"].as_str().unwrap().to_owned()
}

/// `POST path body` is refused with `status` and `code`, and the volumes are as before.
fn refused(node: &Node, path: &str, body: &str, status: u16, code: &str) -> String {
    let before = get(node, "/v1/volumes");
    let (s, b) = post(node, path, body);
    assert_eq!((s, error_code(&b).as_str()), (status, code), "{path} {body}: {b}");
    assert_eq!(get(node, "/v1/volumes"), before, "{path} {body} changed something");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    v["message"].as_str().unwrap().to_owned()
}

#[test]
fn api_sizes_are_bytes_or_m_g_t_text_and_others_are_refused_clearly() {
    let node = Node::start();
    // A number is bytes: a non-zero multiple of 4096, at most 64 TiB.
    for (size, needle) in [
        ("0", "greater than zero"),
        ("4097", "multiple of 4096"),
        ("70368744181760", "maximum volume size"),
        ("-4096", "not a whole number of bytes"),
        ("4096.5", "not a whole number of bytes"),
        ("true", "neither a number of bytes nor text"),
        ("null", "neither a number of bytes nor text"),
        // Text is digits and M, G or T: which other texts are multiples of 4096 no
        // pattern of the OpenAPI document can say.
        (r#""4K""#, "digits and M, G or T"),
        (r#""8192""#, "digits and M, G or T"),
        (r#"" 1G""#, "digits and M, G or T"),
        (r#""1P""#, "digits and M, G or T"),
        (r#""0G""#, "greater than zero"),
        (r#""65T""#, "maximum volume size"),
    ] {
        let body = format!(r#"{{"name": "v", "size": {size}}}"#);
        let message = refused(&node, "/v1/volumes", &body, 400, "invalid_argument");
        assert!(message.contains(needle), "{body}: {message}");
    }
    for (name, size, bytes) in
        [("a", "8192", 8192u64), ("b", r#""1g""#, 1 << 30), ("c", r#""2MiB""#, 2 << 20)]
    {
        let (s, b) =
            post(&node, "/v1/volumes", &format!(r#"{{"name": "{name}", "size": {size}}}"#));
        assert_eq!(s, 201, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["size_bytes"], bytes, "{b}");
    }
    // null replicas and min_replicas are their defaults.
    let body = r#"{"name": "d", "size": "1G", "replicas": null, "min_replicas": null}"#;
    let (s, b) = post(&node, "/v1/volumes", body);
    assert_eq!(
        (s, serde_json::from_str::<serde_json::Value>(&b).unwrap()["replicas"].clone()),
        (201, 1.into())
    );
    // The CLI takes K and plain bytes too: it sends bytes.
    node.create("e", "8K");
    node.create("f", "12288");
}

#[test]
fn requests_the_state_refuses_are_conflicts_and_change_nothing() {
    let node = Node::start();
    node.create("v", "16M");
    let message = refused(&node, "/v1/volumes/v/resize", r#"{"size": "8M"}"#, 409, "conflict");
    assert!(message.contains("allow_shrink"), "{message}");
    let message = refused(&node, "/v1/volumes/v/attach", r#"{"node": 1}"#, 409, "conflict");
    assert!(message.contains("one copy"), "{message}");
    // A cluster of one node has too few for two copies; the name stays free.
    let body = r#"{"name": "r", "size": "16M", "replicas": 2}"#;
    let message = refused(&node, "/v1/volumes", body, 409, "conflict");
    assert!(message.contains("nodes up"), "{message}");
    let (s, b) = post(&node, "/v1/volumes", r#"{"name": "r", "size": "16M"}"#);
    assert_eq!(s, 201, "{b}");
    // Still a bad request: min_replicas above replicas.
    let body = r#"{"name": "m", "size": "16M", "replicas": 1, "min_replicas": 2}"#;
    refused(&node, "/v1/volumes", body, 400, "invalid_argument");
}

#[test]
fn an_api_beyond_loopback_needs_the_bearer_token() {
    let tmp = tempfile::tempdir().unwrap();
    // Listens on every address; the test talks to it over loopback only.
    let node = Node::try_start_with(tmp.path(), "0.0.0.0:0").unwrap();
    let token = std::fs::read_to_string(tmp.path().join("api-token")).unwrap();
    let (s, b) = get(&node, "/v1/volumes");
    assert_eq!((s, error_code(&b)), (401, "unauthorized".into()), "{b}");
    for path in ["/metrics", "/v1/stats"] {
        assert_eq!(get(&node, path).0, 401, "{path} needs the token");
    }
    // The dashboard's files hold no data: a browser loads them, then the page asks for
    // the token.
    for path in ["/", "/ui/dashboard.js", "/ui/dashboard.css"] {
        assert_eq!(get(&node, path).0, 200, "{path}");
    }
    let wrong = format!(
        "GET /v1/volumes HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer nope\r\n\
         Connection: close\r\n\r\n",
        node.http
    );
    assert_eq!(http(&node, &wrong).0, 401);
    let out = node.cli(&["volume", "create", "v", "--size", "1M"]);
    assert!(!out.status.success(), "no token, no volume");
    let right = format!(
        "GET /v1/volumes HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Connection: close\r\n\r\n",
        node.http,
        token.trim()
    );
    assert_eq!(http(&node, &right), (200, "[]".into()));
    let out = std::process::Command::new(crate::harness::STRATA)
        .args(["--api", &node.api(), "volume", "create", "v", "--size", "1M"])
        .env("STRATA_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Or from the token's file, as the node keeps it.
    let file = tmp.path().join("api-token");
    let out = node.cli(&["--token-file", file.to_str().unwrap(), "volume", "delete", "v"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `strata --api … ARGS` with a stdout whose reader is already gone (as after
/// `| head -1` has read its line); returns the exit status and stderr.
fn cli_into_closed_pipe(node: &Node, args: &[&str]) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(crate::harness::STRATA)
        .arg("--api")
        .arg(node.api())
        .args(args)
        .stdout(writer)
        .output()
        .expect("run strata");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let node = Node::start();
    node.create("piped", "4M");
    for args in [
        &["cluster", "status"][..],
        &["volume", "list"],
        &["volume", "list", "--json"],
        &["volume", "info", "piped"],
        &["node", "list"],
    ] {
        let (status, stderr) = cli_into_closed_pipe(&node, args);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.is_empty(), "{args:?} said something: {stderr}");
        assert!(status.success(), "{args:?}: {status:?} {stderr}");
    }
}
