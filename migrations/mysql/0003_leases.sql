-- Partition leases (DESIGN.md, "Beyond one machine"). A node decides for a course only
-- while it holds the lease of the course's partition; every write transaction proves it
-- still holds the leases it depends on, so a node that
-- lost a partition can never commit to it (through the node's `fences` row below). The
-- rows (one per partition, 0..16383) are inserted at start by enrolld (persist/lease.rs).
CREATE TABLE IF NOT EXISTS nodes (
    id             VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    -- Each start of a node id is a new incarnation: a node that restarts under the same id
    -- knows the leases of an older incarnation are its dead predecessor's.
    incarnation    BIGINT       NOT NULL,
    advertise      VARCHAR(300) NOT NULL,
    host           VARCHAR(255) NOT NULL,
    pid            BIGINT       NOT NULL,
    started_at_ms  BIGINT       NOT NULL,
    -- The store's own clock (not the node's): a heartbeat moves it forward.
    expires_at_ms  BIGINT       NOT NULL
) ENGINE=InnoDB;

-- The fence: one row per node id. Every takeover of a node's partition and every release
-- bumps its `gen` in the same transaction, and each of the node's write transactions reads
-- its row with a shared lock and checks `gen`: one point read per transaction proves no
-- lease was taken from the node since it last read its leases.
CREATE TABLE IF NOT EXISTS fences (
    node  VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    gen   BIGINT      NOT NULL DEFAULT 0
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS leases (
    part   INT         NOT NULL PRIMARY KEY,
    owner  VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
    -- Bumped by every takeover; never goes back.
    epoch  BIGINT      NOT NULL DEFAULT 0,
    KEY leases_by_owner (owner)
) ENGINE=InnoDB;

-- A student's seats across every partition (GET /v1/me/enrollments on any node).
CREATE INDEX enrollments_by_student ON enrollments (student_id);

-- A course's partition, as `partition::partition_of` computes it: the top 14 bits of the
-- CRC-32 of its id (MySQL's CRC32 is the same IEEE CRC-32). Stored and indexed, so a node
-- that takes partitions over loads just their courses.
ALTER TABLE courses ADD COLUMN part INT AS (CRC32(id) >> 18) STORED, ADD KEY courses_by_part (part);
