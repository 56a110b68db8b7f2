//! The money holes of issue 10, each tried as an attacker or a client under
//! faults would: forged credits, other users' idempotency keys, bodies that
//! are not JSON, credits the payee's cell refuses, payees that move, sums
//! past 64 bits, early answers on kept-alive connections.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cell_agent::auth::ClusterSecret;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::*;

/// An in-process agent with an internal listener.
async fn agent(dir: &TempDir, cell: &str, rules: &Path) -> cell_agent::RunningAgent {
    let mut cfg = config(cell, "blue", &dir.path(&format!("{cell}.db")), rules);
    cfg.internal_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.internal_secret_file = Some(secret_file(dir));
    cell_agent::start(cfg, prometheus::Registry::new())
        .await
        .unwrap()
}

/// The secret [`secret_file`] writes.
fn secret() -> ClusterSecret {
    ClusterSecret::new(TEST_SECRET.as_bytes(), "test").unwrap()
}

/// POSTs a credit to an internal listener, signed by `signer` with `key`.
async fn signed_credit(
    client: &HttpClient,
    internal: SocketAddr,
    key: Option<&ClusterSecret>,
    signer: &str,
    body: &str,
) -> Reply {
    let mut b = http::Request::post(format!("http://{internal}/v1/internal/credits"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (n, v) in key.sign("POST", "/v1/internal/credits", signer, ts, body.as_bytes()) {
            b = b.header(n, v);
        }
    }
    let resp = client
        .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn wait_rev(client: &HttpClient, addr: SocketAddr, rules: &Path) {
    let want = revision_of(&std::fs::read_to_string(rules).unwrap());
    wait_until(
        "the agent to load the rules",
        Duration::from_secs(5),
        || {
            let client = client.clone();
            async move {
                call(&client, "GET", addr, "/healthz", "", None).await.json["revision"]
                    .as_u64()
                    .unwrap_or(0)
                    >= want
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_credits_are_refused_and_only_a_signed_credit_from_the_payers_cell_lands() {
    let dir = TempDir::new("forged");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules).await;
    let internal = a.internal_addr.unwrap();
    let client = client();
    let payee = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    let payer = users_in(&placeholder_rules(), "cell-c", 1).remove(0);
    let elsewhere = users_in(&placeholder_rules(), "cell-b", 1).remove(0);
    assert_eq!(
        deposit(&client, a.addr, &payee, 1, "open").await.status,
        StatusCode::OK
    );
    let before = snapshot(&dir.path("cell-a.db"));
    let body = |from: &str, from_cell: &str, to: &str, amount: &str| {
        format!(
            r#"{{"transfer_id":"t-x-1","from_cell":"{from_cell}","from":"{from}","to":"{to}","amount":{amount}}}"#
        )
    };
    // 1. The public listener does not serve credits at all.
    let r = call(
        &client,
        "POST",
        a.addr,
        "/v1/internal/credits",
        &payee,
        Some(json!({"transfer_id":"x","from_cell":"cell-z","to": payee,"amount":1_000_000_000})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.json);
    // 2. Unsigned, or signed with another secret: 401.
    let good = body(&payer, "cell-c", &payee, "500");
    let r = signed_credit(&client, internal, None, "cell-c", &good).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
    let wrong = ClusterSecret::new(&[b'w'; 40], "wrong").unwrap();
    let r = signed_credit(&client, internal, Some(&wrong), "cell-c", &good).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
    let key = secret();
    // 3-6. Each refused with its precise answer: (signer, body, status, error).
    let refused = [
        // Signed by one cell, naming another as the payer's cell.
        ("cell-b", good.clone(), 403, "cell_mismatch"),
        // A cell that cannot own the payer.
        (
            "cell-b",
            body(&payer, "cell-b", &payee, "500"),
            403,
            "payer_not_owned",
        ),
        // A payee this cell does not own: 421 naming the owner.
        (
            "cell-c",
            body(&payer, "cell-c", &elsewhere, "500"),
            421,
            "misdirected",
        ),
        // An amount past i64 in exponent form: the documented 422.
        (
            "cell-c",
            body(&payer, "cell-c", &payee, "1e400"),
            422,
            "invalid_amount",
        ),
    ];
    for (signer, b, status, error) in refused {
        let r = signed_credit(&client, internal, Some(&key), signer, &b).await;
        assert_eq!(
            (r.status.as_u16(), r.json["error"].as_str()),
            (status, Some(error)),
            "{b}"
        );
        if status == 421 {
            assert_eq!(r.json["owner_cell"], "cell-b");
        }
    }
    assert_eq!(
        snapshot(&dir.path("cell-a.db")),
        before,
        "no refused credit changed anything"
    );
    // 7. The real thing lands once.
    for duplicate in [false, true] {
        let r = signed_credit(&client, internal, Some(&key), "cell-c", &good).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
        assert_eq!(r.json["duplicate"], duplicate);
    }
    assert_eq!(balance(&client, a.addr, &payee).await, 501);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_belong_to_their_user_and_writes_need_json() {
    let dir = TempDir::new("idem");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules).await;
    let client = client();
    let users = users_in(&placeholder_rules(), "cell-a", 2);
    // Another user's key is neither consumed nor revealed.
    let r = deposit(&client, a.addr, &users[0], 100, "k").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = deposit(&client, a.addr, &users[1], 50, "k").await;
    assert_eq!(
        (r.status, r.json["balance"].as_i64()),
        (StatusCode::OK, Some(50))
    );
    let r = deposit(&client, a.addr, &users[0], 100, "k").await;
    assert_eq!(
        r.json["balance"], 100,
        "a retry is answered from the record"
    );
    let r = deposit(&client, a.addr, &users[0], 7, "k").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Not JSON, or no content type: 415, nothing changed.
    let before = snapshot(&dir.path("cell-a.db"));
    for ct in [Some("text/plain"), None] {
        let mut b = http::Request::post(format!(
            "http://{}/v1/accounts/{}/deposit",
            a.addr, users[0]
        ))
        .header("x-user-id", &users[0]);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        let req = b
            .body(Full::new(Bytes::from_static(
                br#"{"amount": 5, "idempotency_key": "plain"}"#,
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
    }
    for amount in ["1e400", "1.5", "99999999999999999999"] {
        let r = raw_amount(&client, a.addr, &users[0], amount).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{amount}");
    }
    assert_eq!(snapshot(&dir.path("cell-a.db")), before);
    a.shutdown().await;
}

async fn raw_amount(client: &HttpClient, addr: SocketAddr, user: &str, amount: &str) -> Reply {
    let req = http::Request::post(format!("http://{addr}/v1/accounts/{user}/deposit"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"amount": {amount}, "idempotency_key": "raw"}}"#
        ))))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    Reply {
        status: resp.status(),
        headers: resp.headers().clone(),
        json: Value::Null,
    }
}

async fn transfer(
    client: &HttpClient,
    addr: SocketAddr,
    from: &str,
    to: &str,
    amount: i64,
    key: &str,
) -> Reply {
    call(
        client,
        "POST",
        addr,
        "/v1/transfers",
        from,
        Some(json!({"from": from, "to": to, "amount": amount, "idempotency_key": key})),
    )
    .await
}

async fn wait_transfer(
    client: &HttpClient,
    addr: SocketAddr,
    payer: &str,
    id: &str,
    state: &str,
) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        last = call(
            client,
            "GET",
            addr,
            &format!("/v1/transfers/{id}"),
            payer,
            None,
        )
        .await
        .json;
        if last["state"] == state {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("transfer {id} never reached {state}: {last}");
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credits_refund_the_payer_once_and_reconcile_finds_orphans() {
    let dir = TempDir::new("refund");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules).await;
    let c = agent(&dir, "cell-c", &rules).await;
    let real = with_internal(
        &placeholder_rules(),
        &[
            ("cell-a", a.internal_addr.unwrap()),
            ("cell-c", c.internal_addr.unwrap()),
        ],
    );
    std::fs::write(&rules, &real).unwrap();
    let client = client();
    wait_rev(&client, a.addr, &rules).await;
    wait_rev(&client, c.addr, &rules).await;
    let payer = users_in(&real, "cell-a", 1).remove(0);
    let rich = users_in(&real, "cell-c", 2);
    assert_eq!(
        deposit(&client, a.addr, &payer, 1_000, "seed").await.status,
        StatusCode::OK
    );
    // Two balances near i64::MAX: the cell's total no longer fits in 64 bits.
    for u in &rich {
        let r = deposit(&client, c.addr, u, i64::MAX - 10, "max").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
    // The payee's balance would overflow: its cell refuses for good.
    let t = transfer(&client, a.addr, &payer, &rich[0], 100, "too-much").await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.json);
    let id = t.json["id"].as_str().unwrap().to_string();
    let hex = id
        .strip_prefix("t-cell-a-")
        .expect("transfer id names its cell");
    assert!(
        hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "unguessable id: {id}"
    );
    let failed = wait_transfer(&client, a.addr, &payer, &id, "failed").await;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("amount_overflow"),
        "{failed}"
    );
    assert_eq!(balance(&client, a.addr, &payer).await, 1_000, "refunded");
    let ledger = call(
        &client,
        "GET",
        a.addr,
        &format!("/v1/accounts/{payer}/ledger"),
        &payer,
        None,
    )
    .await;
    let refunds: Vec<&Value> = ledger.json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "refund")
        .collect();
    assert_eq!(refunds.len(), 1, "{}", ledger.json);
    assert_eq!(refunds[0]["ref"], format!("transfer:{id}"));
    // A credit that fits is delivered.
    let t2 = transfer(&client, a.addr, &payer, &rich[0], 5, "fits").await;
    let id2 = t2.json["id"].as_str().unwrap().to_string();
    assert_ne!(id, id2);
    wait_transfer(&client, a.addr, &payer, &id2, "delivered").await;
    assert_eq!(balance(&client, c.addr, &rich[0]).await, i64::MAX - 5);
    // Sums in 128 bits: check passes and the metric is not silently 0.
    let rc = check(&dir.path("cell-c.db"));
    assert_eq!(rc.balance_total, 2 * (i64::MAX as i128) - 15);
    check(&dir.path("cell-a.db"));
    let metrics = client
        .request(
            http::Request::get(format!("http://{}/metrics", c.addr))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        metrics
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("cell_balance_total_minor_units "))
        .unwrap();
    let v: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(v > 1.8e19, "{line}");
    // The outbox lists the failed transfer with its reason.
    let (code, out) = cli(&["outbox", "--db", dir.path("cell-a.db").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&id) && out.contains("failed") && out.contains("amount_overflow"),
        "{out}"
    );
    // Reconcile: clean, then a planted orphan credit and a lost credit.
    let (da, dc) = (dir.path("cell-a.db"), dir.path("cell-c.db"));
    let dbs = [
        "reconcile",
        "--db",
        da.to_str().unwrap(),
        "--db",
        dc.to_str().unwrap(),
    ];
    let (code, out) = cli(&dbs);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 credits matched") && out.contains("1 refunded"),
        "{out}"
    );
    a.shutdown().await;
    c.shutdown().await;
    let conn = rusqlite::Connection::open(&dc).unwrap();
    conn.execute(
        "INSERT INTO inbox (transfer_id, from_cell, from_user, to_user, amount, created_ms) VALUES ('t-cell-a-forged', 'cell-a', ?1, ?2, 1000000000, 0)",
        [&payer, &rich[1]],
    )
    .unwrap();
    let (code, out) = cli(&dbs);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("orphan credit t-cell-a-forged"), "{out}");
    conn.execute("DELETE FROM inbox WHERE transfer_id = ?1", [&id2])
        .unwrap();
    let (code, out) = cli(&dbs);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "transfer {id2} of cell cell-a is marked delivered but no cell given holds its credit"
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_follows_its_payee_to_the_new_owner() {
    let dir = TempDir::new("follow");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules).await;
    let b = agent(&dir, "cell-b", &rules).await;
    let internal = [
        ("cell-a", a.internal_addr.unwrap()),
        ("cell-b", b.internal_addr.unwrap()),
        // cell-c has no running agent: its address refuses connections.
        ("cell-c", "127.0.0.1:19".parse().unwrap()),
    ];
    let before = with_internal(&placeholder_rules(), &internal);
    std::fs::write(&rules, &before).unwrap();
    let client = client();
    wait_rev(&client, a.addr, &rules).await;
    let payer = users_in(&before, "cell-a", 1).remove(0);
    let payee = users_in(&before, "cell-c", 1).remove(0);
    deposit(&client, a.addr, &payer, 100, "seed").await;
    let t = transfer(&client, a.addr, &payer, &payee, 30, "t").await;
    assert_eq!(t.json["to_cell"], "cell-c");
    let id = t.json["id"].as_str().unwrap().to_string();
    // cell-c is gone; its slots move to cell-b at a new epoch.
    let moved = with_internal(
        &rules_text_with_ranges("[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n[[ranges]]\nfrom = 33\nto = 65\ncell = \"cell-b\"\n[[ranges]]\nfrom = 66\nto = 99\ncell = \"cell-b\"\nepoch = 2\n"),
        &internal,
    );
    std::fs::write(&rules, &moved).unwrap();
    wait_rev(&client, b.addr, &rules).await;
    // The slots have not been handed over: cell-b refuses the credit
    // (retryable), and the transfer stays pending, nothing credited.
    let pending = wait_outbox_error(&dir.path("cell-a.db"), &id, "slot_not_open").await;
    assert_eq!(pending["state"], "pending", "{pending}");
    let none = call(
        &client,
        "GET",
        b.addr,
        &format!("/v1/accounts/{payee}"),
        &payee,
        None,
    )
    .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND, "{}", none.json);
    // Hand-over: cell-b's store opens the slots at epoch 2.
    let (code, out) = cli(&[
        "slots",
        "open",
        "--db",
        dir.path("cell-b.db").to_str().unwrap(),
        "--slots",
        "66-99",
        "--epoch",
        "2",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(r#""opened":[66,99]"#), "{out}");
    wait_transfer(&client, a.addr, &payer, &id, "delivered").await;
    assert_eq!(balance(&client, b.addr, &payee).await, 30);
    let (code, out) = cli(&[
        "slots",
        "list",
        "--db",
        dir.path("cell-b.db").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("slots 33-65: open at epoch 1"), "{out}");
    assert!(out.contains("slots 66-99: open at epoch 2"), "{out}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The payee's cell answers 403 `cell_mismatch` while its rules do not see
/// the payer's cell as the host of the payer's shard (the shard is moving
/// and the two cells' rules disagree for a moment). That is no refusal of
/// the credit: refunding then would pay twice if an earlier attempt had
/// landed (the cell-loss drill found exactly that). The transfer stays
/// pending and is delivered once the rules agree; the payer is not refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_refused_as_cell_mismatch_is_retried_not_refunded() {
    let dir = TempDir::new("mismatch");
    let (rules_a, rules_b) = (dir.path("rules-a.toml"), dir.path("rules-b.toml"));
    std::fs::write(&rules_a, placeholder_rules()).unwrap();
    std::fs::write(&rules_b, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules_a).await;
    let b = agent(&dir, "cell-b", &rules_b).await;
    let internal = [
        ("cell-a", a.internal_addr.unwrap()),
        ("cell-b", b.internal_addr.unwrap()),
    ];
    let agreed = with_internal(&placeholder_rules(), &internal);
    // cell-b's rules say cell-a's shard is hosted by cell-c.
    let moved = with_internal(&placeholder_rules(), &internal).replace(
        "[cells.cell-a]\n",
        "[cells.cell-a]\nhosted_by = \"cell-c\"\n",
    );
    std::fs::write(&rules_a, &agreed).unwrap();
    std::fs::write(&rules_b, &moved).unwrap();
    let client = client();
    wait_rev(&client, a.addr, &rules_a).await;
    wait_rev(&client, b.addr, &rules_b).await;
    let payer = users_in(&agreed, "cell-a", 1).remove(0);
    let payee = users_in(&agreed, "cell-b", 1).remove(0);
    deposit(&client, a.addr, &payer, 100, "seed").await;
    let t = transfer(&client, a.addr, &payer, &payee, 30, "t").await;
    assert_eq!(t.json["to_cell"], "cell-b", "{}", t.json);
    let id = t.json["id"].as_str().unwrap().to_string();
    let pending = wait_outbox_error(&dir.path("cell-a.db"), &id, "cell_mismatch").await;
    assert_eq!(pending["state"], "pending", "{pending}");
    assert_eq!(balance(&client, a.addr, &payer).await, 70, "not refunded");
    // The rules agree again: delivered, once; the payer stays debited.
    let agreed_now = with_internal(&placeholder_rules(), &internal);
    std::fs::write(&rules_b, &agreed_now).unwrap();
    wait_rev(&client, b.addr, &rules_b).await;
    wait_transfer(&client, a.addr, &payer, &id, "delivered").await;
    assert_eq!(balance(&client, b.addr, &payee).await, 30);
    assert_eq!(balance(&client, a.addr, &payer).await, 70);
    a.shutdown().await;
    b.shutdown().await;
}

/// Waits until the outbox of `db` shows the transfer's last delivery
/// error mentioning `code`; returns its record.
async fn wait_outbox_error(db: &std::path::Path, id: &str, code: &str) -> Value {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let (status, out) = cli(&["outbox", "--db", db.to_str().unwrap(), "--json"]);
        assert_eq!(status, 0, "{out}");
        for line in out.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            if v["transfer_id"] == id && v["last_error"].as_str().is_some_and(|e| e.contains(code))
            {
                return v;
            }
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("transfer {id} never failed with {code}: {last}");
}

fn rules_text_with_ranges(ranges: &str) -> String {
    rules(
        &[
            ("cell-a", "127.0.0.1:9".into(), "127.0.0.1:10".into()),
            ("cell-b", "127.0.0.1:11".into(), "127.0.0.1:12".into()),
            ("cell-c", "127.0.0.1:13".into(), "127.0.0.1:14".into()),
        ],
        Some(ranges),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_to_posts_keep_the_connection_usable() {
    let dir = TempDir::new("keepalive");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let a = agent(&dir, "cell-a", &rules).await;
    let mine = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    let other = users_in(&placeholder_rules(), "cell-b", 1).remove(0);
    // One HTTP/1.1 connection for every request.
    let stream = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = Bytes::from(json!({"amount": 1, "idempotency_key": "x"}).to_string());
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..300 {
        let user = if i % 3 == 0 { &mine } else { &other };
        let req = http::Request::post(format!("/v1/accounts/{user}/deposit"))
            .header("host", "cell")
            .header("x-user-id", user.as_str())
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        send.ready().await.expect("the connection stays open");
        let resp = send
            .send_request(req)
            .await
            .expect("an answer on the same connection");
        let _ = resp.into_body().collect().await.unwrap();
        *statuses.entry(i % 3 == 0).or_insert(0) += 1;
    }
    assert_eq!(statuses.values().sum::<i32>(), 300);
    a.shutdown().await;
}

fn count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_pruned_after_the_retention_without_breaking_exactly_once() {
    let dir = TempDir::new("prune");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let start = |cell: &'static str| {
        let mut cfg = config(cell, "blue", &dir.path(&format!("{cell}.db")), &rules);
        cfg.internal_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.internal_secret_file = Some(secret_file(&dir));
        cfg.idempotency_retention = Duration::from_secs(1);
        cfg.prune_interval_ms = 50;
        cell_agent::start(cfg, prometheus::Registry::new())
    };
    let a = start("cell-a").await.unwrap();
    let c = start("cell-c").await.unwrap();
    let real = with_internal(
        &placeholder_rules(),
        &[
            ("cell-a", a.internal_addr.unwrap()),
            ("cell-c", c.internal_addr.unwrap()),
        ],
    );
    std::fs::write(&rules, &real).unwrap();
    let client = client();
    wait_rev(&client, a.addr, &rules).await;
    wait_rev(&client, c.addr, &rules).await;
    let payer = users_in(&real, "cell-a", 1).remove(0);
    let payee = users_in(&real, "cell-c", 1).remove(0);
    let (da, dc) = (dir.path("cell-a.db"), dir.path("cell-c.db"));
    deposit(&client, a.addr, &payer, 100, "seed").await;
    let t1 = transfer(&client, a.addr, &payer, &payee, 10, "t1").await;
    let id1 = t1.json["id"].as_str().unwrap().to_string();
    wait_transfer(&client, a.addr, &payer, &id1, "delivered").await;
    // Past the retention: the sender's idempotency and closed outbox
    // records go; the payee keeps the credit (its sender has not yet said
    // that everything before it is settled).
    wait_until(
        "the sender's records to be pruned",
        Duration::from_secs(10),
        || {
            let da = da.clone();
            async move {
                count(&da, "SELECT COUNT(*) FROM idempotency") == 0
                    && count(&da, "SELECT COUNT(*) FROM outbox") == 0
            }
        },
    )
    .await;
    assert_eq!(
        count(&dc, "SELECT COUNT(*) FROM inbox"),
        1,
        "no watermark past it yet"
    );
    // A retry older than the retention is a new request (documented).
    let again = deposit(&client, a.addr, &payer, 100, "seed").await;
    assert_eq!(again.json["balance"], 190);
    // A later transfer's credit carries a watermark past the first one:
    // the payee may now forget it, and keeps the new one.
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the fault here is time itself
    let t2 = transfer(&client, a.addr, &payer, &payee, 5, "t2").await;
    let id2 = t2.json["id"].as_str().unwrap().to_string();
    wait_transfer(&client, a.addr, &payer, &id2, "delivered").await;
    wait_until(
        "the payee to prune the settled credit",
        Duration::from_secs(10),
        || {
            let dc = dc.clone();
            let id1 = id1.clone();
            async move {
                count(
                    &dc,
                    &format!("SELECT COUNT(*) FROM inbox WHERE transfer_id = '{id1}'"),
                ) == 0
            }
        },
    )
    .await;
    assert_eq!(
        count(
            &dc,
            &format!("SELECT COUNT(*) FROM inbox WHERE transfer_id = '{id2}'")
        ),
        1,
        "the newest credit stays: its sender has not settled past it"
    );
    a.shutdown().await;
    c.shutdown().await;
    assert_eq!(check(&da).balance_total + check(&dc).balance_total, 200);
    let (code, out) = cli(&[
        "reconcile",
        "--db",
        da.to_str().unwrap(),
        "--db",
        dc.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "pruned records are not orphans: {out}");
}
