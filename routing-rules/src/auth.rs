//! Authentication of cell-to-cell calls: every request to another cell's
//! internal listener is signed with HMAC-SHA256 under a secret shared by the
//! cells of one cluster (provisioned as a file, see docs/operations.md).
//!
//! The signature covers the method, the path, the calling cell, a
//! timestamp and a SHA-256 of the body, so a captured request cannot be
//! replayed with another body, for another path or by another cell, and
//! not at all after [`MAX_SKEW_MS`]. (A replay inside that window is
//! harmless: every internal write is idempotent by its transfer id.)

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Header naming the calling cell.
pub const FROM_CELL: &str = "x-cellgate-from-cell";
/// Header with the signing time, unix ms.
pub const TIMESTAMP: &str = "x-cellgate-timestamp-ms";
/// Header with the hex HMAC-SHA256 signature.
pub const SIGNATURE: &str = "x-cellgate-signature";
/// How far a signing time may be from the receiver's clock, ms.
pub const MAX_SKEW_MS: i64 = 300_000;
/// Shortest accepted secret, bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Environment variable that may hold the secret itself.
pub const SECRET_ENV: &str = "CELLGATE_INTERNAL_SECRET";

/// Why a secret could not be loaded or a request was not authenticated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The secret file could not be read.
    #[error("cannot read the internal secret file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The secret is too short to be safe.
    #[error("the internal secret from {source_name} is {len} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. `head -c 32 /dev/urandom | base64`)")]
    TooShort {
        /// Where it came from.
        source_name: String,
        /// Its length.
        len: usize,
    },
    /// A header is missing or malformed.
    #[error("missing or malformed {0} header")]
    Header(&'static str),
    /// The signing time is too far from now.
    #[error("the request was signed {0} ms away from this cell's clock (limit {MAX_SKEW_MS})")]
    Skew(i64),
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
}

/// The cluster's shared secret for cell-to-cell calls.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A secret from bytes (surrounding whitespace is ignored).
    pub fn new(bytes: &[u8], source_name: &str) -> Result<Self, AuthError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(AuthError::TooShort {
                source_name: source_name.to_string(),
                len: trimmed.len(),
            });
        }
        Ok(ClusterSecret(trimmed.to_vec()))
    }

    /// Reads the secret from `path`.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|e| AuthError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::new(&bytes, &path.display().to_string())
    }

    /// The secret from `--internal-secret-file`, else from the
    /// `CELLGATE_INTERNAL_SECRET` environment variable, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, AuthError> {
        if let Some(path) = file {
            return Self::from_file(path).map(Some);
        }
        match std::env::var_os(SECRET_ENV) {
            Some(v) => Self::new(v.as_encoded_bytes(), SECRET_ENV).map(Some),
            None => Ok(None),
        }
    }

    fn mac(
        &self,
        method: &str,
        path: &str,
        from_cell: &str,
        ts_ms: i64,
        body: &[u8],
    ) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        let body_hash = hex::encode(Sha256::digest(body));
        mac.update(
            format!("cellgate-internal-v1\n{method}\n{path}\n{from_cell}\n{ts_ms}\n{body_hash}")
                .as_bytes(),
        );
        mac
    }

    /// The signature headers for a request from `from_cell` at `ts_ms`.
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        from_cell: &str,
        ts_ms: i64,
        body: &[u8],
    ) -> [(&'static str, String); 3] {
        let sig = hex::encode(
            self.mac(method, path, from_cell, ts_ms, body)
                .finalize()
                .into_bytes(),
        );
        [
            (FROM_CELL, from_cell.to_string()),
            (TIMESTAMP, ts_ms.to_string()),
            (SIGNATURE, sig),
        ]
    }

    /// Verifies a request's signature headers; returns the calling cell.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
        body: &[u8],
        now_ms: i64,
    ) -> Result<String, AuthError> {
        let get = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or(AuthError::Header(name))
        };
        let from_cell = get(FROM_CELL)?;
        let ts: i64 = get(TIMESTAMP)?
            .parse()
            .map_err(|_| AuthError::Header(TIMESTAMP))?;
        let sig = hex::decode(get(SIGNATURE)?).map_err(|_| AuthError::Header(SIGNATURE))?;
        let skew = now_ms.saturating_sub(ts);
        if skew.abs() > MAX_SKEW_MS {
            return Err(AuthError::Skew(skew));
        }
        self.mac(method, path, from_cell, ts, body)
            .verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
        Ok(from_cell.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new(&[7u8; 32], "test").unwrap()
    }

    fn headers(signed: &[(&'static str, String); 3]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (n, v) in signed {
            h.insert(*n, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let s = secret();
        let signed = s.sign("POST", "/v1/internal/credits", "cell-a", 1_000, b"{}");
        let h = headers(&signed);
        assert_eq!(
            s.verify("POST", "/v1/internal/credits", &h, b"{}", 1_500),
            Ok("cell-a".to_string())
        );
        for (method, path, body) in [
            ("GET", "/v1/internal/credits", &b"{}"[..]),
            ("POST", "/v1/internal/other", b"{}"),
            ("POST", "/v1/internal/credits", b"{\"amount\":1}"),
        ] {
            assert_eq!(
                s.verify(method, path, &h, body, 1_500),
                Err(AuthError::BadSignature)
            );
        }
        let mut other_cell = h.clone();
        other_cell.insert(FROM_CELL, "cell-z".parse().unwrap());
        assert_eq!(
            s.verify("POST", "/v1/internal/credits", &other_cell, b"{}", 1_500),
            Err(AuthError::BadSignature)
        );
        let other = ClusterSecret::new(&[8u8; 40], "test").unwrap();
        assert_eq!(
            other.verify("POST", "/v1/internal/credits", &h, b"{}", 1_500),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn stale_missing_and_short_inputs_are_refused() {
        let s = secret();
        let signed = s.sign("POST", "/p", "cell-a", 1_000, b"");
        let h = headers(&signed);
        assert!(matches!(
            s.verify("POST", "/p", &h, b"", 1_000 + MAX_SKEW_MS + 1),
            Err(AuthError::Skew(_))
        ));
        assert_eq!(
            s.verify("POST", "/p", &http::HeaderMap::new(), b"", 1_000),
            Err(AuthError::Header(FROM_CELL))
        );
        assert!(matches!(
            ClusterSecret::new(b"  short \n", "x"),
            Err(AuthError::TooShort { len: 5, .. })
        ));
    }
}
