//! The course model that both the seat logic (shard/) and the store (persist/) speak of:
//! what an admin may set on a course, and its limits.
//!
//! Why: shard/ sends changes to persist/, and persist/ stores and loads courses; with the
//! spec defined in shard/, the two imported each other. Here, below both, each depends
//! only downward.
//! Must never: depend on any other module of the crate but `ids`.

use crate::ids::UnixMs;

/// Largest capacity a course may have (a lecture hall, not a stadium).
pub const CAPACITY_MAX: u32 = 100_000;

/// What an admin may set on a course.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CourseSpec {
    pub title: String,
    pub capacity: u32,
    pub opens_at: Option<UnixMs>,
    pub closes_at: Option<UnixMs>,
}
