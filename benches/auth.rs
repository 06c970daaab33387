//! Benchmark of verifying a fresh bearer token, the first thing every `/v1` request pays.
//!
//! Why: on the 201 path every request comes from a new student, so the per-connection
//! token cache never hits and each request verifies an HS256 token. enrolld verifies the
//! tokens it mints itself (header `{"typ":"JWT","alg":"HS256"}`) on a fast path and every
//! other header with `jsonwebtoken::decode`; this bench measures both in one run. The
//! "other header" case is the same claims under the reordered header
//! `{"alg":"HS256","typ":"JWT"}`, which is exactly what `jsonwebtoken::decode` alone costs.
//!
//! Run: `cargo bench --bench auth` (add `-- --warm-up-time 1 --measurement-time 2` for a
//! quick look).

use std::hint::black_box;

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use enrolld::ids::StudentId;
use enrolld::net::auth::{Auth, Role};

const SECRET: &[u8] = b"bench-secret-of-a-realistic-length-0123456789";

fn bench(c: &mut Criterion) {
    let auth = Auth::new(SECRET);
    let minted = format!(
        "Bearer {}",
        auth.mint(&StudentId::parse("student-000042").unwrap(), Role::Student, 3600)
    );
    // The same claims and key under a header the fast path does not take.
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let token = minted.trim_start_matches("Bearer ");
    let (message, _) = token.rsplit_once('.').unwrap();
    let (_, payload) = message.split_once('.').unwrap();
    let foreign_message = format!("{}.{payload}", b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let sig = b64.encode(ring::hmac::sign(&key, foreign_message.as_bytes()));
    let foreign = format!("Bearer {foreign_message}.{sig}");
    assert!(auth.verify(minted.as_bytes()).is_some() && auth.verify(foreign.as_bytes()).is_some());

    let mut g = c.benchmark_group("verify_fresh_token");
    g.bench_function("minted_header_fast_path", |b| {
        b.iter(|| black_box(auth.verify(black_box(minted.as_bytes()))))
    });
    g.bench_function("other_header_jsonwebtoken", |b| {
        b.iter(|| black_box(auth.verify(black_box(foreign.as_bytes()))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
