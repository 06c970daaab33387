//! The contract's error answers, mapped to HTTP in one place.
//!
//! Why: API.md fixes every non-2xx body as `{"error":"<code>","message":"<text>"}` with a
//! closed set of codes; keeping the enum, status and code together means no handler can
//! invent a new shape.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

/// Seconds a client is told to wait after a 429 or 503.
pub const RETRY_AFTER_SECS: u32 = 1;

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
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("no seat left in this course")]
    CourseFull,
    #[error("registration for this course is not open now")]
    RegistrationClosed,
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
    RateLimited,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::RegistrationClosed => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NotEnrolled => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::CourseFull | ApiError::CapacityBelowEnrolled => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::MethodNotAllowed | ApiError::BodyTimeout => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::CourseFull => "course_full",
            ApiError::RegistrationClosed => "registration_closed",
            ApiError::NotEnrolled => "not_enrolled",
            ApiError::CapacityBelowEnrolled => "capacity_below_enrolled",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable => "unavailable",
            ApiError::RateLimited => "rate_limited",
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let body = Body {
            error: self.code(),
            message: &self.to_string(),
        };
        let mut resp = super::http::json(self.status(), serde_json::to_vec(&body).expect("plain struct"));
        if matches!(
            self.status(),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            resp.headers_mut().insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        resp
    }
}
