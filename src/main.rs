//! The `enrolld` binary: `serve` and `token` (API.md's command-line contract), and
//! `shard-of`, which names the shard that owns a course (for proxies and load generators
//! that send each course to its owner's own port).

use clap::{Parser, Subcommand};

/// jemalloc: per-thread arenas suit one thread per core, and it returns memory better than
/// glibc's malloc under the churn of a rush.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use enrolld::config::{Config, ConfigArgs};
use enrolld::ids::{CourseId, StudentId};
use enrolld::net::auth::{Auth, Role};

#[derive(Parser)]
#[command(name = "enrolld", version, about = "Course-registration server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server
    Serve(ConfigArgs),
    /// Print a token signed with the configured secret
    Token {
        /// Subject: the student or admin id
        #[arg(long)]
        sub: String,
        #[arg(long, value_enum, default_value = "student")]
        role: RoleArg,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Print COUNT tokens, one a line, for subjects SUB-0 .. SUB-(COUNT-1) (load generation)
        #[arg(long)]
        count: Option<u32>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print "COURSE SHARD" for each course: the shard that owns it, whose own port
    /// (`shard_listen` + SHARD) answers it without a hop between shards
    ShardOf {
        /// The node's shard count (its `shards` setting)
        #[arg(long)]
        shards: usize,
        /// Course ids
        #[arg(required = true)]
        courses: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Student,
    Admin,
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) if refused(&e) => {
            eprintln!("enrolld: {e:#}");
            2
        }
        Err(e) => {
            eprintln!("enrolld: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Exit code 2 (API.md): a bad flag, file or key, or a listen address or SQLite file that
/// another live process holds. Nothing was started.
fn refused(e: &anyhow::Error) -> bool {
    use enrolld::net::BindError;
    use enrolld::single_writer::StoreLockError;
    e.downcast_ref::<enrolld::config::ConfigError>().is_some()
        || matches!(e.downcast_ref::<BindError>(), Some(BindError::InUse(_)))
        || matches!(e.downcast_ref::<StoreLockError>(), Some(StoreLockError::Held { .. }))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = Config::load(&args)?;
            enrolld::server::init_logging(cfg.log_format);
            enrolld::server::serve(cfg)
        }
        Cmd::Token {
            sub,
            role,
            ttl,
            count,
            config,
        } => {
            let cfg = Config::load(&config)?;
            let auth = Auth::new(&cfg.resolve_jwt_secret()?);
            let role = match role {
                RoleArg::Student => Role::Student,
                RoleArg::Admin => Role::Admin,
            };
            let bad_sub =
                || enrolld::config::ConfigError(format!("--sub {sub:?} must be 1-64 chars of [A-Za-z0-9_.-]"));
            match count {
                None => println!("{}", auth.mint(&StudentId::parse(&sub).ok_or_else(bad_sub)?, role, ttl)),
                Some(n) => {
                    use std::io::Write;
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for i in 0..n {
                        let id = StudentId::parse(&format!("{sub}-{i}")).ok_or_else(bad_sub)?;
                        writeln!(out, "{}", auth.mint(&id, role, ttl))?;
                    }
                }
            }
            Ok(())
        }
        Cmd::ShardOf { shards, courses } => {
            if !(1..=enrolld::config::SHARDS_MAX).contains(&shards) {
                let max = enrolld::config::SHARDS_MAX;
                return Err(enrolld::config::ConfigError(format!("--shards {shards} must be 1-{max}")).into());
            }
            for c in &courses {
                let id = CourseId::parse(c).ok_or_else(|| {
                    enrolld::config::ConfigError(format!("course id {c:?} must be 1-32 chars of [A-Za-z0-9_.-]"))
                })?;
                println!("{c} {}", enrolld::shard::owner_of(&id, shards).0);
            }
            Ok(())
        }
    }
}
