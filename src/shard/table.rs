//! A shard's courses: ordered by id (the catalog is listed in id order) with a per-student
//! index of committed seats (for `GET /v1/me/enrollments`).
//!
//! Why: the table is built on the persist thread while the catalog loads, then moved whole
//! into its shard thread, so it is plain `Send` data with no `Rc` inside.
//! Must never: be shared between threads once its shard runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::course::{Course, CourseSpec, Pending, Place, Seat};
use crate::ids::{CourseId, StudentId, UnixMs};
use crate::persist::store::LoadRow;

/// A course as readers see it, copied out of the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CourseView {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub enrolled: u32,
    pub seats_left: u32,
    pub version: u64,
    /// Students on the waitlist.
    pub waitlisted: u32,
}

pub use crate::model::Standing as Status;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentView {
    pub course: CourseId,
    pub student: StudentId,
    pub status: Status,
}

/// A course as the store holds it, for a shard that takes its partition over.
#[derive(Clone, Debug)]
pub struct Adopted {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub version: u64,
    pub seats: Vec<(StudentId, UnixMs)>,
    /// Entries (rank None) and waitlist places.
    pub places: Vec<(StudentId, Option<u64>, UnixMs)>,
    pub drawn_at: Option<UnixMs>,
}

#[derive(Default)]
pub struct CourseTable {
    courses: BTreeMap<CourseId, Course>,
    /// The courses a student has a committed seat or place in.
    by_student: HashMap<StudentId, Vec<CourseId>>,
    /// Courses with a draw or a waitlist: the shard's rounds task looks at these for a
    /// draw that is due or seats to promote.
    rounds: BTreeSet<CourseId>,
}

impl Adopted {
    /// Adds a row of this course streamed from the store.
    pub fn absorb(&mut self, row: LoadRow) {
        match row {
            LoadRow::Course { spec, version, .. } => {
                self.spec = spec;
                self.version = version;
            }
            LoadRow::Enrollment { student, at, .. } => self.seats.push((student, at)),
            LoadRow::Place { student, rank, at, .. } => self.places.push((student, rank, at)),
            LoadRow::Drawn { at, .. } => self.drawn_at = Some(at),
        }
    }
}

impl CourseTable {
    /// Applies one row streamed from the store at start. Err names a seat or place that
    /// was not loaded (the student already had one in the course).
    pub fn load_row(&mut self, row: LoadRow) -> Result<(), String> {
        match row {
            LoadRow::Course { id, spec, version } => self.insert(&id, spec, version),
            LoadRow::Enrollment { course, student, at } => {
                if !self.load_enrollment(&course, student.clone(), at) {
                    return Err(format!("seat of {student} in {course}"));
                }
            }
            LoadRow::Place {
                course,
                student,
                rank,
                at,
            } => {
                if !self.load_place(&course, student.clone(), rank, at) {
                    return Err(format!("place of {student} in {course}"));
                }
            }
            LoadRow::Drawn { course, at } => self.load_drawn(&course, at),
        }
        Ok(())
    }

    pub fn get(&self, id: &CourseId) -> Option<&Course> {
        self.courses.get(id)
    }
    /// The table's own id for `id`: a shared clone, no allocation.
    pub fn id_of(&self, id: &str) -> Option<CourseId> {
        self.courses.get_key_value(id).map(|(k, _)| k.clone())
    }
    pub fn get_mut(&mut self, id: &CourseId) -> Option<&mut Course> {
        self.courses.get_mut(id)
    }
    /// Every course, in id order.
    pub fn courses(&self) -> impl Iterator<Item = &Course> {
        self.courses.values()
    }
    pub fn len(&self) -> usize {
        self.courses.len()
    }
    pub fn is_empty(&self) -> bool {
        self.courses.is_empty()
    }

    pub fn view(&self, id: &CourseId) -> Option<CourseView> {
        self.courses.get(id).map(view_of)
    }

    /// Inserts a new course (as loaded, or created by an admin).
    pub fn insert(&mut self, id: &CourseId, spec: CourseSpec, version: u64) {
        let course = Course::new(id.clone(), spec, version);
        self.courses.insert(id.clone(), course);
        self.note_rounds(id);
    }

    /// Records whether a course takes part in the rounds (after any change to its spec).
    pub fn note_rounds(&mut self, id: &CourseId) {
        let Some(c) = self.courses.get(id) else { return };
        if c.spec.draw_at.is_some() || c.spec.waitlist_max > 0 || c.waitlisted() > 0 {
            self.rounds.insert(id.clone());
        } else {
            self.rounds.remove(id);
        }
    }

    /// Courses with a draw or a waitlist.
    pub fn rounds(&self) -> impl Iterator<Item = &Course> {
        self.rounds.iter().filter_map(|id| self.courses.get(id))
    }

    /// Adds a committed seat read from the store at start.
    pub fn load_enrollment(&mut self, course: &CourseId, student: StudentId, at: UnixMs) -> bool {
        let Some(c) = self.courses.get_mut(course) else {
            return false;
        };
        if !c.load_enrolled(student.clone(), at) {
            return false;
        }
        self.reindex(course, &student);
        true
    }

    /// Adds a committed entry (rank None) or waitlist place read from the store at start.
    pub fn load_place(&mut self, course: &CourseId, student: StudentId, rank: Option<u64>, at: UnixMs) -> bool {
        let Some(c) = self.courses.get_mut(course) else {
            return false;
        };
        if !c.load_place(student.clone(), rank, at) {
            return false;
        }
        self.reindex(course, &student);
        self.note_rounds(course);
        true
    }

