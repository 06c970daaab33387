//! nginx's consistent-hash ring: the node nginx's `hash $course_key consistent;` upstream
//! (ketama, deploy/nginx/enrolld.conf) sends a course to.
//!
//! Why: enrolld picks each partition's owner node with nginx's own ring, so a request
//! nginx routed by course id almost always lands on the node that owns the course and
//! needs no hop. Pure: no I/O, no clock; depends only on the server names and the key.
//! Must never: diverge from nginx. Verified against real nginx 1.22.1 (Debian bookworm), 5000
//! random course ids per upstream through the shipped `$course_key` map: 3 servers, 5
//! servers, 3 with one `down` (against the ring of the 2 live ones), and 3 hashing `$arg_k`
//! (raw printable keys); all 20 000 picks equal [`Ring::server_of`]. Also two servers whose
//! points collide, in both orders. The tables in `tests` are some of those observed picks.
//!
//! The ring (ngx_http_upstream_hash_module.c, the same from 1.22.1 to 1.31.5): per server line, the
//! name as written ("127.0.0.1:8081") is split into host and port (below); the base is the
//! CRC-32 state after `host`, one NUL byte and `port`; the server's 160 points (per unit of
//! weight; enrolld's servers all have weight 1) are CRC-32 of the base continued with the
//! previous point's 4 little-endian bytes (0 before the first). Points are sorted by hash
//! and equal hashes dropped but the first. A key's hash is the CRC-32 of the key; its
//! server is the first point at or after it, wrapping to the first point.

/// Points per server of weight 1.
pub const POINTS_PER_SERVER: usize = 160;

/// Points nginx walks at most (the first and 20 more) looking for a usable server before
/// it gives up on the ring and picks round-robin.
pub const NGINX_WALK_POINTS_MAX: usize = 21;

/// nginx's consistent-hash ring over upstream servers given as written in the upstream
/// block ("127.0.0.1:8081").
///
/// With some servers down (marked `down`, failed `max_fails` times, at `max_conns`) nginx
/// walks from the key's point on to the next points until one belongs to a usable server;
/// a `Ring` built from only the usable servers gives that same pick, as long as nginx's
/// walk finds one within [`NGINX_WALK_POINTS_MAX`] points (past that nginx picks
/// round-robin: with 1 of 3 servers down about one key in 10^10; with most servers down,
/// noticeably often) and no dropped duplicate point hid a usable server's point behind an
/// unusable one's (a 32-bit hash collision between two servers, about once in 56 000
/// three-server rings).
#[derive(Debug, Clone)]
pub struct Ring {
    /// Sorted by hash, no two equal: (point hash, index into the servers given to `new`).
    points: Vec<(u32, usize)>,
}

impl Ring {
    /// The ring nginx builds for `servers`, each of weight 1 (160 points per server).
    ///
    /// A name equal to an earlier one adds no point of its own (nginx balances such
    /// servers round-robin among themselves; here the first one listed gets them all).
    pub fn new<S: AsRef<str>>(servers: &[S]) -> Ring {
        let mut points = Vec::with_capacity(servers.len() * POINTS_PER_SERVER);
        for (index, server) in servers.iter().enumerate() {
            let (host, port) = split_host_port(server.as_ref().as_bytes());
            let mut base = crc32fast::Hasher::new();
            base.update(host);
            base.update(&[0]);
            base.update(port);
            let mut prev = 0u32;
            for _ in 0..POINTS_PER_SERVER {
                let mut h = base.clone();
                h.update(&prev.to_le_bytes());
                prev = h.finalize();
                points.push((prev, index));
            }
        }
        // nginx sorts with the C library's qsort, a stable merge sort in glibc (2.36 here),
        // then keeps the first of equal hashes: so on a collision the server listed first
        // keeps the point. A stable sort and `dedup` keeping the first do the same.
        points.sort_by_key(|&(hash, _)| hash);
        points.dedup_by_key(|&mut (hash, _)| hash);
        Ring { points }
    }

    /// Index into the servers given to [`Ring::new`] that nginx picks for `key` when every
    /// server is up. `None` for an empty ring, and for an empty key: nginx (since 1.17.1)
    /// balances requests with an empty key round-robin, so no server owns it.
    pub fn server_of(&self, key: &[u8]) -> Option<usize> {
        if key.is_empty() {
            return None;
        }
        self.server_of_hash(crc32fast::hash(key))
    }

    /// The server for a raw 32-bit key hash (`crc32fast::hash(key)`), for callers that hash
    /// once: the first point at or after `hash`, else the first point. `None` for an empty
    /// ring.
    pub fn server_of_hash(&self, hash: u32) -> Option<usize> {
        let first = self.points.first()?;
        let at = self.points.partition_point(|&(point, _)| point < hash);
        Some(self.points.get(at).unwrap_or(first).1)
    }
}

