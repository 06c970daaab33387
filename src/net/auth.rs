//! JWT authentication (HS256 only, `exp` required).
//!
//! Why: every `/v1` request names its caller by a signed token; the algorithm is pinned so a
//! token cannot pick its own (`alg: none`, HS384, RS256 confusion all fail).
//! Must never: accept a token without `exp`, or trust a `sub` that is not a valid id.
//!
//! Tokens with the header enrolld itself mints (`{"typ":"JWT","alg":"HS256"}`, byte for
//! byte) take a fast path: `ring`'s HMAC with a key prepared once, and the claims parsed
//! once, borrowed. `jsonwebtoken::decode` prepares the HMAC key, parses the header and
//! parses the claims twice per call, which was ~9% of a shard's CPU on the 201 path (every
//! request a new student). Every other header goes through `jsonwebtoken::decode`, and a
//! test holds the fast path to the same verdicts on mutated tokens.

use std::borrow::Cow;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::StudentId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Student,
    Admin,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// A time ticket: no enrollment POST of this student before this instant (unix
    /// seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_from: Option<u64>,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: StudentId,
    pub role: Role,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// The rate-limit profile the token names, if any.
    pub tier: Option<String>,
    /// The time ticket, unix seconds, if any.
    pub enroll_from: Option<u64>,
}

/// The claims exactly as `mint` writes them, borrowed from the decoded payload where they
/// need no unescaping. Any other field (`aud`, `nbf`, `iss`, ...) or shape sends the token
/// to `jsonwebtoken`, whose rules for those the fast path does not repeat.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireClaims<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
    role: Role,
    exp: u64,
    #[serde(default, borrow)]
    tier: Option<Cow<'a, str>>,
    #[serde(default)]
    enroll_from: Option<u64>,
}

/// The longest claims payload (decoded) the fast path reads from a stack buffer; longer
/// ones are decoded into a `Vec`.
const CLAIMS_STACK_BYTES: usize = 512;

/// A connection's last verified token (see [`Auth::verify_cached`]).
#[derive(Default)]
pub struct TokenCache(std::cell::RefCell<Option<(bytes::Bytes, Caller)>>);

