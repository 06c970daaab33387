//! The operations files in deploy/ checked with the real tools: promtool and a real
//! Prometheus scraping enrolld, `systemd-analyze` on the unit, nginx terminating TLS in
//! front of enrolld (and answering 503 only when no node was sent the request, 502/504
//! `outcome_unknown` once one was; the cluster front is checked to be the same but for its
//! upstream's servers), and the Grafana dashboard's JSON and queries. The tools come from
//! `scripts/ops-tools.sh`; a missing one fails its test with a message naming it. Running
//! them, and the nginx fronts rendered from deploy/nginx/, live in tests/ops/ (shared with
//! tests/cluster_nginx.rs).

mod common;
mod ops;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admin_token, free_port, put_course, token, Conn, Server, TempDir};
use ops::{check, read, replace, repo, tool, wait_listening, NginxSetup, Proc, CLUSTER, SINGLE};

// ---------------------------------------------------------------------------------------
// Helpers

/// A plain HTTP/1.0 GET (no chunking, the server closes): (status, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A Prometheus query through the HTTP API: the `data.result` array (fails on an error,
/// naming `what` the query is for).
fn prom_query(addr: SocketAddr, what: &str, query: &str) -> Vec<serde_json::Value> {
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={}", urlencode(query)))
        .unwrap_or_else(|e| panic!("{what}: query {query}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: query {query}: {status} not JSON ({e}): {body}"));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("success")),
        "{what}: query {query} was refused: {body}"
    );
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The shipped prometheus.yml, runnable from `dir`: rules by absolute path, and (when
/// given) scraping `target` every second.
fn prometheus_config(target: Option<SocketAddr>) -> String {
    let rules = repo("deploy/prometheus/rules.yml");
    let mut yml = replace(
        &read("deploy/prometheus/prometheus.yml"),
        "/etc/prometheus/enrolld-rules.yml",
        &rules.to_string_lossy(),
    );
    if let Some(target) = target {
        yml = replace(&yml, "127.0.0.1:8080", &target.to_string());
        yml = replace(&yml, "scrape_interval: 5s", "scrape_interval: 1s");
        yml = replace(&yml, "evaluation_interval: 5s", "evaluation_interval: 1s");
    }
    yml
}

/// A real Prometheus server on a free loopback port, with `config`.
fn start_prometheus(dir: &TempDir, config: &str) -> (Proc, SocketAddr) {
    let conf = dir.path("prometheus.yml");
    std::fs::write(&conf, config).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path("prometheus.log");
    let mut p = Proc::spawn(
        "prometheus",
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={conf}"))
            .arg(format!("--storage.tsdb.path={}", dir.path("tsdb")))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(&dir.0),
        &log,
    );
    wait_listening(addr, &mut p, &log);
    // Listening comes a moment before the API answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
        p.assert_running(&log);
        assert!(Instant::now() < deadline, "prometheus never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, addr)
}

/// Starts enrolld on a SQLite file in `dir`, with `extra` flags.
fn start_enrolld(dir: &TempDir, extra: &[&str]) -> Server {
    let store = format!("sqlite://{}", dir.path("enrolld.db"));
    let mut args = vec!["--store", store.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A course of capacity 2 and three students enrolling: two 201s, one 409. Returns the
/// body of `/metrics` scraped afterwards.
async fn scrape_after_enrollments(server: &Server) -> String {
    let mut conn = server.conn().await;
    put_course(&mut conn, "OPS101-01", 2).await;
    let mut statuses = Vec::new();
    for s in ["ops-s1", "ops-s2", "ops-s3"] {
        let tok = token(s);
        let r = conn
            .request("POST", "/v1/courses/OPS101-01/enrollment", Some(&tok), None)
            .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [201, 201, 409]);
    let r = conn.request("GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "metrics content type {ct:?}");
    String::from_utf8(r.body).expect("UTF-8 exposition")
}

/// Sum of the samples of `name` whose labels include every `labels` pair; None when no
/// sample matches.
fn sample_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.chars().next() {
            Some('{') => {
                let Some(end) = rest.find('}') else { continue };
                (&rest[1..end], rest[end + 1..].trim())
            }
            Some(' ') => ("", rest.trim()),
            _ => continue,
        };
        if labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\""))) {
            let v: f64 = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Every metric name (`enrolld_*`, `process_*`) a text mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["enrolld_", "process_"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            let mut end = start + prefix.len();
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            let before = start.checked_sub(1).map(|j| bytes[j]);
            if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                names.insert(text[start..end].to_owned());
            }
            from = end;
        }
    }
    names
}

