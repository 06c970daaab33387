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

/// The epoch this node holds on each partition; 0 where it holds none. Lock-free: shards
/// read it on every decision.
pub struct Held {
    epochs: Box<[AtomicU64]>,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            epochs: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Held {
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
        assert_eq!(first_hash_of(Partition(PARTITIONS - 1)) >> (32 - PARTITION_BITS), PARTITIONS - 1);
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
