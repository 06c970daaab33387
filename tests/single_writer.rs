//! One store, one writer; one port, one process (API.md, "Running"): a second `enrolld
//! serve` on a SQLite file or a listen address that a live process holds exits 2 at start,
//! naming the holder, and the first goes on serving.

mod common;

use common::*;
use std::process::Command;

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
    assert_eq!(enroll_on(first.addr, "ONE-1", "ann").await, 201);
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
        assert_eq!(enroll_on(first.addr, "PORT-1", &format!("s{s}")).await, 201);
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
