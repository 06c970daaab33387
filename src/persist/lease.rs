//! Partition leases in the MySQL store: nodes, heartbeats, takeovers, release.
//!
//! Why: a node may decide for a course only while it holds the lease of the course's
//! partition, and the store is where that is decided, so it holds across pauses, network
//! cuts and clock steps (DESIGN.md, "Beyond one machine"). A node renews one heartbeat row
//! (one statement per `lease_ms / 3`), not a row per partition; a partition's lease lapses
//! when its owner's heartbeat does. Expiry is measured on the store's clock, so a node's
//! clock step never makes a live lease look lapsed. The fence itself (every write
//! transaction proving its epochs) is in `store.rs`, beside the statements it guards.
//!
//! Without cluster mode the one node takes every partition at start, which makes a second
//! process on the same database refuse to start (exit 2, naming the holder): the MySQL half
//! of "one store, one writer" (`single_writer` is the SQLite half).
//! Must never: take a partition whose owner's heartbeat has not lapsed (unless the owner is
//! this node id's own earlier incarnation), or move an epoch backwards.

use std::time::Duration;

use anyhow::Context;
use sqlx::Row;

use super::store::{Dialect, Store};
use crate::partition::{Lease, Partition, PARTITIONS};

/// The store's clock in unix milliseconds (MySQL).
const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";
/// Partition rows inserted per statement when the lease table is filled.
const PARTITION_ROWS_PER_INSERT: u32 = 4_096;

/// Who this process is in the lease table.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The cluster's node id, or a per-process `solo-…` id without cluster mode.
    pub id: String,
    /// New at every start: tells a restarted node from its dead predecessor.
    pub incarnation: i64,
    pub advertise: String,
    pub lease: Duration,
}

impl NodeInfo {
    /// A node outside cluster mode: an id of its own (no other process shares it), the
    /// listen address to name it by.
    pub fn solo(listen: &str, lease: Duration) -> NodeInfo {
        let incarnation = rand::random::<u32>() as i64;
        NodeInfo {
            id: format!("solo-{}-{:08x}", std::process::id(), incarnation),
            incarnation,
            advertise: listen.to_string(),
            lease,
        }
    }
}

/// A cluster node as the lease table describes it (what cluster/ routes by).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub advertise: String,
    /// Its heartbeat has not lapsed (on the store's clock).
    pub alive: bool,
}

/// Another node that holds leases, as the store describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    pub advertise: String,
    pub host: String,
    pub pid: i64,
    /// On the store's clock.
    pub expires_at_ms: i64,
    /// Its heartbeat has not lapsed.
    pub alive: bool,
    pub partitions: i64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} at {} (host {}, pid {}, {} partitions)",
            self.id, self.advertise, self.host, self.pid, self.partitions
        )
    }
}

/// Why the leases could not be taken at start.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A live enrolld holds partitions of this database: start-up refuses (exit 2).
    #[error("the store is served by another live enrolld: {holder}; one MySQL database takes one process unless the nodes form a cluster (--node-id)")]
    Held { holder: Holder },
}

fn mysql_only(store: &Store) -> anyhow::Result<()> {
    anyhow::ensure!(
        store.dialect() == Dialect::Mysql,
        "partition leases live in MySQL/MariaDB only"
    );
    Ok(())
}

impl Store {
    /// Inserts the partitions' lease rows that are missing (a new or older database).
    pub async fn ensure_partitions(&self) -> anyhow::Result<()> {
        mysql_only(self)?;
        let row = sqlx::query("SELECT COUNT(*) FROM leases")
            .fetch_one(self.pool())
            .await?;
        if row.try_get::<i64, _>(0)? == i64::from(PARTITIONS) {
            return Ok(());
        }
        let mut first = 0;
        while first < PARTITIONS {
            let last = (first + PARTITION_ROWS_PER_INSERT).min(PARTITIONS);
            let values: Vec<String> = (first..last).map(|p| format!("({p})")).collect();
            sqlx::query(&format!("INSERT IGNORE INTO leases (part) VALUES {}", values.join(",")))
                .execute(self.pool())
                .await
                .context("filling the lease table")?;
            first = last;
        }
        Ok(())
    }

    /// Writes this node's row with a fresh heartbeat (replacing an earlier incarnation's).
    pub async fn register(&self, node: &NodeInfo) -> anyhow::Result<()> {
        mysql_only(self)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        sqlx::query(&format!(
            "REPLACE INTO nodes (id, incarnation, advertise, host, pid, started_at_ms, expires_at_ms) \
             VALUES (?, ?, ?, ?, ?, {NOW_MS}, {NOW_MS} + ?)"
        ))
        .bind(node.id.as_str())
        .bind(node.incarnation)
        .bind(node.advertise.as_str())
        .bind(host.trim())
        .bind(i64::from(std::process::id()))
        .bind(node.lease.as_millis() as i64)
        .execute(self.pool())
        .await
        .context("registering the node")?;
        sqlx::query("INSERT IGNORE INTO fences (node, gen) VALUES (?, 0)")
            .bind(node.id.as_str())
            .execute(self.pool())
            .await
            .context("registering the node's fence")?;
        Ok(())
    }

