//! Each node's catalog cache (cluster mode): every course, for the reads a node answers
//! about courses other nodes own.
//!
//! Why: `GET /v1/courses` spans every node's courses, and `GET /v1/courses/{id}` lands on
//! any node; passing each to the owner (or to MySQL) would put a hop or a query on the
//! busiest read. So each node keeps a copy of the catalog, filled from the store before the
//! node is ready, and kept fresh by the owners: every `PUBLISH_TICK_MS` each shard sends
//! the courses that changed in that tick (a hot course once per tick, however many seats
//! it sold), and the node publishes them on Redis (`{redis_prefix}catalog`). A node
//! applies a change only when it is newer than what it holds: changes are stamped with
//! the owner's lease epoch and a counter, and a takeover bumps the epoch. A gap in a
//! publisher's numbering, a Redis outage, or simply `cluster_catchup_ms` passing makes the
//! node re-read the whole catalog from MySQL, so the copy is never older than that bound,
//! with or without Redis.
//! Must never: decide a seat (seat decisions read only the owner shard's memory), or grow
//! past `CATALOG_COURSES_MAX`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::ids::CourseId;
use crate::model::CourseSpec;
use crate::shard::table::CourseView;

/// Courses a node's cache holds at most (a university's catalog is a few tens of
/// thousands); a catalog past it is served from the store.
pub const CATALOG_COURSES_MAX: usize = 1_000_000;
/// How often the shards send what changed (and so the coalescing window of a hot course).
pub const PUBLISH_TICK_MS: u64 = 100;
/// Changed courses waiting to be published at most; beyond, changes are dropped and the
/// other nodes' next catch-up from the store brings them.
pub const PUBLISH_QUEUE_MAX: usize = 65_536;

/// Orders the versions of one course across owners: the owner's lease epoch on the
/// course's partition (a takeover bumps it), then the owner's counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
}

struct Entry {
    view: CourseView,
    stamp: Stamp,
    /// When a change (not a catch-up) last set it.
    changed_at: Instant,
    /// This node passed a change of the course to its owner at this instant: the copy is
    /// not served until a newer change or a catch-up begun after it arrives (a student
    /// reads their own write on the node they wrote through).
    stale_since: Option<Instant>,
}

/// A course as the owners publish it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub title: String,
    pub capacity: u32,
    pub enrolled: u32,
    pub opens_at: Option<i64>,
    pub closes_at: Option<i64>,
    pub version: u64,
    pub stamp: Stamp,
    #[serde(default)]
    pub draw_at: Option<i64>,
    #[serde(default)]
    pub waitlist_max: u32,
    #[serde(default)]
    pub waitlisted: u32,
}

impl Published {
    pub fn of(view: &CourseView, stamp: Stamp) -> Published {
        Published {
            id: view.id.to_string(),
            title: view.spec.title.clone(),
            capacity: view.spec.capacity,
            enrolled: view.enrolled,
            opens_at: view.spec.opens_at,
            closes_at: view.spec.closes_at,
            version: view.version,
            stamp,
            draw_at: view.spec.draw_at,
            waitlist_max: view.spec.waitlist_max,
            waitlisted: view.waitlisted,
        }
    }

    fn view(&self) -> Option<CourseView> {
        Some(CourseView {
            id: CourseId::parse(&self.id)?,
            spec: CourseSpec {
                title: self.title.clone(),
                capacity: self.capacity,
                opens_at: self.opens_at,
                closes_at: self.closes_at,
                draw_at: self.draw_at,
                waitlist_max: self.waitlist_max,
            },
            enrolled: self.enrolled,
            seats_left: self.capacity.saturating_sub(self.enrolled),
            version: self.version,
            waitlisted: self.waitlisted,
        })
    }
}

/// One message on the bus: a publisher's numbered batch of changes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    /// The publishing node and its incarnation.
    pub node: String,
    pub incarnation: i64,
    /// 1, 2, 3... per incarnation: a skipped number is a lost message.
    pub seq: u64,
    pub courses: Vec<Published>,
}

/// The node's copy of the catalog.
pub struct Catalog {
    courses: RwLock<BTreeMap<CourseId, Entry>>,
    /// When the copy was last known whole: the last catch-up from the store.
    refreshed_at: RwLock<Option<Instant>>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            courses: RwLock::new(BTreeMap::new()),
            refreshed_at: RwLock::new(None),
        }
    }
}

impl Catalog {
    /// Applies an owner's change if it is newer than the copy's. True when applied.
    pub fn apply(&self, change: &Published) -> bool {
        let Some(view) = change.view() else {
            return false;
        };
        let mut courses = self.courses.write();
        let full = courses.len() >= CATALOG_COURSES_MAX;
        match courses.get_mut(&view.id) {
            Some(e) if e.stamp >= change.stamp => false,
            Some(e) => {
                e.view = view;
                e.stamp = change.stamp;
                e.changed_at = Instant::now();
                e.stale_since = None;
                true
            }
            None if full => false,
            None => {
                courses.insert(
                    view.id.clone(),
                    Entry {
                        view,
                        stamp: change.stamp,
                        changed_at: Instant::now(),
                        stale_since: None,
                    },
                );
                true
            }
        }
    }