/// The metric families the server exposes (API of the observability issue), histograms by
/// their base name.
const EXPOSED: &[&str] = &[
    "enrolld_up",
    "enrolld_enroll_attempts_total",
    "enrolld_enroll_rejected_total",
    "enrolld_course_requests_total",
    "enrolld_rate_limit_tokens",
    "enrolld_http_request_duration_seconds",
    "enrolld_http_requests_total",
    "enrolld_persist_batch_rows",
    "enrolld_persist_commit_seconds",
    "enrolld_persist_queue_depth",
    "enrolld_course_seats_left",
    "enrolld_course_hot",
    "enrolld_shard_requests_total",
    "enrolld_shard_hops_total",
    "enrolld_breaker_state",
    "enrolld_store_up",
    "process_resident_memory_bytes",
    "process_open_fds",
    "enrolld_cluster_nodes_alive",
    "enrolld_cluster_partitions_unowned",
    "enrolld_cluster_leases_held",
    "enrolld_cluster_hops_total",
    "enrolld_cluster_hops_failed_total",
    "enrolld_cluster_fenced_batches_total",
    "enrolld_cluster_catalog_age_seconds",
    "enrolld_rounds_entries_total",
    "enrolld_rounds_draws_total",
    "enrolld_rounds_draw_entries",
    "enrolld_rounds_draw_seconds",
    "enrolld_rounds_waitlisted",
    "enrolld_rounds_promotions_total",
];
const HISTOGRAMS: &[&str] = &[
    "enrolld_http_request_duration_seconds",
    "enrolld_persist_batch_rows",
    "enrolld_persist_commit_seconds",
    "enrolld_rounds_draw_entries",
    "enrolld_rounds_draw_seconds",
];

/// The family a sample name belongs to (`x_bucket` of histogram `x` is `x`).
fn family(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return base;
            }
        }
    }
    name
}

/// The dashboard's panel queries with its variables filled in for a plain query.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/enrolld.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$job", "enrolld");
            assert!(!q.contains('$'), "unfilled variable in {expr}");
            out.push((p["title"].as_str().unwrap().to_owned(), q));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Prometheus