    /// Moves this node's heartbeat forward. False: the row is gone or belongs to a newer
    /// incarnation (this process must not act as the node any more).
    pub async fn heartbeat(&self, node: &NodeInfo) -> anyhow::Result<bool> {
        let renewed = sqlx::query(&format!(
            "UPDATE nodes SET expires_at_ms = {NOW_MS} + ? WHERE id = ? AND incarnation = ?"
        ))
        .bind(node.lease.as_millis() as i64)
        .bind(node.id.as_str())
        .bind(node.incarnation)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Takes every partition (of `only`, when given) whose owner is gone: no owner, an
    /// owner without a row, an owner whose heartbeat lapsed, or this node id itself (an
    /// earlier incarnation's lease, or one this process gave up in memory; callers pass
    /// only partitions they do not hold). Each taken lease's epoch, and its previous
    /// owner's fence generation, are bumped in the same statement, so whatever the previous
    /// owner still has queued can never commit. Returns every lease this node holds
    /// afterwards.
    pub async fn take_lapsed(&self, node: &NodeInfo, only: Option<&[Partition]>) -> anyhow::Result<Vec<Lease>> {
        mysql_only(self)?;
        let only_sql = match only {
            None => String::new(),
            Some([]) => return self.owned(node).await,
            Some(parts) => {
                let list: Vec<String> = parts.iter().map(|p| p.0.to_string()).collect();
                format!(" AND l.part IN ({})", list.join(","))
            }
        };
        sqlx::query(&format!(
            "UPDATE leases l LEFT JOIN nodes n ON n.id = l.owner LEFT JOIN fences f ON f.node = l.owner \
             SET l.owner = ?, l.epoch = l.epoch + 1, f.gen = f.gen + 1 \
             WHERE (l.owner IS NULL OR n.id IS NULL OR n.expires_at_ms < {NOW_MS} OR l.owner = ?){only_sql}"
        ))
        .bind(node.id.as_str())
        .bind(node.id.as_str())
        .execute(self.pool())
        .await
        .context("taking lapsed leases")?;
        self.owned(node).await
    }

    /// How many leases the store gives this node (the heartbeat's check: one row back).
    pub async fn owned_count(&self, node: &NodeInfo) -> anyhow::Result<usize> {
        let row = sqlx::query("SELECT COUNT(*) FROM leases WHERE owner = ?")
            .bind(node.id.as_str())
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    /// The leases the store gives this node.
    pub async fn owned(&self, node: &NodeInfo) -> anyhow::Result<Vec<Lease>> {
        let rows = sqlx::query("SELECT part, epoch FROM leases WHERE owner = ?")
            .bind(node.id.as_str())
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Lease {
                    partition: Partition(r.try_get::<i32, _>(0)? as u32),
                    epoch: r.try_get::<i64, _>(1)? as u64,
                })
            })
            .collect()
    }

    /// The node's fence generation and the leases the store gives it, read in one
    /// snapshot (the generation's row share-locked first, so no takeover or release of
    /// this node's leases can land between the two reads).
    pub async fn fence_state(&self, node: &str) -> anyhow::Result<(u64, Vec<Lease>)> {
        let mut conn = super::store::OpenTransaction::new(self.pool().acquire().await?);
        sqlx::query("BEGIN").execute(conn.get()).await?;
        let gen: i64 = sqlx::query("SELECT gen FROM fences WHERE node = ? LOCK IN SHARE MODE")
            .bind(node)
            .fetch_optional(conn.get())
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        let rows = sqlx::query("SELECT part, epoch FROM leases WHERE owner = ?")
            .bind(node)
            .fetch_all(conn.get())
            .await?;
        sqlx::query("COMMIT").execute(conn.get()).await?;
        conn.ended();
        let leases = rows
            .iter()
            .map(|r| {
                Ok(Lease {
                    partition: Partition(r.try_get::<i32, _>(0)? as u32),
                    epoch: r.try_get::<i64, _>(1)? as u64,
                })
            })
            .collect::<anyhow::Result<Vec<Lease>>>()?;
        Ok((gen as u64, leases))
    }

    /// The other nodes that hold leases, with their heartbeats.
    pub async fn holders(&self, node: &NodeInfo) -> anyhow::Result<Vec<Holder>> {
        let rows = sqlx::query(&format!(
            "SELECT l.owner, COALESCE(n.advertise, ''), COALESCE(n.host, ''), COALESCE(n.pid, 0), \
                        COALESCE(n.expires_at_ms, 0), COUNT(*), COALESCE(n.expires_at_ms, 0) >= {NOW_MS} \
                 FROM leases l LEFT JOIN nodes n ON n.id = l.owner \
                 WHERE l.owner IS NOT NULL AND l.owner <> ? \
                 GROUP BY l.owner, n.advertise, n.host, n.pid, n.expires_at_ms ORDER BY l.owner"
        ))
        .bind(node.id.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Holder {
                    id: r.try_get(0)?,
                    advertise: r.try_get(1)?,
                    host: r.try_get(2)?,
                    pid: r.try_get(3)?,
                    expires_at_ms: r.try_get(4)?,
                    partitions: r.try_get(5)?,
                    alive: r.try_get::<i64, _>(6)? != 0,
                })
            })
            .collect()
    }

    /// Every cluster node's row, with whether its heartbeat is live on the store's clock.
    /// Rows of processes outside cluster mode (`solo-…`) are left out: such a process is
    /// never a member (one that starts beside a cluster refuses, and must not be handed
    /// partitions while it does).
    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let rows = sqlx::query(&format!(
            "SELECT id, advertise, expires_at_ms >= {NOW_MS} FROM nodes WHERE id NOT LIKE 'solo-%' ORDER BY id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Node {
                    id: r.try_get(0)?,
                    advertise: r.try_get(1)?,
                    alive: r.try_get::<i64, _>(2)? != 0,
                })
            })
            .collect()
    }

    /// Each partition's owner (None: nobody), as node ids, in partition order.
    pub async fn lease_owners(&self) -> anyhow::Result<Vec<Option<String>>> {
        let rows = sqlx::query("SELECT part, owner FROM leases ORDER BY part")
            .fetch_all(self.pool())
            .await?;
        let mut owners = vec![None; PARTITIONS as usize];
        for r in &rows {
            let part: i32 = r.try_get(0)?;
            if let Some(slot) = owners.get_mut(part as usize) {
                *slot = r.try_get(1)?;
            }
        }
        Ok(owners)
    }

    /// Gives up these partitions (a hand-over: another node should own them now), bumping
    /// this node's fence generation in the same statement, so a change of theirs still
    /// queued can never commit. The caller stopped deciding for them first, and reads its
    /// fence state afterwards.
    pub async fn release_parts(&self, node: &NodeInfo, parts: &[Partition]) -> anyhow::Result<u64> {
        if parts.is_empty() {
            return Ok(0);
        }
        let list: Vec<String> = parts.iter().map(|p| p.0.to_string()).collect();
        Ok(sqlx::query(&format!(
            "UPDATE leases l JOIN fences f ON f.node = l.owner SET l.owner = NULL, f.gen = f.gen + 1 \
             WHERE l.owner = ? AND l.part IN ({})",
            list.join(",")
        ))
        .bind(node.id.as_str())
        .execute(self.pool())
        .await?
        .rows_affected()
        // The count takes in the fence row too.
        .saturating_sub(1))
    }

    /// Gives up every lease this node holds (after its last commit) and ends its
    /// heartbeat, so other nodes take over at once instead of waiting for expiry.
    pub async fn release(&self, node: &NodeInfo) -> anyhow::Result<u64> {
        let released = sqlx::query(
            "UPDATE leases l JOIN fences f ON f.node = l.owner SET l.owner = NULL, f.gen = f.gen + 1 WHERE l.owner = ?",
        )
        .bind(node.id.as_str())
        .execute(self.pool())
        .await?
        .rows_affected()
        // The count takes in the fence row too.
        .saturating_sub(1);
        // A cluster node's row stays (lapsed) for `cluster status`; a process outside
        // cluster mode has an id of its own, which no later start reuses.
        let end = if node.id.starts_with("solo-") {
            "DELETE FROM nodes WHERE id = ? AND incarnation = ?".to_string()
        } else {
            format!("UPDATE nodes SET expires_at_ms = {NOW_MS} - 1 WHERE id = ? AND incarnation = ?")
        };
        sqlx::query(&end)
            .bind(node.id.as_str())
            .bind(node.incarnation)
            .execute(self.pool())
            .await?;
        Ok(released)
    }

    /// Removes rows of nodes outside cluster mode that hold nothing and lapsed: each
    /// process has its own, so they would pile up.
    pub async fn forget_lapsed_solo_nodes(&self) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "DELETE FROM nodes WHERE id LIKE 'solo-%' AND expires_at_ms < {NOW_MS} \
             AND id NOT IN (SELECT owner FROM leases WHERE owner IS NOT NULL)"
        ))
        .execute(self.pool())
        .await?;
        sqlx::query(
            "DELETE FROM fences WHERE node LIKE 'solo-%' AND node NOT IN (SELECT id FROM nodes) \
             AND node NOT IN (SELECT owner FROM leases WHERE owner IS NOT NULL)",
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// A node as `enrolld cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub advertise: String,
    pub host: String,
    pub pid: i64,
    pub alive: bool,
    /// Until its heartbeat lapses (negative: lapsed that long ago), on the store's clock.
    pub expires_in_ms: i64,
    pub partitions: i64,
    pub courses: i64,
}

