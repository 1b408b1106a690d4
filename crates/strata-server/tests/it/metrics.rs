//! `GET /metrics`: the output is the Prometheus text format (0.0.4), checked line by line
//! by a small parser here, and a volume's counters move with real NBD I/O (qemu-io).

use crate::harness::{qemu_io, Node};
use std::collections::BTreeMap;

/// `(content type, body)` of `GET path`.
pub fn fetch(node: &Node, path: &str, accept: Option<&str>) -> (String, String) {
    let mut request = ureq::get(format!("{}{path}", node.api()));
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let mut response = request.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, response.body_mut().read_to_string().unwrap())
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// Parses `{k="v",…}` at the start of `s`; returns the labels and the rest.
fn labels(s: &str) -> Result<(Labels, &str), String> {
    let mut out = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("no '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = &rest[..eq];
        if !is_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// Checks `text` against the text format 0.0.4 and returns every sample as
/// `name{k="v",…}` (labels in order) → value. Panics with the offending line.
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_samples: std::collections::HashSet<String> = Default::default();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", n + 1) };
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words.as_slice() {
                ["TYPE", name, kind] => {
                    if !is_name(name) {
                        fail("bad metric name");
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                        fail("bad type");
                    }
                    if seen_samples.contains(*name) {
                        fail("TYPE after its samples");
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        fail("a second TYPE line");
                    }
                    if *kind == "counter" && !name.ends_with("_total") {
                        fail("a counter not named *_total");
                    }
                }
                ["HELP", name, ..] if is_name(name) => {}
                ["HELP", ..] | ["TYPE", ..] => fail("malformed HELP/TYPE"),
                _ => {} // another comment
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
        let name = &line[..name_end];
        if !is_name(name) {
            fail("bad metric name");
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            labels(&line[name_end..]).unwrap_or_else(|e| fail(&e))
        } else {
            (Vec::new(), &line[name_end..])
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if !rest.starts_with(' ') || fields.is_empty() || fields.len() > 2 {
            fail("expected ` VALUE [TIMESTAMP]`");
        }
        let v = value(fields[0]).unwrap_or_else(|e| fail(&e));
        if fields.len() == 2 && fields[1].parse::<i64>().is_err() {
            fail("bad timestamp");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            fail("a sample without a TYPE line");
        }
        if name.ends_with("_bucket") && !labels.iter().any(|(k, _)| k == "le") {
            fail("a bucket without `le`");
        }
        seen_samples.insert(family.to_owned());
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let key = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        if samples.insert(key, v).is_some() {
            fail("a duplicate sample");
        }
    }
    // Histograms: buckets never decrease, and +Inf is the count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let prefix = format!("{family}_bucket{{");
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (key, v) in samples.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix))
        {
            let inner = &key[prefix.len()..key.len() - 1];
            let le_at = inner.find("le=\"").expect("le");
            let le_end = inner[le_at + 4..].find('"').unwrap() + le_at + 4;
            let le = value(&inner[le_at + 4..le_end]).unwrap();
            let rest = format!("{}{}", &inner[..le_at], &inner[le_end + 1..]);
            let rest = rest.trim_matches(',').replace(",,", ",");
            series.entry(rest).or_default().push((le, *v));
        }
        assert!(!series.is_empty() || !text.contains(&prefix), "{family}");
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}{{{labels}}}");
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{family}{{{labels}}} has no +Inf bucket");
            let count_key = if labels.is_empty() {
                format!("{family}_count")
            } else {
                format!("{family}_count{{{labels}}}")
            };
            assert_eq!(samples.get(&count_key), Some(&last.1), "{count_key}");
        }
    }
    samples
}

