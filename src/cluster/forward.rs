//! Passing a request to the node that owns its course (one hop).
//!
//! Why: any node answers any request (API.md, "Several nodes"), but only the owner may
//! decide. A node that does not own a course sends the request on over a kept-alive
//! connection to the owner's advertised address, with the request id and the caller's
//! token, waits a bounded time, and hands the owner's answer back as it is. The owner
//! authenticates and limits it as any request.
//! Must never: pass a request on twice (a request marked as a hop that reaches a node
//! which does not own its course is refused, never sent on), or turn a hop that got no
//! answer into a 503: the owner may have recorded it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Marks a request passed on by another node; its value is the sender's node id.
pub const X_ENROLLD_HOP: HeaderName = HeaderName::from_static("x-enrolld-hop");
/// The node that decided (or, for a cached read, served) a response.
pub const X_ENROLLD_NODE: HeaderName = HeaderName::from_static("x-enrolld-node");

/// Request headers passed to the owner.
const PASSED_ON: [&str; 6] = [
    "authorization",
    "content-type",
    "x-request-id",
    "x-forwarded-for",
    "x-real-ip",
    "user-agent",
];
/// Response headers passed back from the owner.
const PASSED_BACK: [&str; 4] = ["content-type", "retry-after", "allow", "x-enrolld-node"];
/// Idle kept-alive connections to each other node, per shard.
const IDLE_CONNECTIONS_PER_NODE_MAX: usize = 64;
/// Longest wait for a connection to another node.
const CONNECT_TIMEOUT_MS_MAX: u64 = 1_000;
/// The most of an owner's answer body that is passed back.
const ANSWER_BYTES_MAX: usize = 16 << 20;

/// Why a hop got no answer. Either way the owner may have recorded the change.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    /// No connection could be made: nothing was sent, so nothing was recorded (the
    /// owner is down; the caller waits for a takeover).
    #[error("the owning node {0} refused or did not accept a connection")]
    Unreachable(String),
    /// The connection failed or was cut (502).
    #[error("the owning node {0} could not be reached or cut the connection")]
    Cut(String),
    /// No answer within the bound (504).
    #[error("the owning node {0} did not answer in time")]
    TimedOut(String),
}

/// One shard's client to the other nodes.
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
    wait: Duration,
    node: HeaderValue,
}

impl Forwarder {
    /// `wait`: the longest a hop waits for the owner's answer.
    pub fn new(node_id: &str, wait: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Shorter than the wait for an answer: a host that drops the SYN is found
        // unreachable (nothing sent, the request waits for a takeover), not timed out.
        connector.set_connect_timeout(Some((wait / 4).min(Duration::from_millis(CONNECT_TIMEOUT_MS_MAX))));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_NODE_MAX)
            .build(connector);
        Forwarder {
            client,
            wait,
            node: HeaderValue::from_str(node_id).expect("node ids are validated"),
        }
    }

    /// Sends the request to `advertise` and returns the owner's answer.
    pub async fn forward(
        &self,
        advertise: &str,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        request_id: &HeaderValue,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, HopError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{advertise}{path_and_query}"));
        let out = req.headers_mut().expect("a fresh builder");
        for name in PASSED_ON {
            for v in headers.get_all(name) {
                out.append(name, v.clone());
            }
        }
        out.insert("x-request-id", request_id.clone());
        out.insert(X_ENROLLD_HOP, self.node.clone());
        let req = req
            .body(Full::new(body))
            .map_err(|_| HopError::Cut(advertise.to_string()))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    HopError::Unreachable(advertise.to_string())
                } else {
                    HopError::Cut(advertise.to_string())
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, ANSWER_BYTES_MAX)
                .collect()
                .await
                .map_err(|_| HopError::Cut(advertise.to_string()))?
                .to_bytes();
            let mut answer = Response::new(Full::new(body));
            *answer.status_mut() = parts.status;
            for name in PASSED_BACK {
                for v in parts.headers.get_all(name) {
                    answer.headers_mut().append(name, v.clone());
                }
            }
            Ok(answer)
        };
        tokio::time::timeout(self.wait, call)
            .await
            .map_err(|_| HopError::TimedOut(advertise.to_string()))?
    }
}
