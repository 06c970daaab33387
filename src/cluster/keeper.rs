//! The keeper: the thread that keeps this node's leases in cluster mode.
//!
//! Why: ownership must follow the live nodes without an operator: a node that starts takes
//! its share, one that dies or stops has its share taken by the others, and each
//! partition goes to the node nginx's ring sends its courses to. Once per heartbeat
//! (`cluster_lease_ms / 3`) the keeper renews this node's heartbeat, reads the nodes and
//! the leases, gives up the partitions another live node should own, and takes those it
//! should own whose owner is gone. A takeover bumps the epochs in the store first, then
//! loads those courses from the store and hands them to the shards, and only then records
//! the leases as held: the shards start from exactly what was acknowledged, and nothing
//! decided under the old epochs can commit.
//! Must never: record a lease as held before its courses are in the shards, or take a
//! partition whose owner's heartbeat is live (the store's statement refuses it anyway).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::{preferred_owners, Cluster};
use crate::ids::CourseId;
use crate::metrics::ClusterMetrics;
use crate::partition::{partition_of, Lease, Partition, PARTITIONS};
use crate::persist::lease::NodeInfo;
use crate::persist::store::{LoadRow, Store, StoreOptions};
use crate::shard::table::Adopted;
use crate::shard::{owner_of, Command, Envelope, Reply};

/// Shortest bound on one round (a lease of 300 ms, the least allowed, gives 150 ms).
const ROUND_MS_MIN: u64 = 150;
/// Shortest time between two rounds that requests asked for.
const WOKEN_ROUND_GAP_MS: u64 = 100;

pub struct KeeperConfig {
    pub store_url: String,
    pub node: NodeInfo,
    pub cluster: Arc<Cluster>,
    /// Each shard's inbox, in shard order.
    pub shards: Vec<mpsc::Sender<Envelope>>,
    /// Bound on one round's store calls.
    pub statement_timeout: Duration,
    pub metrics: Arc<ClusterMetrics>,
}

