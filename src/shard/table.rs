//! A shard's courses: ordered by id (the catalog is listed in id order) with a per-student
//! index of committed seats (for `GET /v1/me/enrollments`).
//!
//! Why: the table is built on the persist thread while the catalog loads, then moved whole
//! into its shard thread, so it is plain `Send` data with no `Rc` inside.
//! Must never: be shared between threads once its shard runs.

use std::collections::{BTreeMap, HashMap};

use super::course::{Course, CourseSpec};
use crate::ids::{CourseId, StudentId, UnixMs};

/// A course as readers see it, copied out of the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CourseView {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub enrolled: u32,
    pub seats_left: u32,
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentView {
    pub course: CourseId,
    pub student: StudentId,
    pub enrolled_at: UnixMs,
}

/// A course as the store holds it, for a shard that takes its partition over.
#[derive(Clone, Debug)]
pub struct Adopted {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub version: u64,
    pub seats: Vec<(StudentId, UnixMs)>,
}

#[derive(Default)]
pub struct CourseTable {
    courses: BTreeMap<CourseId, Course>,
    by_student: HashMap<StudentId, Vec<CourseId>>,
}

impl CourseTable {
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

    /// Inserts a course or applies a newer committed spec to it.
    pub fn upsert(&mut self, id: &CourseId, spec: CourseSpec, version: u64) {
        match self.courses.get_mut(id) {
            Some(c) => c.apply_spec(spec, version),
            None => {
                self.courses.insert(id.clone(), Course::new(id.clone(), spec, version));
            }
        }
    }

    /// Adds a committed seat read from the store at start.
    pub fn load_enrollment(&mut self, course: &CourseId, student: StudentId, at: UnixMs) -> bool {
        let Some(c) = self.courses.get_mut(course) else {
            return false;
        };
        if !c.load_enrolled(student.clone(), at) {
            return false;
        }
        self.by_student.entry(student).or_default().push(course.clone());
        true
    }

    /// Puts a course in as the store holds it, replacing this shard's copy (a partition
    /// taken over: what the store holds once the earlier owner was fenced out is the
    /// truth). The caller makes sure the old copy is settled (nothing in flight).
    pub fn replace(&mut self, adopted: Adopted) {
        if let Some(old) = self.courses.remove(&adopted.id) {
            assert!(old.settled(), "{:?} replaced with changes in flight", adopted.id);
            for student in old.roster() {
                self.index_dropped(&adopted.id, &student);
            }
        }
        let Adopted {
            id,
            spec,
            version,
            seats,
        } = adopted;
        self.courses.insert(id.clone(), Course::new(id.clone(), spec, version));
        for (student, at) in seats {
            if !self.load_enrollment(&id, student.clone(), at) {
                tracing::error!(course = %id, student = %student, "stored seat not loaded (already on the roster)");
            }
        }
    }

    /// Records a committed seat in the student index.
    pub fn index_enrolled(&mut self, course: &CourseId, student: &StudentId) {
        self.by_student.entry(student.clone()).or_default().push(course.clone());
    }

    /// Removes a dropped seat from the student index.
    pub fn index_dropped(&mut self, course: &CourseId, student: &StudentId) {
        if let Some(list) = self.by_student.get_mut(student) {
            list.retain(|c| c != course);
            if list.is_empty() {
                self.by_student.remove(student);
            }
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
        list.iter()
            .filter_map(|cid| {
                let at = match self.courses.get(cid)?.seat(student)? {
                    super::course::Seat::Enrolled { at } | super::course::Seat::DropPending { at } => at,
                    super::course::Seat::EnrollPending { .. } => return None,
                };
                Some(EnrollmentView {
                    course: cid.clone(),
                    student: student.clone(),
                    enrolled_at: at,
                })
            })
            .collect()
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

fn view_of(c: &Course) -> CourseView {
    CourseView {
        id: c.id.clone(),
        spec: c.spec.clone(),
        enrolled: c.enrolled(),
        seats_left: c.seats_left(),
        version: c.version,
    }
}