fn at(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

#[test]
fn the_format_check_refuses_what_prometheus_would() {
    parse("# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n");
    for bad in [
        "a_total 1\n",                  // no TYPE
        "# TYPE a counter\na 1\n",      // a counter without _total
        "# TYPE a gauge\na{x=\"1} 2\n", // unterminated label
        "# TYPE a gauge\na{x=1} 2\n",   // unquoted label
        "# TYPE a gauge\na x\n",        // not a number
        "# TYPE a gauge\na 1\na 2\n",   // duplicate
        "# TYPE a gauge\na 1",          // no final newline
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\n",
    ] {
        let caught = std::panic::catch_unwind(|| parse(bad));
        assert!(caught.is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_a_volumes_nbd_io() {
    let node = Node::start();
    node.create("m1", "64M");
    let (content_type, text) = fetch(&node, "/metrics", None);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let before = parse(&text);
    let write_bytes = r#"strata_volume_write_bytes_total{volume="m1"}"#;
    let read_bytes = r#"strata_volume_read_bytes_total{volume="m1"}"#;
    assert_eq!(at(&before, write_bytes), 0.0);
    assert_eq!(at(&before, read_bytes), 0.0);

    qemu_io(&node.uri("m1"), &["write -P 0x5a 0 1M", "flush"]);
    qemu_io(&node.uri("m1"), &["read -P 0x5a 0 1M"]);
    let after = parse(&fetch(&node, "/metrics", None).1);
    assert_eq!(at(&after, write_bytes), (1 << 20) as f64);
    assert_eq!(at(&after, read_bytes), (1 << 20) as f64);
    assert!(at(&after, r#"strata_volume_write_ops_total{volume="m1"}"#) >= 1.0);
    assert!(at(&after, r#"strata_volume_read_ops_total{volume="m1"}"#) >= 1.0);
    assert!(at(&after, r#"strata_volume_flushes_total{volume="m1"}"#) >= 1.0);
    let writes = r#"strata_volume_request_duration_seconds_count{volume="m1",op="write"}"#;
    assert!(at(&after, writes) >= 1.0);
    let flushes = r#"strata_volume_request_duration_seconds_count{volume="m1",op="flush"}"#;
    assert!(at(&after, flushes) >= 1.0, "the flush's device sync is timed");
    assert_eq!(at(&after, r#"strata_volume_errors_total{volume="m1",op="read"}"#), 0.0);
    // The node, its store and the cluster.
    assert!(at(&after, "strata_store_live_bytes") >= (1 << 20) as f64);
    assert!(
        at(&after, "strata_store_journal_syncs_total")
            > at(&before, "strata_store_journal_syncs_total")
    );
    assert!(at(&after, "strata_store_free_bytes") > 0.0);
    assert!(at(&after, "strata_store_segments") >= 1.0);
    assert_eq!(at(&after, "strata_meta_leader"), 1.0);
    assert!(at(&after, "strata_meta_term") >= 1.0);
    assert!(at(&after, "strata_meta_commit_index") >= 1.0);
    assert_eq!(at(&after, r#"strata_meta_state{state="leader"}"#), 1.0);
    assert_eq!(at(&after, r#"strata_nodes{state="up"}"#), 1.0);
    assert_eq!(at(&after, r#"strata_nodes{state="down"}"#), 0.0);
    assert_eq!(at(&after, r#"strata_components{state="active"}"#), 0.0);

    // The same counts in JSON for the dashboard.
    let (_, stats) = fetch(&node, "/v1/stats", None);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let m1 = stats["volumes"].as_array().unwrap().iter().find(|v| v["volume"] == "m1").unwrap();
    assert_eq!(
        (m1["write_bytes"].as_u64(), m1["read_bytes"].as_u64()),
        (Some(1 << 20), Some(1 << 20))
    );
    assert!(stats["store"]["journal_syncs"].as_u64().unwrap() > 0, "{stats}");

    // A deleted volume's series go.
    let out = node.cli(&["volume", "delete", "m1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(5, "m1's series to go", || {
        !scrape(&node).keys().any(|k| k.contains(r#"volume="m1""#))
    });
}

#[test]
fn the_index_is_the_dashboard_for_browsers_and_a_line_of_text_for_others() {
    let node = Node::start();
    let (content_type, body) = fetch(&node, "/", None);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(body.contains("/v1/openapi.json") && body.contains("/metrics"), "{body}");
    let accept = "text/html,application/xhtml+xml,*/*;q=0.8";
    let (content_type, body) = fetch(&node, "/", Some(accept));
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.contains("/ui/dashboard.js") && body.contains("/ui/dashboard.css"));
    for (path, kind) in [("/ui/dashboard.js", "text/javascript"), ("/ui/dashboard.css", "text/css")]
    {
        let (content_type, body) = fetch(&node, path, None);
        assert!(content_type.starts_with(kind) && !body.is_empty(), "{path}: {content_type}");
    }
}

/// Polls `f` every 200 ms for up to `secs`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

/// Three `strata serve` nodes formed into a cluster (each on its own loopback address).
fn three_nodes(root: &std::path::Path) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut first_rpc = String::new();
    for id in 1..=3u64 {
        let ip = format!("127.0.0.{}", 40 + id);
        let port = crate::harness::free_port;
        let (rpc, nbd) = (format!("{ip}:{}", port()), format!("{ip}:{}", port()));
        let dir = root.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let join = if id == 1 { String::new() } else { format!("{first_rpc:?}") };
        let config = root.join(format!("n{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = {id}\ndata_dir = {dir:?}\nrpc = {rpc:?}\nnbd = {nbd:?}\n\
                 http = \"127.0.0.1:0\"\njoin = [{join}]\nsite = \"a\"\nrack = \"r{id}\"\n"
            ),
        )
        .unwrap();
        if id == 1 {
            first_rpc = rpc;
            nodes.push(Node::serve(&config, &dir));
            let out = nodes[0].cli(&["cluster", "init"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        } else {
            std::fs::copy(root.join("n1/secret"), dir.join("secret")).unwrap();
            nodes.push(Node::serve(&config, &dir));
        }
    }
    nodes
}

fn scrape(node: &Node) -> BTreeMap<String, f64> {
    parse(&fetch(node, "/metrics", None).1)
}

#[test]
fn a_clusters_metrics_show_its_nodes_and_a_replicated_volumes_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(tmp.path());
    let up = r#"strata_nodes{state="up"}"#;
    wait_for(30, "three nodes up", || scrape(&nodes[0]).get(up) == Some(&3.0));
    let out = nodes[0].cli(&["volume", "create", "r1", "--size", "16M", "--replicas", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    qemu_io(&nodes[0].uri("r1"), &["write -P 0x6b 1M 64k", "flush"]);
    // Every node reports the cluster as it sees it; the I/O where its client was.
    let active = r#"strata_components{state="active"}"#;
    let r1_active = r#"strata_volume_components{volume="r1",state="active"}"#;
    for node in &nodes {
        wait_for(10, "r1's copies in the node's view", || {
            let m = scrape(node);
            m.get(active) == Some(&3.0) && m.get(r1_active) == Some(&3.0)
        });
    }
    let m = scrape(&nodes[0]);
    assert_eq!(at(&m, r#"strata_volume_write_bytes_total{volume="r1"}"#), 65536.0);
    assert_eq!(at(&m, "strata_meta_leader"), 1.0);
    let elsewhere = scrape(&nodes[1]);
    let r1_writes = elsewhere.get(r#"strata_volume_write_bytes_total{volume="r1"}"#);
    assert_eq!(r1_writes.copied().unwrap_or(0.0), 0.0, "node 2's clients wrote nothing");

    // A copy away: it goes stale, the owner counts what it misses, its node goes down.
    nodes.pop().unwrap().kill9();
    qemu_io(&nodes[0].uri("r1"), &["write -P 0x11 0 4k", "write -P 0x12 3M 8k", "flush"]);
    let left = r#"strata_component_resync_left_bytes{volume="r1",node="3"}"#;
    wait_for(15, "copy 3 stale, 128 KiB to resync", || {
        let m = scrape(&nodes[0]);
        m.get(r#"strata_components{state="stale"}"#) == Some(&1.0)
            && m.get(active) == Some(&2.0)
            && m.get(left) == Some(&(2.0 * 65536.0))
    });
    wait_for(30, "node 3 down", || {
        let m = scrape(&nodes[1]);
        m.get(up) == Some(&2.0) && m.get(r#"strata_nodes{state="down"}"#) == Some(&1.0)
    });
    assert_eq!(at(&scrape(&nodes[1]), r#"strata_node_up{node="3",role="voter"}"#), 0.0);
}
