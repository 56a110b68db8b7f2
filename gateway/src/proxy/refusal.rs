//! Answers the gateway gives itself: a status, a code and a message, as
//! JSON.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use routing_rules::KeyProblem;

use super::ProxyBody;

/// A request the gateway answers itself (bad key, overload, upstream
/// failure), with a JSON body `{error, message}`.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// Status.
    pub status: StatusCode,
    /// Short machine-readable code.
    pub error: &'static str,
    /// Human-readable message.
    pub message: &'static str,
    /// Add `retry-after: 1`.
    pub retry_after: bool,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, error: &'static str, message: &'static str) -> Self {
        Refusal {
            status,
            error,
            message,
            retry_after: false,
        }
    }

    /// A 503 with `retry-after`: load shedding, to be retried shortly.
    pub(crate) fn busy(error: &'static str, message: &'static str) -> Self {
        Refusal {
            retry_after: true,
            ..Refusal::new(StatusCode::SERVICE_UNAVAILABLE, error, message)
        }
    }

    pub(crate) fn for_key(problem: KeyProblem) -> Self {
        let (error, message) = match problem {
            KeyProblem::Missing => ("missing_key", "the request carries no routing key"),
            KeyProblem::Malformed => (
                "malformed_key",
                "the routing key is empty, longer than 256 bytes, or has control characters",
            ),
            KeyProblem::NotDigits => (
                "malformed_key",
                "the routing key is not a long enough string of decimal digits",
            ),
        };
        Refusal::new(StatusCode::BAD_REQUEST, error, message)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.error, "message": self.message }).to_string()
    }
}

/// A gateway-made answer as a hyper response.
pub(crate) fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(r.body()))));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
