//! JSON request bodies: the media type, the size limit, unknown fields, and
//! amounts read from their literal text, so that `1e400`, `1.5` or
//! `99999999999999999999` get the same precise 422 as every other amount a
//! cell cannot take (a float never stands in for money).

use bytes::Bytes;
use http::{header, HeaderMap};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::store::DomainError;

/// Largest request body accepted, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Refuses a write whose body is not declared `application/json`
/// (415, nothing changed).
pub fn require_json(headers: &HeaderMap) -> Result<(), DomainError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(DomainError::new(
        415,
        "unsupported_media_type",
        if ct.is_empty() {
            "writes need content-type: application/json (none given)".to_string()
        } else {
            format!("writes need content-type: application/json, not {ct:?}")
        },
    ))
}

/// A parsed JSON object body whose values keep their literal text.
#[derive(Debug)]
pub struct JsonBody(Map<String, Value>, Vec<(String, Box<RawValue>)>);

impl JsonBody {
    /// Parses `bytes` as one JSON object.
    pub fn parse(bytes: &Bytes) -> Result<Self, DomainError> {
        let raw: Vec<(String, Box<RawValue>)> = match serde_json::from_slice::<
            std::collections::BTreeMap<String, Box<RawValue>>,
        >(bytes)
        {
            Ok(m) => m.into_iter().collect(),
            Err(e) => {
                // Tell "valid JSON but not an object" from malformed JSON.
                return Err(match serde_json::from_slice::<&RawValue>(bytes) {
                    Ok(_) => DomainError::bad_request("the body must be a JSON object"),
                    Err(_) => DomainError::bad_request(format!("malformed JSON: {e}")),
                });
            }
        };
        let mut values = Map::new();
        for (k, v) in &raw {
            // An unparseable number (e.g. 1e400) stays raw; only `amount`
            // may hold a number, and it is read from the raw text.
            if let Ok(parsed) = serde_json::from_str::<Value>(v.get()) {
                values.insert(k.clone(), parsed);
            }
        }
        Ok(JsonBody(values, raw))
    }

    /// Refuses fields outside `allowed`.
    pub fn known_fields(&self, allowed: &[&str]) -> Result<(), DomainError> {
        if let Some((k, _)) = self.1.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(DomainError::bad_request(format!(
                "unknown field {k:?} (expected: {})",
                allowed.join(", ")
            )));
        }
        Ok(())
    }

    /// A required non-empty string field.
    pub fn str(&self, name: &str) -> Result<String, DomainError> {
        match self.0.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(DomainError::bad_request(format!(
                "{name} must not be empty"
            ))),
            None if !self.has(name) => {
                Err(DomainError::bad_request(format!("missing field {name}")))
            }
            _ => Err(DomainError::bad_request(format!("{name} must be a string"))),
        }
    }

    /// An optional non-negative integer field (0 when absent).
    pub fn opt_ms(&self, name: &str) -> Result<i64, DomainError> {
        match self.0.get(name) {
            None if !self.has(name) => Ok(0),
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v >= 0) => {
                Ok(n.as_i64().unwrap_or(0))
            }
            _ => Err(DomainError::bad_request(format!(
                "{name} must be a non-negative integer (unix ms)"
            ))),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.1.iter().any(|(k, _)| k == name)
    }

    /// `amount`: an integer number of minor units in 1..=i64::MAX, read
    /// from its literal text.
    pub fn amount(&self) -> Result<i64, DomainError> {
        let Some((_, raw)) = self.1.iter().find(|(k, _)| k == "amount") else {
            return Err(DomainError::bad_request("missing field amount"));
        };
        parse_amount(raw.get())
    }
}

/// An amount from its JSON literal.
pub fn parse_amount(literal: &str) -> Result<i64, DomainError> {
    let invalid = |m: String| DomainError::unprocessable("invalid_amount", m);
    let t = literal.trim();
    let is_number = t.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !is_number {
        return Err(invalid(
            "amount must be a JSON integer of minor units".into(),
        ));
    }
    if t.contains(['.', 'e', 'E']) {
        return Err(invalid(format!(
            "amount must be an integer number of minor units (no fractions or exponents), got {t}"
        )));
    }
    match t.parse::<i64>() {
        Ok(a) if a > 0 => Ok(a),
        Ok(a) => Err(invalid(format!(
            "amount must be a positive number of minor units, got {a}"
        ))),
        Err(_) if t.starts_with('-') => Err(invalid(format!(
            "amount must be a positive number of minor units, got {t}"
        ))),
        Err(_) => Err(DomainError::unprocessable(
            "amount_overflow",
            "amount does not fit in a signed 64-bit number of minor units",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_integers_of_minor_units_or_a_precise_422() {
        assert_eq!(parse_amount("1250"), Ok(1250));
        assert_eq!(parse_amount(&i64::MAX.to_string()), Ok(i64::MAX));
        for (lit, code) in [
            ("0", "invalid_amount"),
            ("-5", "invalid_amount"),
            ("1.5", "invalid_amount"),
            ("1e400", "invalid_amount"),
            ("1E2", "invalid_amount"),
            ("-1e400", "invalid_amount"),
            ("\"5\"", "invalid_amount"),
            ("null", "invalid_amount"),
            ("9223372036854775808", "amount_overflow"),
            ("-99999999999999999999", "invalid_amount"),
        ] {
            let e = parse_amount(lit).unwrap_err();
            assert_eq!((e.status, e.code), (422, code), "{lit}");
        }
    }

    #[test]
    fn only_json_objects_with_known_fields_pass() {
        let b = JsonBody::parse(&Bytes::from_static(br#"{"amount": 1e400, "k": "v"}"#)).unwrap();
        assert_eq!(b.amount().unwrap_err().status, 422);
        assert_eq!(b.str("k").unwrap(), "v");
        assert!(b.known_fields(&["amount"]).is_err());
        assert!(b.str("missing").unwrap_err().message.contains("missing"));
        let e = JsonBody::parse(&Bytes::from_static(b"[1]")).unwrap_err();
        assert!(e.message.contains("JSON object"), "{e}");
        let e = JsonBody::parse(&Bytes::from_static(b"{")).unwrap_err();
        assert!(e.message.contains("malformed"), "{e}");
        let e = JsonBody::parse(&Bytes::from_static(br#"{"a":1,"a":2}"#));
        assert!(e.is_ok() || e.unwrap_err().status == 400);
    }

    #[test]
    fn only_application_json_is_taken() {
        let mut h = HeaderMap::new();
        assert_eq!(require_json(&h).unwrap_err().status, 415);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(require_json(&h).unwrap_err().status, 415);
        h.insert(
            header::CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(require_json(&h).is_ok());
    }
}
