//! JWT authentication (HS256 only, `exp` required).
//!
//! Why: every `/v1` request names its caller by a signed token; the algorithm is pinned so a
//! token cannot pick its own (`alg: none`, HS384, RS256 confusion all fail).
//! Must never: accept a token without `exp`, or trust a `sub` that is not a valid id.

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
}

/// A connection's last verified token (see [`Auth::verify_cached`]).
#[derive(Default)]
pub struct TokenCache(std::cell::RefCell<Option<(bytes::Bytes, Caller)>>);

pub struct Auth {
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
        Auth {
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        let c = data.claims;
        Some(Caller {
            id: StudentId::parse(&c.sub)?,
            role: c.role,
            exp: c.exp,
            tier: c.tier,
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
        let exp = crate::ids::now_ms() as u64 / 1000 + ttl_secs;
        let claims = Claims {
            sub: sub.to_string(),
            role,
            exp,
            tier: tier.map(str::to_owned),
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
            },
            &enc,
        )
        .unwrap();
        check(&auth, &format!("Bearer {expired}"), false);
    }
}
