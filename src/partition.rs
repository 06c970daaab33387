//! Partitions and the leases this node holds on them.
//!
//! Why: one process may decide for a course only while it holds the lease of the course's
//! partition (DESIGN.md, "Beyond one machine"). Courses hash to a fixed number of
//! partitions; the store keeps one lease row per partition (owner, epoch), and every write
//! transaction proves the epoch it was decided under (`persist::store`, the fence). This
//! module is the node's view of what it holds: shards read it on every decision, the
//! committers and the lease keeper change it. It sits below shard/ and persist/ so both
//! depend on it downward.
//! Must never: report a partition as held under an epoch the store did not grant.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a course id's CRC-32 that name its partition (its top bits).
pub const PARTITION_BITS: u32 = 14;
/// Partitions in every store, forever: changing it would move courses between leases.
pub const PARTITIONS: u32 = 1 << PARTITION_BITS;

/// A partition number, `0..PARTITIONS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub u32);

/// The partition of a course: the top bits of the CRC-32 of its id. The same CRC-32 is
/// the key hash of nginx's `hash $course_key consistent` ring, so a partition is one
/// contiguous stretch of that ring (`cluster::ring`).
pub fn partition_of(course: &str) -> Partition {
    Partition(crc32fast::hash(course.as_bytes()) >> (32 - PARTITION_BITS))
}

/// The first key hash of a partition's stretch of the ring.
pub fn first_hash_of(p: Partition) -> u32 {
    p.0 << (32 - PARTITION_BITS)
}

/// A lease as a decision was made under it: written into the change's transaction, which
/// commits only if the store still gives this node `epoch` on `partition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease {
    pub partition: Partition,
    pub epoch: u64,
}

/// What a write transaction proves (`persist::store`, the fence): that the store's
/// fence generation of this node is still `gen`, i.e. no lease was taken from it or given
/// up since its leases were last read. Every takeover of a node's partition, and every
/// release, bumps that node's generation in the same transaction. `leases` are those its
/// changes were decided under, each checked against [`Held`] as the batch is made; empty:
/// nothing to prove (a store without leases).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proof {
    pub gen: u64,
    pub leases: Vec<Lease>,
}

/// The epoch this node holds on each partition; 0 where it holds none; and the fence
/// generation these leases are the store's at. Lock-free: shards read it on every
/// decision.
pub struct Held {
    epochs: Box<[AtomicU64]>,
    gen: AtomicU64,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            epochs: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
            gen: AtomicU64::new(0),
        }
    }
}

impl Held {
    /// The fence generation the leases held are valid at. Read it before checking a
    /// batch's leases: a refresh loses leases first and then moves the generation on.
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// After reading the store's (generation, leases) in one snapshot: forgets every lease
    /// held that is not among `owned`, then moves to `gen`. Leases in `owned` that are not
    /// held stay unheld (the keeper grants them once their courses are loaded).
    pub fn refresh(&self, gen: u64, owned: &[Lease]) {
        let mine: std::collections::HashSet<Lease> = owned.iter().copied().collect();
        for p in 0..PARTITIONS {
            if let Some(lease) = self.lease(Partition(p)) {
                if !mine.contains(&lease) {
                    self.lose(lease);
                }
            }
        }
        // Two refreshes may race (the keeper's and a committer's): the newer snapshot's
        // generation stays.
        self.gen.fetch_max(gen, Ordering::AcqRel);
    }

    /// The lease held on `p`, if any.
    pub fn lease(&self, p: Partition) -> Option<Lease> {
        match self.epochs[p.0 as usize].load(Ordering::Acquire) {
            0 => None,
            epoch => Some(Lease { partition: p, epoch }),
        }
    }

    pub fn lease_of(&self, course: &str) -> Option<Lease> {
        self.lease(partition_of(course))
    }

    /// Records a lease the store granted (epochs start at 1).
    pub fn grant(&self, lease: Lease) {
        assert!(lease.epoch > 0, "the store's epochs start at 1");
        self.epochs[lease.partition.0 as usize].store(lease.epoch, Ordering::Release);
    }

    /// Forgets `lease` if it is still the one held (a newer grant stays).
    pub fn lose(&self, lease: Lease) -> bool {
        self.epochs[lease.partition.0 as usize]
            .compare_exchange(lease.epoch, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Forgets every lease.
    pub fn lose_all(&self) {
        for e in self.epochs.iter() {
            e.store(0, Ordering::Release);
        }
    }

    /// Partitions held.
    pub fn count(&self) -> usize {
        self.epochs.iter().filter(|e| e.load(Ordering::Relaxed) != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_the_hash_space_in_order() {
        assert_eq!(first_hash_of(Partition(0)), 0);
        assert_eq!(
            first_hash_of(Partition(PARTITIONS - 1)) >> (32 - PARTITION_BITS),
            PARTITIONS - 1
        );
        let p = partition_of("CS101-01");
        let h = crc32fast::hash(b"CS101-01");
        assert!(first_hash_of(p) <= h);
        assert!(p.0 == PARTITIONS - 1 || h < first_hash_of(Partition(p.0 + 1)));
    }

    /// MySQL computes the same partition in its generated `courses.part` column
    /// (`CRC32(id) >> 18`, migrations/mysql/0003_leases.sql): MariaDB 10.11 gave 4644.
    #[test]
    fn the_partition_is_the_one_mysql_stores() {
        assert_eq!(32 - PARTITION_BITS, 18, "the migration shifts by 18");
        assert_eq!(partition_of("CS101-01"), Partition(4644));
    }

    #[test]
    fn a_lost_lease_does_not_clear_a_newer_grant() {
        let held = Held::default();
        let p = Partition(7);
        held.grant(Lease { partition: p, epoch: 3 });
        held.grant(Lease { partition: p, epoch: 4 });
        assert!(!held.lose(Lease { partition: p, epoch: 3 }));
        assert_eq!(held.lease(p).map(|l| l.epoch), Some(4));
        assert!(held.lose(Lease { partition: p, epoch: 4 }));
        assert_eq!(held.lease(p), None);
        assert_eq!(held.count(), 0);
    }
}
