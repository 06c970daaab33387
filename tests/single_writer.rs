//! One store, one writer; one port, one process (API.md, "Running"): a second `enrolld
//! serve` on a SQLite file or a listen address that a live process holds exits 2 at start,
//! naming the holder, and the first goes on serving.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a refused start may take (it refuses before or right after loading the store).
const REFUSAL_WAIT_MS_MAX: u64 = 60_000;

/// `enrolld serve` with `args` on the test secret; expects it to exit by itself and returns
/// its exit code and stderr. A server that becomes ready instead is killed and fails the
/// test: it would be sharing the store or the port.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = spawn_serve(args);
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_millis(REFUSAL_WAIT_MS_MAX);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("enrolld ready") => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "a second enrolld started serving {args:?}:\n{}\n{line}",
                    lines.join("\n")
                );
            }
            Ok(line) => lines.push(line),
            // stderr closed: the process is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "enrolld {args:?} neither exited nor served");
            }
        }
    }
    let status = child.wait().expect("wait for enrolld");
    (status.code(), lines.join("\n"))
}

/// A refusal: exit 2 and a one-line error (after any log lines) naming each of `names`.
fn check_refused(args: &[&str], names: &[&str]) {
    let (code, log) = refused(args);
    assert_eq!(code, Some(2), "{args:?}: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("enrolld: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {log}");
    for name in names {
        assert!(errors[0].contains(name), "{args:?}: the error names {name}: {log}");
    }
}

async fn enroll(addr: SocketAddr, course: &str, student: &str) -> u16 {
    let mut c = Conn::open(addr).await;
    let path = format!("/v1/courses/{course}/enrollment");
    c.request("POST", &path, Some(&token(student)), None).await.status
}

#[tokio::test]
async fn a_second_server_on_one_sqlite_file_exits_2_naming_the_holder() {
    let dir = TempDir::new("enrolld-single-writer");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let mut first = Server::start(&["--store", &store, "--shards", "2"]);
    let mut c = first.conn().await;
    put_course(&mut c, "ONE-1", 5).await;

    let holder = format!("pid {}", first.child.id());
    check_refused(
        &["--listen", "127.0.0.1:0", "--store", &store],
        &[&dir.path("e.db"), &holder],
    );

    // The first goes on serving, and `token` runs beside it (it takes no lock).
    assert_eq!(enroll(first.addr, "ONE-1", "ann").await, 201);
    let out = Command::new(bin())
        .args(["token", "--sub", "bob", "--store", &store])
        .output()
        .expect("run enrolld token");
    assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));

    // Once the first has exited, the file (and its port, with connections of the first
    // one in TIME_WAIT) takes a new server, which holds what the first committed.
    let port = first.addr.to_string();
    assert_eq!(first.terminate(), Some(0));
    drop(c);
    let second = Server::start_args(
        ["serve", "--listen", &port, "--jwt-secret", SECRET, "--store", &store]
            .map(String::from)
            .to_vec(),
    );
    let mut c = second.conn().await;
    assert_eq!(roster(&mut c, "ONE-1").await, vec!["ann"]);
}

#[tokio::test]
async fn a_second_server_on_one_port_exits_2_naming_it() {
    let dir = TempDir::new("enrolld-single-port");
    let first = Server::start(&[
        "--store",
        &format!("sqlite://{}", dir.path("first.db")),
        "--shards",
        "2",
        "--shard-listen",
        "127.0.0.1:0",
    ]);
    let other_store = format!("sqlite://{}", dir.path("second.db"));
    let shared = first.addr.to_string();
    check_refused(&["--listen", &shared, "--store", &other_store], &[&shared]);
    // A shard's own port is held just the same.
    let shard_port = first.shard_addrs[1].to_string();
    check_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            &other_store,
            "--shards",
            "1",
            "--shard-listen",
            &shard_port,
        ],
        &[&shard_port],
    );

    // Every connection still reaches the first.
    let mut c = first.conn().await;
    put_course(&mut c, "PORT-1", 10).await;
    for s in 0..10 {
        assert_eq!(enroll(first.addr, "PORT-1", &format!("s{s}")).await, 201);
    }
    assert_eq!(roster(&mut c, "PORT-1").await.len(), 10);
}

#[test]
fn a_port_another_program_listens_on_exits_2_naming_it() {
    let dir = TempDir::new("enrolld-foreign-port");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let store = format!("sqlite://{}", dir.path("e.db"));
    check_refused(&["--listen", &addr, "--store", &store], &[&addr]);
}
