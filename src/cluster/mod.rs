//! Several nodes on one store: which node should own each partition.
//!
//! Why: with several nodes behind nginx's `hash $course_key consistent`, a course should be
//! owned by the node nginx sends it to, so almost no request needs a hop. The leases
//! themselves (who owns what, fenced in the store) are in `persist::lease`; this module
//! only chooses.
//! Must never: decide a seat (it only suggests owners; the store's leases decide).

pub mod ring;