/// The whole cluster as the store sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeStatus>,
    /// Partitions (and their courses) whose owner is missing or whose heartbeat lapsed.
    pub partitions_unowned: i64,
    pub courses_unowned: i64,
}

impl Store {
    /// Each node with its heartbeat and what it owns (`enrolld cluster status`).
    pub async fn cluster_status(&self) -> anyhow::Result<ClusterStatus> {
        mysql_only(self)?;
        let rows = sqlx::query(&format!(
            "SELECT n.id, n.advertise, n.host, n.pid, n.expires_at_ms - {NOW_MS}, \
                    (SELECT COUNT(*) FROM leases l WHERE l.owner = n.id), \
                    (SELECT COUNT(*) FROM courses c JOIN leases l ON l.part = c.part WHERE l.owner = n.id) \
             FROM nodes n ORDER BY n.id"
        ))
        .fetch_all(self.pool())
        .await?;
        let mut nodes = Vec::with_capacity(rows.len());
        for r in &rows {
            let expires_in_ms: i64 = r.try_get(4)?;
            nodes.push(NodeStatus {
                id: r.try_get(0)?,
                advertise: r.try_get(1)?,
                host: r.try_get(2)?,
                pid: r.try_get(3)?,
                alive: expires_in_ms >= 0,
                expires_in_ms,
                partitions: r.try_get(5)?,
                courses: r.try_get(6)?,
            });
        }
        let lapsed = format!(
            "l.owner IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = l.owner AND n.expires_at_ms >= {NOW_MS})"
        );
        let partitions_unowned: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM leases l WHERE {lapsed}"))
            .fetch_one(self.pool())
            .await?
            .try_get(0)?;
        let courses_unowned: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM courses c JOIN leases l ON l.part = c.part WHERE {lapsed}"
        ))
        .fetch_one(self.pool())
        .await?
        .try_get(0)?;
        Ok(ClusterStatus {
            nodes,
            partitions_unowned,
            courses_unowned,
        })
    }
}