    /// Replaces the copy with the store's catalog as read from `started`: a course a
    /// change updated after the read began keeps that newer state.
    pub fn catch_up(&self, read: Vec<CourseView>, started: Instant) {
        let mut courses = self.courses.write();
        for view in read.into_iter().take(CATALOG_COURSES_MAX) {
            match courses.get_mut(&view.id) {
                Some(e) if e.changed_at >= started => {}
                // The store's state, newer than the last change applied; that change's
                // stamp stays, so a change older than it that arrives late cannot
                // take the copy back.
                Some(e) => {
                    e.view = view;
                    if e.stale_since.is_some_and(|t| t < started) {
                        e.stale_since = None;
                    }
                }
                None => {
                    courses.insert(
                        view.id.clone(),
                        Entry {
                            view,
                            stamp: Stamp::default(),
                            changed_at: started,
                            stale_since: None,
                        },
                    );
                }
            }
        }
        *self.refreshed_at.write() = Some(started);
    }

    /// Whether the first catch-up is done (the node may serve reads from the copy).
    pub fn ready(&self) -> bool {
        self.refreshed_at.read().is_some()
    }

    /// Seconds since the copy was last known whole (the catch-up bound's gauge).
    pub fn age(&self) -> Option<Duration> {
        self.refreshed_at.read().map(|t| t.elapsed())
    }

    /// The course's copy, unless a change this node passed on has not reached it yet.
    pub fn get(&self, id: &str) -> Option<CourseView> {
        self.courses
            .read()
            .get(id)
            .filter(|e| e.stale_since.is_none())
            .map(|e| e.view.clone())
    }

    /// This node just passed a change of `id` to its owner: reads of it go to the owner
    /// until the copy has caught up.
    pub fn passed_on(&self, id: &str) {
        if let Some(e) = self.courses.write().get_mut(id) {
            e.stale_since = Some(Instant::now());
        }
    }

    /// Up to `limit` courses with ids after `after`, in id order.
    pub fn list(&self, after: Option<&CourseId>, limit: usize) -> Vec<CourseView> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.courses
            .read()
            .range::<CourseId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.view.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.courses.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, enrolled: u32, epoch: u64, seq: u64) -> Published {
        Published {
            id: id.into(),
            title: "t".into(),
            capacity: 10,
            enrolled,
            opens_at: None,
            closes_at: None,
            version: 1,
            stamp: Stamp { epoch, seq },
            draw_at: None,
            waitlist_max: 0,
            waitlisted: 0,
        }
    }

    #[test]
    fn only_newer_changes_apply_and_a_takeover_outranks_the_old_owner() {
        let c = Catalog::default();
        assert!(c.apply(&change("A", 1, 3, 5)));
        assert!(!c.apply(&change("A", 0, 3, 4)), "an older change of the same owner");
        assert!(c.apply(&change("A", 2, 3, 6)));
        assert!(c.apply(&change("A", 3, 4, 1)), "the new owner's first change");
        assert!(!c.apply(&change("A", 9, 3, 99)), "the old owner, after the takeover");
        assert_eq!(c.get("A").unwrap().enrolled, 3);
    }

    #[test]
    fn a_change_passed_on_is_not_read_from_the_copy_until_it_arrives() {
        let c = Catalog::default();
        assert!(c.apply(&change("A", 1, 1, 1)));
        c.passed_on("A");
        assert_eq!(c.get("A"), None, "read from the owner meanwhile");
        assert!(!c.apply(&change("A", 1, 1, 1)), "not newer");
        assert_eq!(c.get("A"), None);
        assert!(c.apply(&change("A", 2, 1, 2)));
        assert_eq!(c.get("A").unwrap().enrolled, 2);
        c.passed_on("A");
        let later = Instant::now();
        c.catch_up(vec![change("A", 3, 0, 0).view().unwrap()], later);
        assert_eq!(c.get("A").unwrap().enrolled, 3, "a catch-up begun after the change");
    }

    #[test]
    fn a_catch_up_keeps_what_changed_after_it_began() {
        let c = Catalog::default();
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.apply(&change("A", 5, 1, 1)));
        let stale = change("A", 4, 0, 0).view().unwrap();
        let other = change("B", 1, 0, 0).view().unwrap();
        c.catch_up(vec![stale, other], started);
        assert_eq!(c.get("A").unwrap().enrolled, 5);
        assert_eq!(c.get("B").unwrap().enrolled, 1);
        assert!(c.ready());
        // After a catch-up, the owner's next change applies; its late older one does not.
        let later = Instant::now();
        c.catch_up(vec![change("A", 6, 0, 0).view().unwrap()], later);
        assert_eq!(c.get("A").unwrap().enrolled, 6);
        assert!(!c.apply(&change("A", 4, 1, 1)));
        assert!(c.apply(&change("A", 7, 1, 2)));
        assert_eq!(c.get("A").unwrap().enrolled, 7);
    }
}

/// Runs on each shard's thread in cluster mode: every `PUBLISH_TICK_MS`, hands the
/// courses the shard changed to the bus, stamped with the lease they were changed under
/// (a course whose lease this node lost meanwhile is left to its new owner).
pub async fn publish_changes(
    shard: std::rc::Rc<crate::shard::Shard>,
    held: std::sync::Arc<crate::partition::Held>,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tx: flume::Sender<Published>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(PUBLISH_TICK_MS));
    loop {
        tick.tick().await;
        for view in shard.take_changed() {
            let Some(lease) = held.lease_of(view.id.as_str()) else {
                continue;
            };
            let stamp = Stamp {
                epoch: lease.epoch,
                seq: seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            };
            // Full: the other nodes' next catch-up brings it.
            let _ = tx.try_send(Published::of(&view, stamp));
        }
    }
}
