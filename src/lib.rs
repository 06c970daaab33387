//! enrolld: a course-registration server that answers every student in milliseconds, never
//! sells a seat twice and never loses a seat it confirmed.
//!
//! Layout (see ARCHITECTURE.md for the invariants of each part):
//! - [`shard`]: the courses a shard owns, the pure seat decisions, cross-shard routing;
//! - [`net`]: listeners, hyper, routes, JSON, JWT, request ids;
//! - [`persist`]: the persist thread, group commit, the SQL stores, recovery;
//! - [`config`]: flags, environment and the TOML file, validated once;
//! - [`server`]: start-up order, threads, signals, shutdown;
//! - [`single_writer`]: one SQLite file, one process (an OS lock held for the process's life);
//! - [`limit`]: token buckets, flow rules, circuit breakers;
//! - [`metrics`]: per-shard counters summed at scrape time;
//! - [`model`]: the course spec both shard/ and persist/ speak of (below both);
//! - [`partition`]: courses' partitions and the leases this node holds (below both);
//! - [`cluster`]: several nodes: nginx's ring, partition owners;
//! - [`ids`]: validated ids, the time unit and the clock seam;
//! - [`follow`]: `enrolld events follow`, the change feed's consumer (a client, not the server);
//! - `sim` (tests only): the deterministic simulation of shard and persist.

pub mod cluster;
pub mod config;
pub mod follow;
pub mod ids;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod net;
pub mod partition;
pub mod persist;
pub mod server;
pub mod shard;
#[cfg(test)]
mod sim;
pub mod single_writer;
