//! The RPO check through the cells' own API, before the topology stops:
//! every deposit the client saw acknowledged is in its user's ledger
//! exactly once, as `GET /v1/accounts/USER/ledger` through the gateway
//! shows it (the same check as on the files afterwards, by the path a
//! user would take).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use super::{OpKind, Write};

/// What the ledgers read through the API say.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApiCheck {
    /// Users whose ledger was read.
    pub users: usize,
    /// Ledger entries read.
    pub entries: usize,
    /// Acknowledged deposits missing from their user's ledger.
    pub lost: Vec<String>,
    /// Acknowledged deposits in it more than once.
    pub doubled: Vec<String>,
    /// Users whose ledger could not be read (what answered).
    pub unreadable: Vec<String>,
}

impl ApiCheck {
    /// Nothing lost, doubled or unreadable.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.doubled.is_empty() && self.unreadable.is_empty()
    }
}

/// Largest page the API gives.
const PAGE: u32 = 500;

/// Reads the ledger of every user with an acknowledged deposit through the
/// gateway at `gw` and checks each such deposit is there exactly once.
pub async fn check_through_api(gw: SocketAddr, writes: &[Write]) -> ApiCheck {
    let mut by_user: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in writes
        .iter()
        .filter(|w| w.kind == OpKind::Deposit && w.acked_ms.is_some())
    {
        by_user.entry(&w.user).or_default().push(&w.key);
    }
    let client = crate::http::client();
    let mut out = ApiCheck::default();
    for (user, keys) in by_user {
        let refs = match ledger_refs(&client, gw, user).await {
            Ok(r) => r,
            Err(e) => {
                out.unreadable.push(format!("{user}: {e}"));
                continue;
            }
        };
        out.users += 1;
        out.entries += refs.values().sum::<usize>();
        for key in keys {
            match refs.get(key).copied().unwrap_or(0) {
                0 => out.lost.push(key.to_string()),
                1 => {}
                _ => out.doubled.push(key.to_string()),
            }
        }
    }
    out
}

/// How many times each `ref` appears in `user`'s ledger (every page).
async fn ledger_refs(
    client: &crate::http::HttpClient,
    gw: SocketAddr,
    user: &str,
) -> Result<HashMap<String, usize>, String> {
    let mut refs = HashMap::new();
    let mut before: Option<i64> = None;
    loop {
        let url = match before {
            Some(b) => format!("http://{gw}/v1/accounts/{user}/ledger?limit={PAGE}&before={b}"),
            None => format!("http://{gw}/v1/accounts/{user}/ledger?limit={PAGE}"),
        };
        let page = get_json(client, &url, user).await?;
        for e in page["entries"].as_array().into_iter().flatten() {
            if let Some(r) = e["ref"].as_str() {
                *refs.entry(r.to_string()).or_default() += 1;
            }
        }
        match page["next_before"].as_i64() {
            Some(b) => before = Some(b),
            None => return Ok(refs),
        }
    }
}

/// GET with the user's routing key, retried a few times (a cell may be
/// finishing a failback).
async fn get_json(
    client: &crate::http::HttpClient,
    url: &str,
    user: &str,
) -> Result<serde_json::Value, String> {
    let mut last = String::new();
    for _ in 0..20 {
        let req = http::Request::get(url)
            .header("x-user-id", user)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if status == 200 {
                    return serde_json::from_slice(&body).map_err(|e| e.to_string());
                }
                last = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
