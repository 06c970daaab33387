//! Several nodes on one store (cluster mode): who owns each partition, and the way there.
//!
//! Why: with several nodes behind nginx's `hash $course_key consistent`, each course must
//! have exactly one deciding node, and it should be the node nginx sends the course to, so
//! almost no request needs a hop. The store's leases decide who owns what and fence every
//! commit (`persist::lease`, `persist::store`); this module keeps the node's view of the
//! owners ([`Cluster`]), changes ownership on a timer ([`keeper`]), and passes requests for
//! courses it does not own to their owner ([`forward`]).
//! Must never: decide a seat (only the owner shard does, under a lease the store granted),
//! or answer for a course from memory when this node does not hold its lease.

pub mod bus;
pub mod catalog;
pub mod forward;
pub mod keeper;
pub mod ring;

use std::sync::Arc;

use parking_lot::RwLock;

use crate::partition::{partition_of, Held, Partition, PARTITIONS};

pub use crate::persist::lease::Node;

/// Where a request for a course goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node holds the course's lease: its own shard decides.
    Here,
    /// Another live node owns it.
    Node { id: Arc<str>, advertise: Arc<str> },
    /// No live node owns it now (its owner died and the lease has not lapsed, or a
    /// takeover is under way).
    Nobody,
}

/// The owners as last read from the store.
#[derive(Default)]
struct Owners {
    nodes: Vec<(Arc<str>, Arc<str>, bool)>,
    /// Index into `nodes` per partition.
    by_partition: Vec<Option<u16>>,
}

/// This node's view of the cluster, shared by its shards (read per request) and its
/// keeper (written once per round).
pub struct Cluster {
    pub node_id: String,
    pub advertise: String,
    /// The leases this node holds (the fence's epochs).
    pub held: Arc<Held>,
    owners: RwLock<Owners>,
    /// Until when (milliseconds on `epoch`, a monotonic clock) this node's leases are
    /// surely still its own: the last heartbeat the store took, sent at `t`, keeps them
    /// until `t + lease` on the store's clock. Past it the node answers nothing from
    /// memory (another node may have taken over while this one was paused or cut off)
    /// until the keeper has renewed and re-read the leases.
    valid_until_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// Wakes the keeper for a round now (a request found a course nobody owns).
    wake: tokio::sync::Notify,
}

impl Cluster {
    pub fn new(node_id: String, advertise: String, held: Arc<Held>) -> Cluster {
        Cluster {
            node_id,
            advertise,
            held,
            owners: RwLock::new(Owners::default()),
            valid_until_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Asks the keeper for a round now: ownership looks stale (a course with no live
    /// owner, an owner that does not answer).
    pub fn wake_keeper(&self) {
        self.wake.notify_one();
    }

    /// Resolves when a round was asked for (the keeper's side of [`Cluster::wake_keeper`]).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The store took a heartbeat sent at `sent`: the leases are this node's until
    /// `sent + lease` (three quarters of it, for the clocks' drift and the scheduling of
    /// this check).
    pub fn renewed(&self, sent: std::time::Instant, lease: std::time::Duration) {
        let until = sent.saturating_duration_since(self.epoch) + lease * 3 / 4;
        self.valid_until_ms
            .fetch_max(until.as_millis() as u64, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether the last heartbeat still vouches for the leases held.
    pub fn leases_valid(&self) -> bool {
        self.now_ms() < self.valid_until_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where a request for `course` goes now.
    pub fn route(&self, course: &str) -> Route {
        let p = partition_of(course);
        if self.held.lease(p).is_some() {
            // A lease this node cannot vouch for is nobody's until the keeper looked.
            return if self.leases_valid() {
                Route::Here
            } else {
                Route::Nobody
            };
        }
        let owners = self.owners.read();
        match owners.by_partition.get(p.0 as usize).copied().flatten() {
            Some(i) => {
                let (id, advertise, alive) = &owners.nodes[usize::from(i)];
                if !*alive || **id == *self.node_id {
                    // A dead owner, or this node in the store's eyes but not (yet, or any
                    // more) in its own: a takeover or a hand-over is under way.
                    return Route::Nobody;
                }
                Route::Node {
                    id: id.clone(),
                    advertise: advertise.clone(),
                }
            }
            None => Route::Nobody,
        }
    }

    /// Records the owners the keeper read from the store.
    pub fn set_owners(&self, nodes: &[Node], owner_of: &[Option<usize>]) {
        assert_eq!(owner_of.len(), PARTITIONS as usize, "one owner entry per partition");
        let nodes: Vec<(Arc<str>, Arc<str>, bool)> = nodes
            .iter()
            .map(|n| (Arc::from(n.id.as_str()), Arc::from(n.advertise.as_str()), n.alive))
            .collect();
        let by_partition = owner_of
            .iter()
            .map(|o| o.map(|i| u16::try_from(i).expect("fewer than 65536 nodes")))
            .collect();
        *self.owners.write() = Owners { nodes, by_partition };
    }

    /// Each node with the partitions the store gives it (for `cluster status` and metrics).
    pub fn owned_counts(&self) -> Vec<(String, bool, usize)> {
        let owners = self.owners.read();
        let mut counts = vec![0usize; owners.nodes.len()];
        for i in owners.by_partition.iter().flatten() {
            counts[usize::from(*i)] += 1;
        }
        owners
            .nodes
            .iter()
            .zip(counts)
            .map(|((id, _, alive), n)| (id.to_string(), *alive, n))
            .collect()
    }

    /// Partitions no live node owns.
    pub fn unowned(&self) -> usize {
        let owners = self.owners.read();
        if owners.by_partition.is_empty() {
            return PARTITIONS as usize;
        }
        owners
            .by_partition
            .iter()
            .filter(|o| o.is_none_or(|i| !owners.nodes[usize::from(i)].2))
            .count()
    }
}

/// The owner each partition should have among the live nodes: the node nginx's ring of
/// their advertised addresses sends the partition's first key hash to. A partition is one
/// contiguous stretch of that ring (`partition::first_hash_of`), so with 16384 partitions
/// only the few stretches a ring point falls inside are split between two nodes.
pub fn preferred_owners(live: &[&str]) -> Vec<Option<usize>> {
    let ring = ring::Ring::new(live);
    (0..PARTITIONS)
        .map(|p| {
            // The middle of the stretch: the side of a split stretch with more of its keys
            // is more likely the one that holds the middle.
            let first = crate::partition::first_hash_of(Partition(p));
            ring.server_of_hash(first | (1 << (31 - crate::partition::PARTITION_BITS)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind nginx, a course goes to the node its partition's preferred owner is, but
    /// for the few partitions a ring point splits.
    #[test]
    fn preferred_owners_follow_nginx_for_almost_every_course() {
        let nodes = ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"];
        let owners = preferred_owners(&nodes);
        let ring = ring::Ring::new(&nodes);
        let courses = 20_000;
        let mut hops = 0;
        let mut per_node = [0usize; 3];
        for i in 0..courses {
            let id = format!("C{i:05}-01");
            let nginx = ring.server_of(id.as_bytes()).unwrap();
            let owner = owners[partition_of(&id).0 as usize].unwrap();
            per_node[owner] += 1;
            hops += usize::from(nginx != owner);
        }
        assert!(hops * 100 < courses, "{hops} of {courses} courses would hop");
        for n in per_node {
            assert!(n * 5 > courses, "every node owns a fair share: {per_node:?}");
        }
    }
}
