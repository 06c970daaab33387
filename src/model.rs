//! The course model that both the seat logic (shard/) and the store (persist/) speak of:
//! what an admin may set on a course, its limits, and the record of a draw.
//!
//! Why: shard/ sends changes to persist/, and persist/ stores and loads courses; with the
//! spec defined in shard/, the two imported each other. Here, below both, each depends
//! only downward.
//! Must never: depend on any other module of the crate but `ids`.

use crate::ids::{StudentId, UnixMs};

/// Largest capacity a course may have (a lecture hall, not a stadium).
pub const CAPACITY_MAX: u32 = 100_000;
/// Longest waitlist a course may keep.
pub const WAITLIST_MAX: u32 = 100_000;
/// Most entries one course's draw takes (beyond, an entry is refused as `course_full`).
pub const DRAW_ENTRIES_MAX: u32 = 200_000;

/// What an admin may set on a course.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CourseSpec {
    pub title: String,
    pub capacity: u32,
    pub opens_at: Option<UnixMs>,
    pub closes_at: Option<UnixMs>,
    /// With a draw: enrollment POSTs from `opens_at` until this instant are entries, and
    /// at this instant the owner draws (API.md, "Registration rounds").
    pub draw_at: Option<UnixMs>,
    /// Students who may wait for a seat (0: no waitlist).
    pub waitlist_max: u32,
}

impl CourseSpec {
    /// A first-come course with no draw and no waitlist.
    pub fn plain(title: impl Into<String>, capacity: u32, opens_at: Option<UnixMs>, closes_at: Option<UnixMs>) -> Self {
        CourseSpec {
            title: title.into(),
            capacity,
            opens_at,
            closes_at,
            draw_at: None,
            waitlist_max: 0,
        }
    }
}

/// A draw as it is committed: the seed, the entries in drawn order, and how the order was
/// cut. The first `seats` of `order` were enrolled, the next `waitlisted` went onto the
/// waitlist in that order, and the rest were not selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrawRecord {
    pub drawn_at: UnixMs,
    /// 32 bytes from the operating system's random source, as 64 hex digits.
    pub seed: String,
    pub order: Vec<StudentId>,
    pub seats: u32,
    pub waitlisted: u32,
    /// The waitlist rank the first waitlisted student got (the rest follow by one).
    pub first_rank: u64,
}

/// Where a student stands in a course (`Enrollment.status` in API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Enrolled {
        at: UnixMs,
    },
    /// On the waitlist at this 1-based position.
    Waitlisted {
        position: u32,
    },
    /// In the draw that runs at `draw_at`.
    Entered {
        draw_at: Option<UnixMs>,
    },
}
