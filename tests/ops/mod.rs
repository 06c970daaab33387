//! The operations tools the tests run (nginx, prometheus, openssl, ...), found on the
//! machine and run as child processes, and nginx fronts rendered from the shipped configs
//! in deploy/nginx/. Shared by tests/deploy.rs and tests/cluster_nginx.rs.
//! Must never: run a tool on anything but a temp dir and free loopback ports (the system's
//! own nginx or prometheus, if any, stay untouched), or leave a process behind.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, TempDir};

/// A file of this crate.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The path of an installed tool, or a failure that names it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: run scripts/ops-tools.sh (it installs promtool, \
         prometheus, nginx, openssl, systemd-analyze and curl)"
    )
}

/// Runs a command to completion; fails the test (showing its output) unless it exits 0.
pub fn check(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `text` with `from` replaced by `to`; fails when `from` is not there, so a change to a
/// shipped file's placeholders shows up here rather than as a test of the wrong config.
pub fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "expected {from:?} in the shipped file (the test rewrites it)"
    );
    text.replace(from, to)
}

/// A background process (nginx, prometheus): SIGTERM on drop, SIGKILL if it lingers.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &str) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, name }
    }

    /// Fails the test (with the process's output) if it has exited.
    pub fn assert_running(&mut self, log: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited ({status}):\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM lets nginx's master stop its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, proc_: &mut Proc, log: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        proc_.assert_running(log);
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on {addr}:\n{}",
            proc_.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A shipped nginx include and its example upstream's `server` lines, which a setup
/// replaces with one line per address it is given.
pub struct Include {
    pub file: &'static str,
    pub example_servers: &'static str,
}

/// One node (or one node's shard ports): deploy/nginx/enrolld.conf.
pub const SINGLE: Include = Include {
    file: "deploy/nginx/enrolld.conf",
    example_servers: "server 127.0.0.1:8080 max_fails=3 fail_timeout=5s;",
};

/// Several nodes in cluster mode: deploy/nginx/enrolld-cluster.conf.
pub const CLUSTER: Include = Include {
    file: "deploy/nginx/enrolld-cluster.conf",
    example_servers: "server 10.0.0.11:8080 max_fails=3 fail_timeout=5s;
    server 10.0.0.12:8080 max_fails=3 fail_timeout=5s;
    server 10.0.0.13:8080 max_fails=3 fail_timeout=5s;",
};

/// A temp dir holding a throwaway certificate, a shipped include rewritten to it (and to
/// a free loopback port, one `server` line per address of `upstreams`, and logs in the
/// dir), and a wrapper nginx.conf.
pub struct NginxSetup {
    pub dir: TempDir,
    pub conf: String,
    /// Where nginx listens (TLS unless a test rewrites the `listen` line).
    pub addr: SocketAddr,
    pub access_log: String,
}

impl NginxSetup {
    pub fn new(include: &Include, upstreams: &[SocketAddr]) -> NginxSetup {
        let dir = TempDir::new("deploy_nginx");
        check(Command::new(tool("openssl")).args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-keyout",
            &dir.path("key.pem"),
            "-out",
            &dir.path("cert.pem"),
        ]));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let access_log = dir.path("enrolld.access.log");
        let mut inc = read(include.file);
        inc = replace(&inc, "/etc/enrolld/tls/cert.pem", &dir.path("cert.pem"));
        inc = replace(&inc, "/etc/enrolld/tls/key.pem", &dir.path("key.pem"));
        inc = replace(&inc, "listen 443 ssl;", &format!("listen {addr} ssl;"));
        let servers: Vec<String> = upstreams
            .iter()
            .map(|a| format!("server {a} max_fails=3 fail_timeout=5s;"))
            .collect();
        inc = replace(&inc, include.example_servers, &servers.join("\n    "));
        inc = replace(&inc, "/var/log/nginx/enrolld.access.log", &access_log);
        inc = replace(&inc, "/var/log/nginx/enrolld.error.log", &dir.path("enrolld.error.log"));
        let include = dir.path("enrolld.conf");
        std::fs::write(&include, inc).unwrap();
        let d = |n: &str| dir.path(n);
        let conf = dir.path("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "pid {pid};\nerror_log {err} info;\nworker_processes 1;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  default_type application/octet-stream;\n  access_log {acc};\n  \
                 client_body_temp_path {cb};\n  proxy_temp_path {px};\n  fastcgi_temp_path {fc};\n  \
                 uwsgi_temp_path {uw};\n  scgi_temp_path {sc};\n  include {include};\n}}\n",
                pid = d("nginx.pid"),
                err = d("error.log"),
                acc = d("default.access.log"),
                cb = d("client_body"),
                px = d("proxy"),
                fc = d("fastcgi"),
                uw = d("uwsgi"),
                sc = d("scgi"),
            ),
        )
        .unwrap();
        NginxSetup {
            dir,
            conf,
            addr,
            access_log,
        }
    }

    /// The nginx command line for this setup (prefix, error log before the config is read).
    pub fn nginx(&self) -> Command {
        let mut c = Command::new(tool("nginx"));
        c.args(["-p", &self.dir.path(""), "-e", &self.dir.path("error.log")])
            .args(["-c", &self.conf]);
        c
    }

    /// Rewrites the include in the temp dir (`replace`: `from` must be there).
    pub fn edit(&self, from: &str, to: &str) {
        let path = self.dir.path("enrolld.conf");
        let inc = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, replace(&inc, from, to)).unwrap();
    }

    /// Checks the config (`nginx -t`) and runs nginx in the foreground until the returned
    /// process is dropped; returns once it listens. The second value is its output's file.
    pub fn start(&self) -> (Proc, String) {
        check(self.nginx().arg("-t"));
        let log = self.dir.path("nginx.out");
        let mut nginx = Proc::spawn("nginx", self.nginx().args(["-g", "daemon off;"]), &log);
        wait_listening(self.addr, &mut nginx, &log);
        (nginx, log)
    }
}