/// How often a node renews its heartbeat: three times per lease.
pub fn heartbeat_interval(lease: Duration) -> Duration {
    lease / 3
}

/// Takes every partition for a node outside cluster mode, at start. A partition another
/// node holds is waited for: if that node's heartbeat moves, it is alive and this start
/// refuses ([`LeaseError::Held`], after giving back what it took); if it lapses, its
/// partitions are taken. So a restart right after `kill -9` waits out the dead process's
/// lease (at most `lease`), and one beside a live process refuses within a heartbeat.
pub async fn take_all(store: &Store, node: &NodeInfo) -> anyhow::Result<Vec<Lease>> {
    store.ensure_partitions().await?;
    store.forget_lapsed_solo_nodes().await?;
    // A live cluster on this store: refuse before registering or taking anything, or its
    // keepers would count this process as a member for a moment and hand it partitions.
    if let Some(member) = store
        .holders(node)
        .await?
        .into_iter()
        .find(|h| h.alive && !h.id.starts_with("solo-"))
    {
        return Err(LeaseError::Held { holder: member }.into());
    }
    store.register(node).await?;
    let mut first_seen: Vec<Holder> = Vec::new();
    let poll = (node.lease / 6).clamp(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let leases = store.take_lapsed(node, None).await?;
        if leases.len() == PARTITIONS as usize {
            return Ok(leases);
        }
        let holders = store.holders(node).await?;
        let alive = holders.iter().find(|h| {
            first_seen
                .iter()
                .any(|seen| seen.id == h.id && h.expires_at_ms > seen.expires_at_ms)
        });
        if let Some(holder) = alive {
            store.release(node).await?;
            return Err(LeaseError::Held { holder: holder.clone() }.into());
        }
        for h in holders {
            if !first_seen.iter().any(|seen| seen.id == h.id) {
                tracing::warn!(holder = %h, "the store's leases are held; waiting for them to lapse or be renewed");
                first_seen.push(h);
            }
        }
        store.heartbeat(node).await?;
        tokio::time::sleep(poll).await;
    }
}
