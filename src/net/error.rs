//! The contract's error answers, mapped to HTTP in one place.
//!
//! Why: API.md fixes every non-2xx body as `{"error":"<code>","message":"<text>"}` with a
//! closed set of codes; keeping the enum, status and code together means no handler can
//! invent a new shape.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

/// Seconds a client is told to wait after a 503, or a 429 whose wait is not known.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing, malformed, expired or badly signed token")]
    Unauthorized,
    #[error("this route needs the admin role")]
    Forbidden,
    #[error("{0}")]
    NotFound(&'static str),
    /// `allow`: the path's methods, for the `Allow` header RFC 9110 requires on a 405.
    #[error("method not allowed on this path")]
    MethodNotAllowed { allow: &'static str },
    #[error("no seat left in this course")]
    CourseFull,
    #[error("registration for this course is not open now")]
    RegistrationClosed,
    /// The student's time ticket opens later (the message names when).
    #[error("{0}")]
    TicketNotYet(String),
    #[error("you are not enrolled in this course")]
    NotEnrolled,
    #[error("capacity cannot go below the seats already taken")]
    CapacityBelowEnrolled,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("temporarily unavailable; retry shortly")]
    Unavailable,
    #[error("too many requests; retry shortly")]
    RateLimited { retry_after_secs: u64 },
    /// The outcome of a change is not known in time. net/ cuts the connection for it
    /// rather than answering (see `http::handle`); the body exists for completeness.
    #[error("the outcome is not known; retrying is safe")]
    OutcomeUnknown,
    #[error("the cursor is older than the events kept; start again without `after`")]
    CursorExpired,
    /// A hop to the node that owns the course was cut (502): it may have recorded it.
    #[error("the owning node could not be reached or cut the connection; the outcome is not known; retrying is safe")]
    HopCut,
    /// A hop to the owning node got no answer in time (504).
    #[error("the owning node did not answer in time; the outcome is not known; retrying is safe")]
    HopTimedOut,
}

/// One rendered body per error whose text never varies.
static FIXED_BODIES: [std::sync::OnceLock<&'static [u8]>; FIXED_ERRORS] =
    [const { std::sync::OnceLock::new() }; FIXED_ERRORS];
const FIXED_ERRORS: usize = 15;

impl ApiError {
    /// An index into [`FIXED_BODIES`] for errors whose body never varies.
    fn fixed_index(&self) -> Option<usize> {
        Some(match self {
            ApiError::BadRequest(_) | ApiError::NotFound(_) | ApiError::TicketNotYet(_) => return None,
            ApiError::Unauthorized => 0,
            ApiError::Forbidden => 1,
            ApiError::MethodNotAllowed { .. } => 2,
            ApiError::CourseFull => 3,
            ApiError::RegistrationClosed => 4,
            ApiError::NotEnrolled => 5,
            ApiError::CapacityBelowEnrolled => 6,
            ApiError::PayloadTooLarge => 7,
            ApiError::BodyTimeout => 8,
            ApiError::Unavailable => 9,
            ApiError::RateLimited { .. } => 10,
            ApiError::OutcomeUnknown => 11,
            ApiError::CursorExpired => 12,
            ApiError::HopCut => 13,
            ApiError::HopTimedOut => 14,
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::RegistrationClosed | ApiError::TicketNotYet(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NotEnrolled => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::CourseFull | ApiError::CapacityBelowEnrolled => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::OutcomeUnknown | ApiError::HopTimedOut => StatusCode::GATEWAY_TIMEOUT,
            ApiError::HopCut => StatusCode::BAD_GATEWAY,
            ApiError::CursorExpired => StatusCode::GONE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::MethodNotAllowed { .. } | ApiError::BodyTimeout => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::CourseFull => "course_full",
            ApiError::RegistrationClosed | ApiError::TicketNotYet(_) => "registration_closed",
            ApiError::NotEnrolled => "not_enrolled",
            ApiError::CapacityBelowEnrolled => "capacity_below_enrolled",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable => "unavailable",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::OutcomeUnknown | ApiError::HopCut | ApiError::HopTimedOut => "outcome_unknown",
            ApiError::CursorExpired => "cursor_expired",
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let render = || {
            let body = Body {
                error: self.code(),
                message: &self.to_string(),
            };
            serde_json::to_vec(&body).expect("plain struct")
        };
        // Bodies that never vary are rendered once (the 409 of a rush is the hot one).
        let bytes = match self.fixed_index() {
            Some(i) => Bytes::from_static(FIXED_BODIES[i].get_or_init(|| Box::leak(render().into_boxed_slice()))),
            None => Bytes::from(render()),
        };
        let mut resp = super::http::json(self.status(), bytes);
        let retry_after = match &self {
            // When the next token is due: a polite client does not come back sooner.
            ApiError::RateLimited { retry_after_secs } => Some((*retry_after_secs).max(1)),
            ApiError::Unavailable => Some(RETRY_AFTER_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        if let ApiError::MethodNotAllowed { allow } = &self {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(*allow));
        }
        resp
    }
}
