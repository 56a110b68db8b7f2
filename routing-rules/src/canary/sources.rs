//! What a driver talks to over HTTP: the gateways' `/metrics` (or a
//! Prometheus server's federation endpoint) and the webhooks.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::scrape::Reading;

/// How long one read of a gateway's metrics may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest metrics page read (a gateway's is tens of kilobytes).
const MAX_METRICS_BYTES: usize = 16 * 1024 * 1024;
/// How long a webhook may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// The series a Prometheus server is asked for (`/federate`), URL-encoded:
/// `match[]={__name__=~"cellgate_requests_total|cellgate_request_duration_seconds_bucket|cellgate_rules_revision"}`.
const FEDERATE: &str = "/federate?match%5B%5D=%7B__name__%3D~%22cellgate_requests_total%7Ccellgate_request_duration_seconds_bucket%7Ccellgate_rules_revision%22%7D";

/// Where a cell's counters are read.
#[derive(Debug, Clone)]
pub struct Sources {
    urls: Vec<String>,
    cell: String,
    /// The gateways' admin token (env `CELLGATE_ADMIN_TOKEN`), not sent to
    /// a Prometheus server.
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Checks that `url` is an `http://` URL (the gateways' admin listeners
/// and webhooks speak plain HTTP on the operators' network).
pub fn check_url(url: &str) -> Result<http::Uri> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!("{url:?}: only http://HOST:PORT/... URLs are supported");
    }
    Ok(uri)
}

impl Sources {
    /// The gateways' metrics URLs (each `http://ADMIN/metrics`), or one
    /// Prometheus server (its federation endpoint is read).
    pub fn new(cell: &str, metrics: &[String], prometheus: Option<&str>) -> Result<Self> {
        let urls: Vec<String> = match prometheus {
            Some(p) => vec![format!("{}{FEDERATE}", p.trim_end_matches('/'))],
            None => metrics.to_vec(),
        };
        if urls.is_empty() {
            bail!("no gateway to read: give --metrics URL,... (each gateway's http://ADMIN/metrics) or --prometheus URL");
        }
        for u in &urls {
            check_url(u)?;
        }
        Ok(Sources {
            token: match prometheus {
                Some(_) => None,
                None => std::env::var("CELLGATE_ADMIN_TOKEN").ok(),
            },
            urls,
            cell: cell.to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// How many places are read.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Never empty (see [`Sources::new`]).
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The cell's counters summed over every place; an error names the
    /// places that could not be read.
    pub async fn read(&self) -> Result<Reading> {
        let mut set = tokio::task::JoinSet::new();
        for (i, url) in self.urls.iter().enumerate() {
            let (client, url, token) = (self.client.clone(), url.clone(), self.token.clone());
            set.spawn(async move {
                (
                    i,
                    get(&client, &url, token.as_deref())
                        .await
                        .map_err(|e| format!("{url}: {e:#}")),
                )
            });
        }
        let mut texts = vec![String::new(); self.urls.len()];
        let mut failed = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((i, Ok(t))) => texts[i] = t,
                Ok((_, Err(e))) => failed.push(e),
                Err(e) => failed.push(e.to_string()),
            }
        }
        if !failed.is_empty() {
            bail!("cannot read {}", failed.join("; "));
        }
        let readings: Vec<Reading> = texts
            .iter()
            .map(|t| Reading::parse(t, &self.cell))
            .collect();
        Ok(Reading::sum(&readings))
    }

    /// POSTs `body` (JSON) to `url`; the answer's status.
    pub async fn post(&self, url: &str, body: &serde_json::Value) -> Result<u16> {
        let uri = check_url(url)?;
        let req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = tokio::time::timeout(HOOK_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| anyhow!("no answer within {HOOK_TIMEOUT:?}"))??;
        Ok(resp.status().as_u16())
    }
}

async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    token: Option<&str>,
) -> Result<String> {
    let mut req = http::Request::get(check_url(url)?);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(READ_TIMEOUT, client.request(req))
        .await
        .map_err(|_| anyhow!("no answer within {READ_TIMEOUT:?}"))??;
    let status = resp.status();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_METRICS_BYTES);
    let body = tokio::time::timeout(READ_TIMEOUT, limited.collect())
        .await
        .map_err(|_| anyhow!("the body took longer than {READ_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("{e} (at most {MAX_METRICS_BYTES} bytes are read)"))?
        .to_bytes();
    if !status.is_success() {
        bail!("answered {status}");
    }
    String::from_utf8(body.to_vec()).context("the metrics are not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A "gateway" whose metrics page never ends is read up to the bound,
    /// then refused with a clear error (nothing judged from it).
    #[tokio::test]
    async fn an_endless_metrics_page_is_refused_at_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_METRICS_BYTES * 2
            );
            let _ = s.write_all(head.as_bytes()).await;
            let chunk = vec![b'#'; 64 * 1024];
            for _ in 0..(MAX_METRICS_BYTES * 2 / chunk.len()) {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let sources = Sources::new("cell-a", &[format!("http://{addr}/metrics")], None).unwrap();
        let e = sources.read().await.unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }
}