#[test]
fn promtool_check_rules() {
    let out = check(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(repo("deploy/prometheus/rules.yml")),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn promtool_rule_unit_tests() {
    // Synthetic series: the ratios, the top 3, and each alert firing (and not) on time.
    check(
        Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(repo("deploy/prometheus/rules_test.yml")),
    );
}

#[test]
fn promtool_check_config() {
    let dir = TempDir::new("deploy_promcfg");
    let conf = dir.path("prometheus.yml");
    std::fs::write(&conf, prometheus_config(None)).unwrap();
    let out = check(Command::new(tool("promtool")).args(["check", "config", &conf]));
    let said = String::from_utf8_lossy(&out.stdout);
    // It checked the rule file too, by the rewritten path.
    assert!(said.contains("rules.yml") && said.contains("SUCCESS"), "{said}");
}

#[tokio::test]
async fn promtool_check_metrics_on_a_live_scrape() {
    let dir = TempDir::new("deploy_metrics");
    let server = start_enrolld(&dir, &[]);
    let body = scrape_after_enrollments(&server).await;
    assert_eq!(sample_sum(&body, "enrolld_up", &[]), Some(1.0), "{body}");
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics found problems ({}):\n{}{}\nin:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the rules and the dashboard need from the server's exposition, after two
/// enrollments and one 409 on a fresh server.
#[tokio::test]
async fn live_metrics_carry_what_the_rules_and_dashboard_use() {
    let dir = TempDir::new("deploy_families");
    let server = start_enrolld(&dir, &[]);
    let body = scrape_after_enrollments(&server).await;
    let has = |name: &str, labels: &[(&str, &str)]| sample_sum(&body, name, labels);
    let mut missing = Vec::new();
    for (name, labels) in [
        ("enrolld_up", &[][..]),
        ("enrolld_store_up", &[]),
        ("enrolld_persist_queue_depth", &[]),
        ("enrolld_enroll_attempts_total", &[("outcome", "enrolled")]),
        ("enrolld_enroll_attempts_total", &[("outcome", "full")]),
        ("enrolld_enroll_rejected_total", &[("reason", "full")]),
        (
            "enrolld_http_requests_total",
            &[("route", "enroll"), ("status_class", "2xx")],
        ),
        (
            "enrolld_http_requests_total",
            &[("route", "enroll"), ("status_class", "4xx")],
        ),
        (
            "enrolld_http_request_duration_seconds_bucket",
            &[("route", "enroll"), ("le", "+Inf")],
        ),
        ("enrolld_persist_batch_rows_bucket", &[("le", "+Inf")]),
        ("enrolld_persist_commit_seconds_bucket", &[("le", "+Inf")]),
        ("enrolld_shard_requests_total", &[]),
        ("process_resident_memory_bytes", &[]),
        ("process_open_fds", &[]),
    ] {
        if has(name, labels).is_none() {
            missing.push(format!("{name}{labels:?}"));
        }
    }
    assert!(missing.is_empty(), "no sample for {missing:#?} in /metrics:\n{body}");
    assert_eq!(has("enrolld_store_up", &[]), Some(1.0));
    assert_eq!(
        has("enrolld_enroll_attempts_total", &[("outcome", "enrolled")]),
        Some(2.0)
    );
    assert_eq!(has("enrolld_enroll_attempts_total", &[("outcome", "full")]), Some(1.0));
    assert_eq!(has("enrolld_enroll_rejected_total", &[("reason", "full")]), Some(1.0));
    assert_eq!(
        has(
            "enrolld_http_requests_total",
            &[("route", "enroll"), ("status_class", "2xx")]
        ),
        Some(2.0)
    );
    assert_eq!(
        has("enrolld_http_request_duration_seconds_count", &[("route", "enroll")]),
        Some(3.0)
    );
    // Both seats went through group commit.
    assert!(has("enrolld_persist_batch_rows_sum", &[]).unwrap_or(0.0) >= 2.0);
    assert!(has("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(has("process_open_fds", &[]).unwrap() > 0.0);
}

#[test]
fn rules_and_dashboard_name_only_exposed_metrics_and_chart_them_all() {
    let rules = metric_names(&read("deploy/prometheus/rules.yml"));
    let dash = metric_names(&read("deploy/grafana/enrolld.json"));
    for (file, names) in [("rules.yml", &rules), ("enrolld.json", &dash)] {
        let unknown: Vec<&String> = names.iter().filter(|n| !EXPOSED.contains(&family(n))).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the server does not expose: {unknown:?}"
        );
    }
    let charted: std::collections::BTreeSet<&str> = dash.iter().map(|n| family(n)).collect();
    let uncharted: Vec<&&str> = EXPOSED.iter().filter(|n| !charted.contains(**n)).collect();
    assert!(uncharted.is_empty(), "the dashboard charts no panel for {uncharted:?}");
}

#[test]
fn prometheus_scrapes_enrolld_and_loads_the_rules() {
    let dir = TempDir::new("deploy_prom");
    let server = start_enrolld(&dir, &[]);
    let (mut prom, prom_addr) = start_prometheus(&dir, &prometheus_config(Some(server.addr)));
    let log = dir.path("prometheus.log");

    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        prom.assert_running(&log);
        let result = prom_query(prom_addr, "scrape", "enrolld_up");
        if let Some(s) = result.iter().find(|s| s["value"][1] == "1") {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not get enrolld_up = 1 in 60 s (last answer {result:?});\
             targets: {:?}\nits log:\n{}",
            http_get(prom_addr, "/api/v1/targets").map(|r| r.1),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(series["metric"]["job"], "enrolld");
    assert_eq!(series["metric"]["instance"], server.addr.to_string());

    // The shipped rule_files line (rewritten to this checkout) loaded both groups.
    let (status, body) = http_get(prom_addr, "/api/v1/rules").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut groups: Vec<&str> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    groups.sort();
    assert_eq!(groups, ["enrolld.alerts", "enrolld.recording"], "{body}");
}

// ---------------------------------------------------------------------------------------
// Grafana

#[test]
fn grafana_dashboard_is_importable_json() {
    // Grafana's import checks: valid JSON, the data source input, schema 39, unique panel
    // ids, every query on the input's data source, panels inside the 24-column grid and
    // not overlapping.
    let script = r#"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["schemaVersion"] == 39, d["schemaVersion"]
assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"], d["__inputs"]
assert d["__inputs"][0]["pluginId"] == "prometheus"
assert d["uid"] and d["title"]
ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
cells = {}
for p in d["panels"]:
    g = p["gridPos"]
    assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
    for x in range(g["x"], g["x"] + g["w"]):
        for y in range(g["y"], g["y"] + g["h"]):
            assert (x, y) not in cells, ("overlap", p["title"], cells.get((x, y)))
            cells[(x, y)] = p["title"]
    if p["type"] == "row":
        continue
    assert p["datasource"] == ds, p["title"]
    assert p["targets"], p["title"]
    for t in p["targets"]:
        assert t["datasource"] == ds and t["expr"].strip(), p["title"]
for v in d["templating"]["list"]:
    assert v["datasource"] == ds, v["name"]
print(json.dumps(sorted(p["title"] for p in d["panels"])))
"#;
    let out = check(
        Command::new("python3")
            .args(["-c", script])
            .arg(repo("deploy/grafana/enrolld.json")),
    );
    let titles: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    for want in [
        "Enroll attempts by outcome",
        "Reject ratio",
        "Top-3 rate-limited courses",
        "Rejections by reason",
        "p99 latency by route",
        "Group commit p99",
        "Rows per group commit",
        "Persist queue depth",
        "Seats left of the hottest courses",
        "Hot courses",
        "Requests per shard",
        "Breaker states",
        "Store up",
        "Resident memory",
        "Open file descriptors",
        "Draw entries and placements /s",
        "Students on waitlists",
        "Waitlist promotions /s",
    ] {
        assert!(titles.iter().any(|t| t == want), "no panel {want:?} in {titles:?}");
    }
}

#[test]
fn grafana_dashboard_queries_parse_in_prometheus() {
    let dir = TempDir::new("deploy_dashq");
    let (_prom, prom_addr) = start_prometheus(&dir, "global:\n  scrape_interval: 15s\n");
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, q) in queries {
        // prom_query fails on a parse or evaluation error; with no data, results are empty.
        prom_query(prom_addr, &format!("panel {title:?}"), &q);
    }
}

// ---------------------------------------------------------------------------------------
// systemd

/// The shipped unit in a temp dir, with ExecStart pointing at the built binary.
fn unit_copy(dir: &TempDir) -> String {
    let unit = replace(
        &read("deploy/enrolld.service"),
        "ExecStart=/usr/local/bin/enrolld ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_enrolld")),
    );
    let path = dir.path("enrolld.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn systemd_unit_verifies() {
    let dir = TempDir::new("deploy_unit");
    let unit = unit_copy(&dir);
    let out = check(Command::new(tool("systemd-analyze")).args(["verify", &unit]));
    // verify exits 0 on some warnings; none are expected from this unit.
    let said = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = said.lines().filter(|l| l.contains("enrolld.service")).collect();
    assert!(complaints.is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn systemd_unit_is_sandboxed() {
    let dir = TempDir::new("deploy_unitsec");
    let unit = unit_copy(&dir);
    let out = check(Command::new(tool("systemd-analyze")).args(["security", "--offline=yes", "--no-pager", &unit]));
    let said = String::from_utf8_lossy(&out.stdout);
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for enrolld.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{said}"));
    // 1.1 when written (0 = fully sandboxed, 10 = not at all); deploy/README.md quotes it.
    assert!(score <= 2.0, "exposure {score} (was 1.1):\n{said}");
}

// ---------------------------------------------------------------------------------------
// nginx

#[test]
fn nginx_accepts_the_shipped_configs() {
    let nodes: Vec<SocketAddr> = (1..=3).map(|i| format!("127.0.0.1:808{i}").parse().unwrap()).collect();
    for (include, upstreams) in [(&SINGLE, &nodes[..1]), (&CLUSTER, &nodes[..])] {
        let setup = NginxSetup::new(include, upstreams);
        let out = check(setup.nginx().arg("-t"));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("test is successful"), "{}: {said}", include.file);
    }
}

/// The cluster front is the single one but for its upstream's `server` lines and name: the
/// same maps, headers, timeouts, retries, keep-alive and error answers (so a fix to one
/// that is not made to the other fails here).
#[test]
fn nginx_cluster_config_differs_from_the_single_one_only_in_its_servers() {
    let single = nginx_directives(SINGLE.file, "enrolld");
    let cluster = nginx_directives(CLUSTER.file, "enrolld_nodes");
    let at = single.iter().zip(&cluster).position(|(a, b)| a != b);
    assert!(
        at.is_none() && single.len() == cluster.len(),
        "{} and {} differ outside their upstream's server lines, from directive {}: {:?} / {:?}",
        SINGLE.file,
        CLUSTER.file,
        at.unwrap_or(single.len().min(cluster.len())),
        at.map_or_else(|| single.get(cluster.len()), |i| single.get(i)),
        at.map_or_else(|| cluster.get(single.len()), |i| cluster.get(i)),
    );
}

/// A shipped include's directive lines (no comments or blank lines), without the `server`
/// lines of its upstream and with the upstream's name written `UPSTREAM`.
fn nginx_directives(file: &str, upstream: &str) -> Vec<String> {
    let mut in_upstream = false;
    let mut lines = Vec::new();
    for line in read(file).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == format!("upstream {upstream} {{") {
            in_upstream = true;
        } else if in_upstream && line == "}" {
            in_upstream = false;
        } else if in_upstream && line.starts_with("server ") {
            continue;
        }
        lines.push(
            line.replace(&format!("upstream {upstream} {{"), "upstream UPSTREAM {")
                .replace(&format!("http://{upstream};"), "http://UPSTREAM;"),
        );
    }
    assert!(!in_upstream, "{file}: upstream {upstream} never closes");
    lines
}

/// One curl over TLS through nginx: (status, headers, body).
fn curl_tls(
    setup: &NginxSetup,
    method: &str,
    path: &str,
    headers: &[String],
    body: Option<&str>,
) -> (u16, String, String) {
    let head_file = setup.dir.path("curl.head");
    let body_file = setup.dir.path("curl.body");
    let mut c = Command::new(tool("curl"));
    c.args(["-sS", "-k", "--max-time", "20", "-X", method]).args([
        "-D",
        &head_file,
        "-o",
        &body_file,
        "-w",
        "%{http_code}",
    ]);
    for h in headers {
        c.args(["-H", h]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    c.arg(format!("https://{}{path}", setup.addr));
    let out = check(&mut c);
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (
        status,
        std::fs::read_to_string(&head_file).unwrap(),
        std::fs::read_to_string(&body_file).unwrap(),
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Waits until `pred` holds for nginx's access log (it is written in 64k buffers flushed
/// every second).
fn wait_access_log(setup: &NginxSetup, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&setup.access_log).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} not in nginx's access log:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a log line of enrolld contains `needle`.
fn wait_enrolld_log(server: &Server, seen: &mut Vec<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|l| l.contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{needle} not in enrolld's log:\n{}", seen.join("\n"));
        if let Ok(line) = server.log.recv_timeout(left.min(Duration::from_millis(200))) {
            seen.push(line);
        }
    }
}

/// The shipped config's one-node variant: plain `hash $course_key` over the shard ports in
/// shard order. nginx must pick each course's owner shard, so no request crosses shards;
/// the same requests sent to the shared port do cross (the counter can move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_hash_over_the_shard_ports_reaches_each_course_owner() {
    let edir = TempDir::new("deploy_shards");
    let server = start_enrolld(&edir, &["--shards", "3", "--shard-listen", "127.0.0.1:0"]);
    assert_eq!(
        server.shard_addrs.len(),
        3,
        "the ready line names every shard's address"
    );
    let setup = NginxSetup::new(&SINGLE, &server.shard_addrs);
    setup.edit("hash $course_key consistent;", "hash $course_key;");
    let (mut nginx, nginx_log) = setup.start();

    let mut conn = server.conn().await;
    let courses: Vec<String> = (0..24).map(|i| format!("HOP{i}-01")).collect();
    let owners: std::collections::BTreeSet<usize> = courses
        .iter()
        .map(|c| enrolld::shard::owner_of(&enrolld::ids::CourseId::parse(c).unwrap(), 3).0)
        .collect();
    assert_eq!(owners.len(), 3, "the courses should spread over the shards");
    for c in &courses {
        put_course(&mut conn, c, 5).await;
    }
    let before = hops(&mut conn).await;
    // One student per course: each sends 6 requests here, within the default burst.
    let bearer = |c: &str| token(&format!("hop-{c}"));
    for c in &courses {
        let student = format!("Authorization: Bearer {}", bearer(c));
        let path = format!("/v1/courses/{c}/enrollment");
        let (status, _, body) = curl_tls(&setup, "POST", &path, &[student.clone()], None);
        assert_eq!(status, 201, "{c}: {body}");
        let (status, _, body) = curl_tls(&setup, "GET", &format!("/v1/courses/{c}"), &[student.clone()], None);
        assert_eq!(status, 200, "{c}: {body}");
    }
    let after_nginx = hops(&mut conn).await;
    assert_eq!(after_nginx, before, "a request through nginx crossed shards");

    // Control: the same reads on the shared port land on shards at random and do cross.
    for c in &courses {
        for _ in 0..4 {
            let mut fresh = Conn::open(server.addr).await;
            let r = fresh
                .request("GET", &format!("/v1/courses/{c}"), Some(&bearer(c)), None)
                .await;
            assert_eq!(r.status, 200);
        }
    }
    assert!(
        hops(&mut conn).await > after_nginx,
        "no request crossed shards on the shared port"
    );
    nginx.assert_running(&nginx_log);
}

/// Course requests passed between shards so far, summed over the shards.
async fn hops(conn: &mut Conn) -> f64 {
    let body = conn.request("GET", "/metrics", None, None).await.body;
    sample_sum(&String::from_utf8_lossy(&body), "enrolld_shard_hops_total", &[]).expect("hops exposed")
}

/// enrolld behind the shipped nginx config: TLS, proxying, and one request id in both logs.
/// Needs `enrolld serve --access-log` (one info line per request with `request_id=`).
#[test]
fn enroll_through_nginx_over_tls_with_one_request_id() {
    let edir = TempDir::new("deploy_e2e");
    let server = start_enrolld(&edir, &["--access-log"]);
    let setup = NginxSetup::new(&SINGLE, &[server.addr]);
    let (mut nginx, nginx_log) = setup.start();

    let rid = format!("deploy-test-{:016x}", rand::random::<u64>());
    let (status, _, body) = curl_tls(
        &setup,
        "PUT",
        "/v1/admin/courses/OPS201-01",
        &[format!("Authorization: Bearer {}", admin_token())],
        Some(r#"{"title":"Operations","capacity":5}"#),
    );
    assert_eq!(status, 201, "{body}");

    let (status, head, body) = curl_tls(
        &setup,
        "POST",
        "/v1/courses/OPS201-01/enrollment",
        &[
            format!("Authorization: Bearer {}", token("ops-student")),
            format!("X-Request-Id: {rid}"),
        ],
        None,
    );
    assert_eq!(status, 201, "{head}{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["course_id"], "OPS201-01");
    assert_eq!(v["student_id"], "ops-student");
    // The client's id came back once (nginx hides enrolld's copy and adds its own).
    let ids: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-request-id:"))
        .collect();
    assert_eq!(ids.len(), 1, "{head}");
    assert_eq!(header(&head, "x-request-id"), Some(rid.as_str()), "{head}");

    // The same id in nginx's access log (on the enrollment's line) and in enrolld's log.
    wait_access_log(&setup, &rid, |t| {
        t.lines().any(|l| {
            l.contains(&format!("req_id={rid} "))
                && l.contains("POST /v1/courses/OPS201-01/enrollment")
                && l.contains("\" 201 ")
        })
    });
    let mut seen = Vec::new();
    wait_enrolld_log(&server, &mut seen, &rid);

    // Without a client id, nginx makes one ($request_id), sends it upstream and returns it.
    let (status, head, _) = curl_tls(&setup, "GET", "/healthz", &[], None);
    assert_eq!(status, 200);
    let made = header(&head, "x-request-id").expect("an id").to_owned();
    assert!(
        made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "not nginx's $request_id: {made}"
    );
    wait_access_log(&setup, &made, |t| t.contains(&format!("req_id={made} ")));
    wait_enrolld_log(&server, &mut seen, &made);

    // /metrics is not published through the front.
    let (status, _, _) = curl_tls(&setup, "GET", "/metrics", &[], None);
    assert_eq!(status, 404);
    nginx.assert_running(&nginx_log);
}

// ---------------------------------------------------------------------------------------
// nginx when no answer comes back: "nothing recorded" (503) only when nothing was sent

/// What a stand-in for enrolld does with each request it has read.
#[derive(Clone, Copy)]
enum NoAnswer {
    /// Closes the connection at once.
    HangUp,
    /// Keeps the connection open without a word until nginx gives up on it.
    Silent,
}

/// A stand-in for enrolld on a free loopback port that reads every request head and never
/// answers. Counts the requests it read (so a request nginx sent twice shows).
struct FakeNode {
    addr: SocketAddr,
    requests_read: Arc<AtomicUsize>,
}

impl FakeNode {
    fn start(how: NoAnswer) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests_read = Arc::new(AtomicUsize::new(0));
        let counter = requests_read.clone();
        // Lives as long as the test binary; it only ever blocks in accept.
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let counter = counter.clone();
                std::thread::spawn(move || FakeNode::serve(conn, how, &counter));
            }
        });
        FakeNode { addr, requests_read }
    }

    fn serve(mut conn: TcpStream, how: NoAnswer, counter: &AtomicUsize) {
        conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        counter.fetch_add(1, Ordering::SeqCst);
        if let NoAnswer::Silent = how {
            // Until nginx closes (its proxy_read_timeout) or the read timeout.
            while matches!(conn.read(&mut chunk), Ok(n) if n > 0) {}
        }
    }

    fn requests_read(&self) -> usize {
        self.requests_read.load(Ordering::SeqCst)
    }
}

/// Checks one answer of nginx's own: `status`, the contract's JSON error `code` with a
/// message, a request id, and `Retry-After` exactly when the code is `unavailable`.
fn assert_nginx_error(what: &str, answer: &(u16, String, String), status: u16, code: &str) {
    let (got, head, body) = answer;
    assert_eq!(*got, status, "{what}:\n{head}{body}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert_eq!(v["error"], code, "{what}: {body}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
    let ct = header(head, "content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "{what}: content type {ct:?}");
    assert!(header(head, "x-request-id").is_some(), "{what}: no request id:\n{head}");
    let retry_after = header(head, "retry-after");
    if code == "unavailable" {
        assert_eq!(retry_after, Some("1"), "{what}:\n{head}");
    } else {
        assert_eq!(retry_after, None, "{what}: Retry-After on an unknown outcome:\n{head}");
    }
}

/// Nothing listens on either node: nginx never got a request out, so nothing can have
/// been recorded: the contract's `503 unavailable` with Retry-After, after trying both.
#[test]
fn nginx_answers_503_unavailable_when_no_node_takes_the_connection() {
    let dead: Vec<SocketAddr> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let setup = NginxSetup::new(&SINGLE, &dead);
    let (mut nginx, nginx_log) = setup.start();
    let student = format!("Authorization: Bearer {}", token("dead-student"));
    let path = "/v1/courses/DEAD101-01/enrollment";
    let answer = curl_tls(&setup, "POST", path, &[student.clone()], None);
    assert_nginx_error("POST, both nodes refuse", &answer, 503, "unavailable");
    let answer = curl_tls(&setup, "GET", "/v1/courses/DEAD101-01", &[student], None);
    assert_nginx_error("GET, both nodes refuse", &answer, 503, "unavailable");
    // The POST was offered to both (a connection that never opened sent nothing).
    wait_access_log(&setup, "the POST tried on both nodes", |t| {
        t.lines()
            .any(|l| l.contains(&format!("POST {path}")) && dead.iter().all(|a| l.contains(&a.to_string())))
    });
    nginx.assert_running(&nginx_log);
}

/// Both nodes read the request and hang up without a word. The request was sent, so
/// whether a seat was taken is unknown: `502 outcome_unknown`, never the 503 that means
/// nothing was recorded. The POST reached one node only: nginx does not resend a
/// non-idempotent request once sent. The GET that follows is resent to the other node
/// (proxy_next_upstream), which shows the count would have seen a resent POST.
#[test]
fn nginx_answers_502_outcome_unknown_when_a_node_hangs_up_after_reading() {
    let nodes = [FakeNode::start(NoAnswer::HangUp), FakeNode::start(NoAnswer::HangUp)];
    let setup = NginxSetup::new(&SINGLE, &[nodes[0].addr, nodes[1].addr]);
    let (mut nginx, nginx_log) = setup.start();
    let read_by_nodes = || nodes.iter().map(FakeNode::requests_read).sum::<usize>();
    let student = format!("Authorization: Bearer {}", token("cut-student"));

    let answer = curl_tls(
        &setup,
        "POST",
        "/v1/courses/CUT101-01/enrollment",
        &[student.clone()],
        None,
    );
    assert_nginx_error("POST, node hung up", &answer, 502, "outcome_unknown");
    assert_eq!(read_by_nodes(), 1, "the POST was sent to a node exactly once");

    let answer = curl_tls(&setup, "GET", "/v1/courses/CUT101-01", &[student], None);
    assert_nginx_error("GET, both nodes hung up", &answer, 502, "outcome_unknown");
    assert_eq!(read_by_nodes(), 3, "the GET was tried on both nodes");
    nginx.assert_running(&nginx_log);
}

/// The node reads the request and never answers: past proxy_read_timeout (1 s here,
/// 30 s shipped) nginx gives up, and the outcome is unknown: `504 outcome_unknown`.
#[test]
fn nginx_answers_504_outcome_unknown_when_a_node_never_answers() {
    let node = FakeNode::start(NoAnswer::Silent);
    let setup = NginxSetup::new(&SINGLE, &[node.addr]);
    setup.edit("proxy_read_timeout 30s;", "proxy_read_timeout 1s;");
    let (mut nginx, nginx_log) = setup.start();
    let student = format!("Authorization: Bearer {}", token("slow-student"));
    let answer = curl_tls(&setup, "POST", "/v1/courses/SLOW101-01/enrollment", &[student], None);
    assert_nginx_error("POST, node silent", &answer, 504, "outcome_unknown");
    assert_eq!(node.requests_read(), 1, "the POST was sent once");
    nginx.assert_running(&nginx_log);
}