    /// Marks a course's draw as run (read from the store at start).
    pub fn load_drawn(&mut self, course: &CourseId, at: UnixMs) {
        if let Some(c) = self.courses.get_mut(course) {
            c.load_drawn(at);
        }
    }

    /// Puts a course in as the store holds it, replacing this shard's copy (a partition
    /// taken over: what the store holds once the earlier owner was fenced out is the
    /// truth). The caller makes sure the old copy is settled (nothing in flight).
    pub fn replace(&mut self, adopted: Adopted) {
        if let Some(old) = self.courses.remove(&adopted.id) {
            assert!(old.settled(), "{:?} replaced with changes in flight", adopted.id);
            for student in old.roster().into_iter().chain(old.waitlist()).chain(old.entrants()) {
                self.reindex(&adopted.id, &student);
            }
        }
        let Adopted {
            id,
            spec,
            version,
            seats,
            places,
            drawn_at,
        } = adopted;
        self.insert(&id, spec, version);
        for (student, at) in seats {
            if !self.load_enrollment(&id, student.clone(), at) {
                tracing::error!(course = %id, student = %student, "stored seat not loaded (already on the roster)");
            }
        }
        for (student, rank, at) in places {
            if !self.load_place(&id, student.clone(), rank, at) {
                tracing::error!(course = %id, student = %student, "stored place not loaded (already there)");
            }
        }
        if let Some(at) = drawn_at {
            self.load_drawn(&id, at);
        }
    }

    /// Brings the student index in step with a course after a change to the student's
    /// seat or place there: listed while the student has a committed seat or place.
    pub fn reindex(&mut self, course: &CourseId, student: &StudentId) {
        let present = self.courses.get(course).is_some_and(|c| {
            matches!(c.seat(student), Some(Seat::Enrolled { .. } | Seat::DropPending { .. }))
                || c.place(student).is_some_and(|p| p.state() != Pending::Adding)
        });
        let list = self.by_student.entry(student.clone()).or_default();
        let at = list.iter().position(|c| c == course);
        match (present, at) {
            (true, None) => list.push(course.clone()),
            (false, Some(i)) => {
                list.swap_remove(i);
            }
            _ => {}
        }
        if list.is_empty() {
            self.by_student.remove(student);
        }
    }

    /// Up to `limit` courses with ids after `after`, in id order.
    pub fn list(&self, after: Option<&CourseId>, limit: usize) -> Vec<CourseView> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.courses
            .range::<CourseId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, c)| view_of(c))
            .collect()
    }

    pub fn enrollments_of(&self, student: &StudentId) -> Vec<EnrollmentView> {
        let Some(list) = self.by_student.get(student) else {
            return Vec::new();
        };
        let mut all: Vec<EnrollmentView> = list
            .iter()
            .filter_map(|cid| {
                let c = self.courses.get(cid)?;
                let status = match (c.seat(student), c.place(student)) {
                    (Some(Seat::Enrolled { at } | Seat::DropPending { at }), _) => Status::Enrolled { at },
                    (_, Some(Place::Wait { rank, state, .. })) if state != Pending::Adding => Status::Waitlisted {
                        position: c.position(rank),
                    },
                    (_, Some(Place::Entry { state, .. })) if state != Pending::Adding => Status::Entered {
                        draw_at: c.spec.draw_at,
                    },
                    _ => return None,
                };
                Some(EnrollmentView {
                    course: cid.clone(),
                    student: student.clone(),
                    status,
                })
            })
            .collect();
        all.sort_by(|a, b| a.course.cmp(&b.course));
        all
    }

    /// The `limit` courses with the most requests since the last call, as requests per
    /// second over `window_secs`; starts a new window for every course.
    pub fn take_hottest(&self, limit: usize, window_secs: f64) -> Vec<crate::metrics::HotCourse> {
        let mut all: Vec<(u32, &Course)> = self
            .courses
            .values()
            .map(|c| (c.take_window_requests(), c))
            .filter(|(n, _)| *n > 0)
            .collect();
        all.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        all.truncate(limit);
        all.into_iter()
            .map(|(n, c)| crate::metrics::HotCourse {
                course: c.id.to_string(),
                requests_per_sec: f64::from(n) / window_secs,
                seats_left: c.seats_left(),
                outcomes: c.outcomes(),
            })
            .collect()
    }

    /// Seats committed across the table (tests and start-up logging).
    pub fn enrolled_total(&self) -> u64 {
        self.courses.values().map(|c| u64::from(c.enrolled())).sum()
    }
}

impl From<crate::persist::store::StoredCourse> for CourseView {
    /// A course as committed in the store (cluster mode's catalog).
    fn from(c: crate::persist::store::StoredCourse) -> Self {
        CourseView {
            seats_left: c.spec.capacity.saturating_sub(c.enrolled),
            id: c.id,
            spec: c.spec,
            enrolled: c.enrolled,
            version: c.version,
            waitlisted: c.waitlisted,
        }
    }
}

fn view_of(c: &Course) -> CourseView {
    CourseView {
        id: c.id.clone(),
        spec: c.spec.clone(),
        enrolled: c.enrolled(),
        seats_left: c.seats_left(),
        version: c.version,
        waitlisted: c.waitlisted(),
    }
}