/// nginx's split of a server name: a "unix:" prefix (any case) is a socket path, no port;
/// else the port is the digits after the last ':' when only digits follow it; else (a name
/// written without a port, e.g. "10.0.0.12" or "[::1]") the whole name is the host and the
/// port is empty, even though nginx connects to port 80.
fn split_host_port(name: &[u8]) -> (&[u8], &[u8]) {
    if name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"unix:") {
        return (&name[5..], &[]);
    }
    for (at, &c) in name.iter().enumerate().rev() {
        if c == b':' {
            return (&name[..at], &name[at + 1..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (name, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: [&str; 3] = ["127.0.0.1:18491", "127.0.0.1:18492", "127.0.0.1:18493"];

    /// (key, index into THREE) as real nginx 1.22.1 picked them for
    /// `hash $course_key consistent;` over THREE, the key from /v1/courses/{key}.
    const NGINX_3: &[(&str, usize)] = &[
        ("CS101", 0),
        ("c-4711", 0),
        ("MATH2210", 0),
        ("kPo_QyFcIoCVvQ2hmsCfjdp", 1),
        ("MATH83545", 2),
        ("m", 0),
        ("c-85100", 2),
        ("PHYS36697", 0),
        ("PHYS44238", 1),
        ("RefIut", 1),
        ("B2kVCHv3yToid5zp.YGAfBsnz6WUtn_s", 0),
        ("c-94003", 2),
        ("BIO19840", 2),
        ("pI", 1),
        ("c-45317", 0),
        ("MATH32935", 1),
        ("CS20158", 2),
        ("PHYS79964", 2),
        ("L47HIDcpmw1FB", 1),
        ("2", 2),
        ("PHYS88427", 0),
        ("dT_6NbC", 1),
        ("c-37778", 0),
        ("c-46179", 0),
    ];

    /// Five servers, two not on 127.0.0.1 and one written without a port (port 80, but
    /// nginx hashes no port for it).
    const FIVE: [&str; 5] = [
        "127.0.0.1:18491",
        "127.0.0.1:18492",
        "127.0.0.1:18493",
        "127.0.0.2:18494",
        "127.0.0.3",
    ];

    /// (key, index into FIVE) as real nginx 1.22.1 picked them, as for NGINX_3.
    const NGINX_5: &[(&str, usize)] = &[
        ("CS33432", 3),
        ("ECON61898", 0),
        ("m_dX3a5IDnOdcd", 4),
        ("W", 0),
        ("aXqA2h9Uz-0_T1SaQ6", 1),
        ("vuGvI", 4),
        ("u5-", 2),
        ("MATH79165", 4),
        ("FZ", 0),
        ("c-9295", 1),
    ];

    #[test]
    fn picks_what_nginx_picked() {
        let ring = Ring::new(&THREE);
        assert!(NGINX_3.len() >= 20);
        for &(key, server) in NGINX_3 {
            assert_eq!(ring.server_of(key.as_bytes()), Some(server), "key {key:?}");
        }
    }

    #[test]
    fn picks_what_nginx_picked_among_five() {
        let ring = Ring::new(&FIVE);
        for &(key, server) in NGINX_5 {
            assert_eq!(ring.server_of(key.as_bytes()), Some(server), "key {key:?}");
        }
    }

    /// These two servers share one point (hash 849932538) and "k261" hashes just below it.
    /// Real nginx 1.22.1 sent "k261" to whichever of the two was listed first, in both
    /// orders: the collided point stays with the first server listed.
    #[test]
    fn a_collided_point_stays_with_the_server_listed_first() {
        let (a, b) = ("127.0.0.1:20195", "127.0.0.1:20412");
        for pair in [[a, b], [b, a]] {
            let ring = Ring::new(&pair);
            assert_eq!(ring.points.len(), 2 * POINTS_PER_SERVER - 1);
            assert!(ring.points.contains(&(849_932_538, 0)));
            assert_eq!(ring.server_of(b"k261"), Some(0), "{pair:?}");
        }
    }

    #[test]
    fn points_are_sorted_deduplicated_and_160_per_server() {
        let ring = Ring::new(&THREE);
        assert_eq!(ring.points.len(), 3 * POINTS_PER_SERVER);
        assert!(ring.points.windows(2).all(|w| w[0].0 < w[1].0));
        for s in 0..3 {
            let n = ring.points.iter().filter(|p| p.1 == s).count();
            assert_eq!(n, POINTS_PER_SERVER);
        }
    }

    #[test]
    fn server_names_split_like_nginx() {
        assert_eq!(split_host_port(b"127.0.0.1:8081"), (&b"127.0.0.1"[..], &b"8081"[..]));
        assert_eq!(split_host_port(b"[::1]:8081"), (&b"[::1]"[..], &b"8081"[..]));
        assert_eq!(split_host_port(b"10.0.0.12"), (&b"10.0.0.12"[..], &b""[..]));
        assert_eq!(split_host_port(b"[::1]"), (&b"[::1]"[..], &b""[..]));
        assert_eq!(
            split_host_port(b"node-2.example:80"),
            (&b"node-2.example"[..], &b"80"[..])
        );
        assert_eq!(split_host_port(b"UNIX:/run/e.sock"), (&b"/run/e.sock"[..], &b""[..]));
    }

    #[test]
    fn wraps_to_the_first_point_and_hash_matches_key() {
        let ring = Ring::new(&THREE);
        let (first_hash, first) = ring.points[0];
        let (last_hash, last) = *ring.points.last().unwrap();
        assert_eq!(ring.server_of_hash(0), Some(first));
        assert_eq!(ring.server_of_hash(first_hash), Some(first));
        assert_eq!(ring.server_of_hash(last_hash), Some(last));
        assert_eq!(ring.server_of_hash(u32::MAX), Some(first)); // no point at u32::MAX here
        for key in ["CS101", "c-4711", "x"] {
            let k = key.as_bytes();
            assert_eq!(ring.server_of(k), ring.server_of_hash(crc32fast::hash(k)));
        }
    }

    #[test]
    fn empty_ring_and_empty_key_have_no_server() {
        let none: [&str; 0] = [];
        assert_eq!(Ring::new(&none).server_of(b"CS101"), None);
        assert_eq!(Ring::new(&none).server_of_hash(7), None);
        assert_eq!(Ring::new(&THREE).server_of(b""), None);
        assert_eq!(Ring::new(&THREE[..1]).server_of(b"CS101"), Some(0));
    }

    /// nginx's walk past a down server, as in ngx_http_upstream_get_chash_peer: from the
    /// key's point on (wrapping), the first point of a live server, within 21 points.
    fn nginx_walk(ring: &Ring, hash: u32, live: &[bool]) -> Option<usize> {
        let start = ring.points.partition_point(|&(p, _)| p < hash);
        (0..NGINX_WALK_POINTS_MAX)
            .map(|i| ring.points[(start + i) % ring.points.len()].1)
            .find(|&s| live[s])
    }

    /// Keys NGINX_3 sent to THREE[1], and the server (index into THREE) real nginx 1.22.1
    /// sent them to with THREE[1] marked `down`.
    const NGINX_3_SECOND_DOWN: &[(&str, usize)] = &[
        ("PHYS44238", 2),
        ("RefIut", 2),
        ("bDUjsAaApaLV", 0),
        ("pI", 2),
        ("MATH32935", 2),
        ("L47HIDcpmw1FB", 2),
        ("dT_6NbC", 2),
        (".9OkHrZyOLX", 0),
    ];

    #[test]
    fn a_ring_of_the_live_servers_picks_what_nginx_picked_with_one_down() {
        let all = Ring::new(&THREE);
        let live = Ring::new(&[THREE[0], THREE[2]]);
        for &(key, server) in NGINX_3_SECOND_DOWN {
            assert_eq!(all.server_of(key.as_bytes()), Some(1), "key {key:?}");
            let picked = live.server_of(key.as_bytes()).map(|i| [0, 2][i]);
            assert_eq!(picked, Some(server), "key {key:?}");
        }
    }

    #[test]
    fn a_ring_of_the_live_servers_picks_what_nginx_picks_with_one_down() {
        let all = Ring::new(&THREE);
        for down in 0..3 {
            let live: Vec<&str> = (0..3).filter(|&s| s != down).map(|s| THREE[s]).collect();
            let live_index: Vec<usize> = (0..3).filter(|&s| s != down).collect();
            let ring = Ring::new(&live);
            let up: Vec<bool> = (0..3).map(|s| s != down).collect();
            let (mut kept, mut moved) = (0, 0);
            for i in 0..20_000u32 {
                let key = format!("c-{i}");
                let hash = crc32fast::hash(key.as_bytes());
                let before = all.server_of_hash(hash).unwrap();
                let after = live_index[ring.server_of_hash(hash).unwrap()];
                assert_eq!(Some(after), nginx_walk(&all, hash, &up), "key {key}");
                if before != down {
                    assert_eq!(after, before, "key {key} moved off a live server");
                    kept += 1;
                } else {
                    moved += 1;
                }
            }
            // Each server owns roughly a third of the keys.
            assert!(
                moved > 4_000 && kept > 10_000,
                "down {down}: {moved} moved, {kept} kept"
            );
        }
    }
}