/// The running keeper. [`Keeper::stop`] ends it before the node gives its leases back.
pub struct Keeper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Keeper {
    /// Ends the keeper after its current round (it takes nothing more over).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// Starts the keeper and returns once its first round is done: this node then holds its
/// share of the partitions, with their courses loaded (or the others hold them).
pub fn spawn(cfg: KeeperConfig) -> anyhow::Result<Keeper> {
    let stop = Arc::new(AtomicBool::new(false));
    let (first_tx, first_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("keeper".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = first_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(keep(cfg, stopping, first_tx));
        })
        .context("spawning the keeper thread")?;
    first_rx.recv().context("keeper thread died during start")??;
    Ok(Keeper { stop, thread })
}

async fn keep(cfg: KeeperConfig, stop: Arc<AtomicBool>, first: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    let opts = StoreOptions {
        pool_connections_max: 2,
        acquire_timeout_ms: cfg.statement_timeout.as_millis() as u64,
        events: false,
    };
    let store = match start(&cfg, &opts).await {
        Ok(store) => store,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    let _ = first.send(Ok(()));
    let mut tick = tokio::time::interval(crate::persist::lease::heartbeat_interval(cfg.node.lease));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // A round that cannot finish within half a lease is given up (its connection closed):
    // the leases are lapsing anyway, and the next round starts on a fresh connection.
    let round_bound = (cfg.node.lease / 2).max(Duration::from_millis(ROUND_MS_MIN));
    let mut last = tokio::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        tokio::select! {
            _ = tick.tick() => {}
            // A request found a course nobody owns: look at once, not a heartbeat later
            // (a node that stopped hands over this fast), but not more often than this.
            () = cfg.cluster.woken() => {
                tokio::time::sleep_until(last + Duration::from_millis(WOKEN_ROUND_GAP_MS)).await;
            }
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        last = tokio::time::Instant::now();
        match tokio::time::timeout(round_bound, round(&store, &cfg, false)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "cluster round failed"),
            Err(_) => tracing::warn!("cluster round timed out"),
        }
    }
    let _ = tokio::time::timeout(cfg.statement_timeout, store.close()).await;
}

/// Opens the keeper's own store connection, registers the node, and runs the first round.
async fn start(cfg: &KeeperConfig, opts: &StoreOptions) -> anyhow::Result<Store> {
    let store = Store::open(&cfg.store_url, opts).await?;
    store.ensure_partitions().await?;
    store.forget_lapsed_solo_nodes().await?;
    // A live process outside cluster mode holds this store: it is its one writer.
    if let Some(solo) = store
        .holders(&cfg.node)
        .await?
        .into_iter()
        .find(|h| h.alive && h.id.starts_with("solo-"))
    {
        return Err(crate::persist::lease::LeaseError::Held { holder: solo }.into());
    }
    store.register(&cfg.node).await?;
    tokio::time::timeout(cfg.statement_timeout * 4, round(&store, cfg, true))
        .await
        .context("the first cluster round timed out")??;
    Ok(store)
}

/// One round: heartbeat, read the owners, hand over, take over. `fresh`: the first round
/// (the fence generation is read whatever happens).
async fn round(store: &Store, cfg: &KeeperConfig, fresh: bool) -> anyhow::Result<()> {
    let sent = std::time::Instant::now();
    if !store.heartbeat(&cfg.node).await? {
        tracing::error!(node = %cfg.node.id, "another process started as this node id; exiting");
        cfg.cluster.held.lose_all();
        std::process::exit(1);
    }
    let nodes = store.nodes().await?;
    let owners = store.lease_owners().await?;
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let owner_of_part: Vec<Option<usize>> = owners
        .iter()
        .map(|o| o.as_deref().and_then(|id| index.get(id).copied()))
        .collect();
    cfg.cluster.set_owners(&nodes, &owner_of_part);

    let live: Vec<&super::Node> = nodes.iter().filter(|n| n.alive).collect();
    let me = live
        .iter()
        .position(|n| n.id == cfg.node.id)
        .context("this node's own heartbeat is not live right after renewing it")?;
    let preferred = preferred_owners(&live.iter().map(|n| n.advertise.as_str()).collect::<Vec<_>>());
    let held = &cfg.cluster.held;
    let mut give = Vec::new();
    let mut take = Vec::new();
    let mut taken_from_me = 0;
    for p in 0..PARTITIONS {
        let part = Partition(p);
        let mine = preferred[p as usize] == Some(me);
        if let Some(lease) = held.lease(part) {
            if owners[p as usize].as_deref() != Some(cfg.node.id.as_str()) {
                // Taken over while this node was paused or cut off: its commits are
                // fenced out already; stop answering for it.
                held.lose(lease);
                taken_from_me += 1;
            } else if !mine {
                give.push(lease);
            }
            continue;
        }
        if !mine {
            continue;
        }
        let gone = match owner_of_part[p as usize] {
            None => true,
            Some(i) => !nodes[i].alive || nodes[i].id == cfg.node.id,
        };
        if gone {
            take.push(part);
        }
    }
    // The leases read above are this node's as of the heartbeat.
    cfg.cluster.renewed(sent, cfg.node.lease);
    if taken_from_me > 0 {
        tracing::warn!(
            partitions = taken_from_me,
            "partitions were taken over by other nodes while this one was away"
        );
    }
    if !give.is_empty() {
        // Stop deciding first; then the store row, so the next owner can take it.
        for lease in &give {
            held.lose(*lease);
        }
        let parts: Vec<Partition> = give.iter().map(|l| l.partition).collect();
        let released = store.release_parts(&cfg.node, &parts).await?;
        cfg.metrics.partitions_released.inc_by(released);
        tracing::info!(
            partitions = released,
            "handed partitions over to their preferred owners"
        );
    }
    if !take.is_empty() {
        let owned = store.take_lapsed(&cfg.node, Some(&take)).await?;
        let newly: Vec<Lease> = owned
            .into_iter()
            .filter(|l| held.lease(l.partition).is_none())
            .collect();
        if !newly.is_empty() {
            adopt(store, cfg, newly).await?;
        }
    }
    if fresh || taken_from_me > 0 || !give.is_empty() || !take.is_empty() {
        // This node's fence generation moved (a release, a loss) or is not known yet: the
        // committers prove the one read here, with the leases of this same snapshot.
        let (gen, owned) = store.fence_state(&cfg.node.id).await?;
        held.refresh(gen, &owned);
    }
    cfg.metrics.leases_held.set(held.count() as i64);
    cfg.metrics.nodes_alive.set(live.len() as i64);
    cfg.metrics.partitions_unowned.set(cfg.cluster.unowned() as i64);
    Ok(())
}

/// Loads the courses of newly taken partitions, hands them to their shards, and records
/// the leases as held. A partition with a course the shards could not take (its old copy
/// still had a change in flight) is given back, to be taken again next round.
async fn adopt(store: &Store, cfg: &KeeperConfig, leases: Vec<Lease>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let parts: Vec<Partition> = leases.iter().map(|l| l.partition).collect();
    let shards = cfg.shards.len();
    let mut courses: HashMap<CourseId, Adopted> = HashMap::new();
    let only = (parts.len() < PARTITIONS as usize).then_some(&parts[..]);
    store
        .load(only, |row| match row {
            LoadRow::Course { id, spec, version } => {
                courses.insert(
                    id.clone(),
                    Adopted {
                        id,
                        spec,
                        version,
                        seats: Vec::new(),
                        places: Vec::new(),
                        drawn_at: None,
                    },
                );
            }
            row => {
                if let Some(c) = courses.get_mut(row.course()) {
                    c.absorb(row);
                }
            }
        })
        .await
        .context("loading the courses taken over")?;
    let count = courses.len();
    let mut per_shard: Vec<Vec<Adopted>> = (0..shards).map(|_| Vec::new()).collect();
    for (id, c) in courses {
        per_shard[owner_of(&id, shards).0].push(c);
    }
    let mut unsettled: Vec<CourseId> = Vec::new();
    for (shard, batch) in cfg.shards.iter().zip(per_shard) {
        let (reply, rx) = oneshot::channel();
        shard
            .send(Envelope {
                cmd: Command::Adopt(batch),
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("a shard is gone"))?;
        match rx.await {
            Ok(Reply::Adopted { unsettled: u }) => unsettled.extend(u),
            other => anyhow::bail!("a shard answered an adoption with {other:?}"),
        }
    }
    let refused: std::collections::HashSet<Partition> = unsettled.iter().map(|c| partition_of(c.as_str())).collect();
    for lease in &leases {
        if !refused.contains(&lease.partition) {
            cfg.cluster.held.grant(*lease);
        }
    }
    if !refused.is_empty() {
        let back: Vec<Partition> = refused.into_iter().collect();
        tracing::warn!(
            partitions = back.len(),
            "courses still busy under the old lease; partitions given back for now"
        );
        store.release_parts(&cfg.node, &back).await?;
    }
    cfg.metrics.partitions_taken.inc_by((leases.len()) as u64);
    tracing::info!(
        partitions = leases.len(),
        courses = count,
        ms = started.elapsed().as_millis() as u64,
        "took partitions over"
    );
    Ok(())
}