pub struct Auth {
    /// The HMAC key, prepared once (the fast path).
    hmac: ring::hmac::Key,
    /// The base64url header segment `mint` writes; tokens that carry exactly it take the
    /// fast path.
    minted_header: String,
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &[u8]) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        let header_json = serde_json::to_vec(&Header::new(Algorithm::HS256)).expect("a header serializes");
        Auth {
            hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            minted_header: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header_json),
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks an `Authorization` header value. `None` for anything but a valid bearer token.
    pub fn verify(&self, authorization: &[u8]) -> Option<Caller> {
        let header = std::str::from_utf8(authorization).ok()?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let (scheme, token) = header.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        let (message, signature) = token.rsplit_once('.')?;
        match message.rsplit_once('.') {
            Some((header, payload)) if header == self.minted_header => {
                self.verify_minted(token, message, payload, signature)
            }
            _ => self.verify_decoded(token),
        }
    }

    /// `jsonwebtoken::decode` with the pinned `Validation`.
    fn verify_decoded(&self, token: &str) -> Option<Caller> {
        let c = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()?
            .claims;
        Some(Caller {
            id: StudentId::parse(&c.sub)?,
            role: c.role,
            exp: c.exp,
            tier: c.tier,
            enroll_from: c.enroll_from,
        })
    }

    /// The fast path, for a token whose header is the one `mint` writes (HS256): the
    /// signature, then claims of exactly `mint`'s shape (`sub`, `role`, `exp`, optional
    /// `tier`, as a JSON object), `exp` not past, as `jsonwebtoken::decode` with this
    /// `Validation` checks them. Validly signed claims of any other shape go to
    /// `verify_decoded`.
    /// `message` is the token up to its last `.`, `payload` and `signature` its last two
    /// segments.
    fn verify_minted(&self, token: &str, message: &str, payload: &str, signature: &str) -> Option<Caller> {
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut mac = [0u8; 32];
        if b64.decode_slice(signature, &mut mac).ok()? != mac.len() {
            return None;
        }
        ring::hmac::verify(&self.hmac, message.as_bytes(), &mac).ok()?;
        let mut stack = [0u8; CLAIMS_STACK_BYTES];
        let heap;
        let json = match b64.decode_slice(payload, &mut stack) {
            Ok(n) => &stack[..n],
            Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                heap = b64.decode(payload).ok()?;
                &heap[..]
            }
            Err(_) => return None,
        };
        // serde would also read the fields from a JSON array; jsonwebtoken would not.
        let object = json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let Some(c) = object
            .then(|| serde_json::from_slice::<WireClaims>(json).ok())
            .flatten()
        else {
            return self.verify_decoded(token);
        };
        let now = crate::ids::now_ms() as u64 / 1000;
        if c.exp < now {
            return None;
        }
        Some(Caller {
            id: StudentId::parse(&c.sub)?,
            role: c.role,
            exp: c.exp,
            tier: c.tier.map(Cow::into_owned),
            enroll_from: c.enroll_from,
        })
    }

    /// Like [`Auth::verify`], but remembers the last good token of a connection: a client
    /// that sends the same `Authorization` again on its keep-alive connection skips the
    /// HMAC. One entry per connection, and never used past the token's `exp`.
    pub fn verify_cached(&self, authorization: &[u8], cache: &TokenCache) -> Option<Caller> {
        let now = crate::ids::now_ms() as u64 / 1000;
        if let Some((bytes, caller)) = &*cache.0.borrow() {
            if bytes.as_ref() == authorization && now < caller.exp {
                return Some(caller.clone());
            }
        }
        let caller = self.verify(authorization)?;
        *cache.0.borrow_mut() = Some((bytes::Bytes::copy_from_slice(authorization), caller.clone()));
        Some(caller)
    }

    /// Mints a token (the `token` subcommand, tests, load generation).
    pub fn mint(&self, sub: &StudentId, role: Role, ttl_secs: u64) -> String {
        self.mint_tier(sub, role, ttl_secs, None)
    }

    /// Mints a token naming a rate-limit profile.
    pub fn mint_tier(&self, sub: &StudentId, role: Role, ttl_secs: u64, tier: Option<&str>) -> String {
        self.mint_ticket(sub, role, ttl_secs, tier, None)
    }

    /// Mints a token with a time ticket (`enroll_from`, unix seconds).
    pub fn mint_ticket(
        &self,
        sub: &StudentId,
        role: Role,
        ttl_secs: u64,
        tier: Option<&str>,
        enroll_from: Option<u64>,
    ) -> String {
        let exp = crate::ids::now_ms() as u64 / 1000 + ttl_secs;
        let claims = Claims {
            sub: sub.to_string(),
            role,
            exp,
            tier: tier.map(str::to_owned),
            enroll_from,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cache_never_trusts_a_different_or_expired_token() {
        let auth = Auth::new(b"secret");
        let cache = TokenCache::default();
        let good = format!(
            "Bearer {}",
            auth.mint(&StudentId::parse("ann").unwrap(), Role::Student, 60)
        );
        assert_eq!(auth.verify_cached(good.as_bytes(), &cache).unwrap().id.as_str(), "ann");
        assert_eq!(auth.verify_cached(good.as_bytes(), &cache).unwrap().id.as_str(), "ann");
        let forged = format!(
            "Bearer {}",
            Auth::new(b"other").mint(&StudentId::parse("ann").unwrap(), Role::Admin, 60)
        );
        assert!(auth.verify_cached(forged.as_bytes(), &cache).is_none());
        // An entry past its exp is not used, even for the same bytes.
        let expired_claims = Claims {
            sub: "ann".into(),
            role: Role::Student,
            exp: 1,
            tier: None,
            enroll_from: None,
        };
        let expired = format!(
            "Bearer {}",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &expired_claims,
                &EncodingKey::from_secret(b"secret")
            )
            .unwrap()
        );
        let mut stale = auth.verify(good.as_bytes()).unwrap();
        stale.exp = 1;
        *cache.0.borrow_mut() = Some((bytes::Bytes::from(expired.clone()), stale));
        assert!(
            auth.verify_cached(expired.as_bytes(), &cache).is_none(),
            "expired tokens are refused"
        );
    }

    fn b64(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    fn check(auth: &Auth, header: &str, ok: bool) {
        assert_eq!(auth.verify(header.as_bytes()).is_some(), ok, "{header}");
    }

    #[test]
    fn tokens() {
        let auth = Auth::new(b"secret");
        let sub = StudentId::parse("alice").unwrap();
        let good = auth.mint(&sub, Role::Student, 60);
        check(&auth, &format!("Bearer {good}"), true);
        check(&auth, &good, false);
        check(&auth, "Bearer ", false);
        check(&auth, "Bearer a.b.c", false);
        let other = Auth::new(b"other").mint(&sub, Role::Student, 60);
        check(&auth, &format!("Bearer {other}"), false);
        let exp = crate::ids::now_ms() / 1000 + 60;
        let body = b64(format!(r#"{{"sub":"alice","role":"student","exp":{exp}}}"#).as_bytes());
        let none = format!("{}.{body}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        check(&auth, &format!("Bearer {none}"), false);
        let noexp = b64(br#"{"sub":"alice","role":"student"}"#);
        let head = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
        let unsigned = format!("{head}.{noexp}");
        let enc = EncodingKey::from_secret(b"secret");
        let sig = jsonwebtoken::crypto::sign(unsigned.as_bytes(), &enc, Algorithm::HS256).unwrap();
        check(&auth, &format!("Bearer {unsigned}.{sig}"), false);
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &Claims {
                sub: "alice".into(),
                role: Role::Student,
                exp: exp as u64,
                tier: None,
                enroll_from: None,
            },
            &enc,
        )
        .unwrap();
        check(&auth, &format!("Bearer {hs384}"), false);
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                role: Role::Student,
                exp: exp as u64 - 3600,
                tier: None,
                enroll_from: None,
            },
            &enc,
        )
        .unwrap();
        check(&auth, &format!("Bearer {expired}"), false);
    }

    /// `jsonwebtoken::decode` alone, the path every non-minted header takes.
    fn reference(auth: &Auth, token: &str) -> Option<(String, Role, u64, Option<String>)> {
        let c = jsonwebtoken::decode::<Claims>(token, &auth.decoding, &auth.validation)
            .ok()?
            .claims;
        StudentId::parse(&c.sub)?;
        Some((c.sub, c.role, c.exp, c.tier))
    }

    fn fast(auth: &Auth, token: &str) -> Option<(String, Role, u64, Option<String>)> {
        let c = auth.verify(format!("Bearer {token}").as_bytes())?;
        Some((c.id.as_str().to_owned(), c.role, c.exp, c.tier))
    }

    #[test]
    fn the_fast_path_agrees_with_jsonwebtoken() {
        let auth = Auth::new(b"secret");
        let head = b64(br#"{"typ":"JWT","alg":"HS256"}"#);
        assert_eq!(
            head, auth.minted_header,
            "the fast path's header is the one mint writes"
        );
        let signed = |claims: &str| {
            let message = format!("{head}.{}", b64(claims.as_bytes()));
            let sig = jsonwebtoken::crypto::sign(
                message.as_bytes(),
                &EncodingKey::from_secret(b"secret"),
                Algorithm::HS256,
            )
            .unwrap();
            format!("{message}.{sig}")
        };
        let now = crate::ids::now_ms() / 1000;
        let later = now + 600;
        let long_tier = "t".repeat(2 * CLAIMS_STACK_BYTES);
        let bodies = [
            format!(r#"{{"sub":"alice","role":"student","exp":{later}}}"#),
            format!(r#"{{"sub":"alice","role":"admin","exp":{later},"tier":"gold"}}"#),
            format!(r#"{{"sub":"al\u0069ce","role":"student","exp":{later}}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"tier":"{long_tier}"}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"extra":[1,{{"a":2}}]}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{}}}"#, now - 1),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"aud":"x"}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":"{later}"}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later}.5}}"#),
            r#"{"sub":"alice","role":"student","exp":-1}"#.to_owned(),
            format!(r#"{{"sub":"alice","role":"root","exp":{later}}}"#),
            format!(r#"{{"sub":"al ice","role":"student","exp":{later}}}"#),
            format!(r#"{{"sub":"","role":"student","exp":{later}}}"#),
            format!(r#"{{"sub":7,"role":"student","exp":{later}}}"#),
            format!(r#"{{"role":"student","exp":{later}}}"#),
            r#"{"sub":"alice","role":"student"}"#.to_owned(),
            format!(r#"{{"sub":"alice","sub":"bob","role":"student","exp":{later}}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later}}} trailing"#),
            format!(r#"[{later}]"#),
            "not json".to_owned(),
            // Shapes serde alone would read differently from jsonwebtoken: they take
            // jsonwebtoken's path, whatever its verdict.
            format!(r#"["alice","student",{later}]"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"aud":5}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"aud":{{}}}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"aud":["a",1]}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"iss":"a","iss":"b"}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"nbf":[1]}}"#),
            format!(r#"{{"sub":"alice","role":"student","exp":{later},"iss":"x"}}"#),
            format!(r#" {{"sub":"alice","role":"student","exp":{later}}}"#),
        ];
        let mut accepted = 0;
        for body in &bodies {
            let token = signed(body);
            let want = reference(&auth, &token);
            assert_eq!(fast(&auth, &token), want, "{body}");
            accepted += usize::from(want.is_some());
            // Every one-character change anywhere in the token, including the header (which
            // moves it to jsonwebtoken's path) and the signature.
            for (i, _) in token.char_indices() {
                for c in ['A', 'z', '-', '_', '.', '=', ' '] {
                    let mut t = token.clone();
                    t.replace_range(i..i + 1, &c.to_string());
                    assert_eq!(fast(&auth, &t), reference(&auth, &t), "{t}");
                }
            }
            for cut in [1, 2, 43] {
                let t = &token[..token.len() - cut];
                assert_eq!(fast(&auth, t), reference(&auth, t), "{t}");
            }
            let padded = format!("{token}=");
            assert_eq!(fast(&auth, &padded), None);
        }
        // The first five, and five of the last eight (an `aud` jsonwebtoken cannot read and
        // ignores, an `iss`, a leading space), through jsonwebtoken.
        assert_eq!(accepted, 10, "valid tokens among the bodies");
        let other = Auth::new(b"other").mint(&StudentId::parse("alice").unwrap(), Role::Student, 60);
        assert!(
            fast(&auth, &other).is_none(),
            "another key's token is refused on the fast path"
        );
        // The fast path is really taken: with jsonwebtoken's key broken, a minted token
        // still passes, and a validly signed token of another shape (which falls back)
        // does not.
        let mut fast_only = Auth::new(b"secret");
        fast_only.decoding = DecodingKey::from_secret(b"broken");
        assert!(
            fast(&fast_only, &signed(&bodies[0])).is_some(),
            "minted shape: fast path"
        );
        assert!(
            fast(&fast_only, &signed(&bodies[4])).is_none(),
            "other shape: jsonwebtoken"
        );
    }
}
