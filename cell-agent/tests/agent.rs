//! The cell agent over real SQLite files and real HTTP.

mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::*;

async fn start_in_process(dir: &TempDir, cell: &str, colour: &str) -> cell_agent::RunningAgent {
    let rules = dir.path("rules.toml");
    if !rules.exists() {
        std::fs::write(&rules, placeholder_rules()).unwrap();
    }
    let db = dir.path(&format!("{cell}.db"));
    cell_agent::start(
        config(cell, colour, &db, &rules),
        prometheus::Registry::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_colours_in_two_processes_never_overdraw_lose_or_double() {
    let dir = TempDir::new("colours");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let db = dir.path("cell-a.db");
    let args = |colour: &str| -> Vec<String> {
        [
            "--cell",
            "cell-a",
            "--colour",
            colour,
            "--db",
            db.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let blue = AgentProcess::start(&args("blue"), "127.0.0.1:0");
    let green = AgentProcess::start(&args("green"), "127.0.0.1:0");
    let client = client();
    let users = users_in(&placeholder_rules(), "cell-a", 4);
    let payer = users[0].clone();

    // 400 concurrent deposits with distinct keys, alternating colours:
    // every one lands exactly once.
    let mut tasks = Vec::new();
    for i in 0..400 {
        let (client, addr, user) = (
            client.clone(),
            if i % 2 == 0 { blue.addr } else { green.addr },
            users[1].clone(),
        );
        tasks.push(tokio::spawn(async move {
            deposit(&client, addr, &user, 7, &format!("dep-{i}"))
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(balance(&client, blue.addr, &users[1]).await, 2800);
    assert_eq!(balance(&client, green.addr, &users[1]).await, 2800);

    // 5,000 on the payer's account, 100 orders of 100 paid concurrently
    // through both colours: exactly 50 succeed, nobody overdraws.
    assert_eq!(
        deposit(&client, blue.addr, &payer, 5_000, "seed")
            .await
            .status,
        StatusCode::OK
    );
    let mut ids = Vec::new();
    for i in 0..100 {
        let r = call(&client, "POST", green.addr, "/v1/orders", &payer,
            Some(json!({"user": payer, "amount": 100, "merchant": "m", "idempotency_key": format!("ord-{i}")}))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        ids.push(r.json["id"].as_str().unwrap().to_string());
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (client, addr, payer, id) = (
            client.clone(),
            if i % 2 == 0 { blue.addr } else { green.addr },
            payer.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            call(
                &client,
                "POST",
                addr,
                &format!("/v1/orders/{id}/pay"),
                &payer,
                None,
            )
            .await
        }));
    }
    let (mut paid, mut refused) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => paid += 1,
            StatusCode::CONFLICT => {
                assert_eq!(r.json["error"], "insufficient_funds");
                refused += 1
            }
            s => panic!("unexpected {s}: {}", r.json),
        }
    }
    assert_eq!((paid, refused), (50, 50));
    assert_eq!(balance(&client, blue.addr, &payer).await, 0);
    let report = check(&db);
    assert_eq!(report.balance_total, 2800);
    // Responses name who served them.
    let r = call(
        &client,
        "GET",
        green.addr,
        &format!("/v1/accounts/{payer}"),
        &payer,
        None,
    )
    .await;
    assert_eq!(r.headers["x-cell"], "cell-a");
    assert_eq!(r.headers["x-colour"], "green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_never_move_money_twice() {
    let dir = TempDir::new("idem");
    let agent = start_in_process(&dir, "cell-a", "blue").await;
    let client = client();
    let user = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    let first = deposit(&client, agent.addr, &user, 500, "k1").await;
    assert_eq!(first.status, StatusCode::OK);
    // Concurrent retries of the same request.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, addr, user) = (client.clone(), agent.addr, user.clone());
        tasks.push(tokio::spawn(async move {
            deposit(&client, addr, &user, 500, "k1").await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json, first.json,
            "a retry must return the original result"
        );
    }
    assert_eq!(balance(&client, agent.addr, &user).await, 500);
    // Same key, different body.
    let r = deposit(&client, agent.addr, &user, 501, "k1").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.json["error"], "idempotency_conflict");
    // Orders and transfers too.
    let order = |key: &str, amount: i64| json!({"user": user, "amount": amount, "merchant": "m", "idempotency_key": key});
    let o1 = call(
        &client,
        "POST",
        agent.addr,
        "/v1/orders",
        &user,
        Some(order("o", 100)),
    )
    .await;
    let o2 = call(
        &client,
        "POST",
        agent.addr,
        "/v1/orders",
        &user,
        Some(order("o", 100)),
    )
    .await;
    assert_eq!(o1.json["id"], o2.json["id"]);
    assert_eq!(
        call(
            &client,
            "POST",
            agent.addr,
            "/v1/orders",
            &user,
            Some(order("o", 101))
        )
        .await
        .status,
        StatusCode::CONFLICT
    );
    let id = o1.json["id"].as_str().unwrap();
    for _ in 0..3 {
        let r = call(
            &client,
            "POST",
            agent.addr,
            &format!("/v1/orders/{id}/pay"),
            &user,
            None,
        )
        .await;
        assert_eq!(
            (r.status, r.json["state"].as_str()),
            (StatusCode::OK, Some("paid"))
        );
    }
    assert_eq!(balance(&client, agent.addr, &user).await, 400);
    let others = users_in(&placeholder_rules(), "cell-a", 2);
    let payee = &others[1];
    let tr = json!({"from": user, "to": payee, "amount": 50, "idempotency_key": "t"});
    let t1 = call(
        &client,
        "POST",
        agent.addr,
        "/v1/transfers",
        &user,
        Some(tr.clone()),
    )
    .await;
    let t2 = call(
        &client,
        "POST",
        agent.addr,
        "/v1/transfers",
        &user,
        Some(tr),
    )
    .await;
    assert_eq!(t1.status, StatusCode::CREATED);
    assert_eq!(t1.json, t2.json);
    assert_eq!(t1.json["state"], "completed");
    assert_eq!(balance(&client, agent.addr, &user).await, 350);
    assert_eq!(balance(&client, agent.addr, payee).await, 50);
    assert!(agent.shutdown().await, "drained cleanly");
    // After a restart the same keys still return the original results.
    let agent = start_in_process(&dir, "cell-a", "green").await;
    let again = deposit(&client, agent.addr, &user, 500, "k1").await;
    assert_eq!((again.status, &again.json), (StatusCode::OK, &first.json));
    assert_eq!(balance(&client, agent.addr, &user).await, 350);
    agent.shutdown().await;
    check(&dir.path("cell-a.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_confirm_cancel_follow_the_state_machine() {
    let dir = TempDir::new("tcc");
    let agent = start_in_process(&dir, "cell-a", "blue").await;
    let client = client();
    let user = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    deposit(&client, agent.addr, &user, 1000, "d").await;
    let new_order = |k: &'static str| {
        let (client, user) = (client.clone(), user.clone());
        async move {
            let r = call(
                &client,
                "POST",
                agent.addr,
                "/v1/orders",
                &user,
                Some(json!({"user": user, "amount": 300, "merchant": "m", "idempotency_key": k})),
            )
            .await;
            r.json["id"].as_str().unwrap().to_string()
        }
    };
    let act = |id: String, a: &'static str| {
        let (client, user) = (client.clone(), user.clone());
        async move {
            call(
                &client,
                "POST",
                agent.addr,
                &format!("/v1/orders/{id}/{a}"),
                &user,
                None,
            )
            .await
        }
    };
    let a = new_order("a").await;
    assert_eq!(act(a.clone(), "confirm").await.status, StatusCode::CONFLICT);
    assert_eq!(act(a.clone(), "try").await.json["state"], "tried");
    let acct = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}"),
        &user,
        None,
    )
    .await;
    assert_eq!(
        (
            acct.json["balance"].as_i64(),
            acct.json["frozen"].as_i64(),
            acct.json["available"].as_i64()
        ),
        (Some(1000), Some(300), Some(700))
    );
    assert_eq!(act(a.clone(), "confirm").await.json["state"], "paid");
    assert_eq!(act(a.clone(), "cancel").await.status, StatusCode::CONFLICT);
    let b = new_order("b").await;
    act(b.clone(), "try").await;
    assert_eq!(act(b.clone(), "cancel").await.json["state"], "cancelled");
    assert_eq!(act(b.clone(), "pay").await.status, StatusCode::CONFLICT);
    let acct = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}"),
        &user,
        None,
    )
    .await;
    assert_eq!(
        (acct.json["balance"].as_i64(), acct.json["frozen"].as_i64()),
        (Some(700), Some(0))
    );
    // Ledger, newest first, paged.
    let l = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}/ledger?limit=2"),
        &user,
        None,
    )
    .await;
    let kinds: Vec<&str> = l.json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["unfreeze", "freeze"]);
    let before = l.json["next_before"].as_i64().unwrap();
    let l2 = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}/ledger?limit=10&before={before}"),
        &user,
        None,
    )
    .await;
    let kinds: Vec<&str> = l2.json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["debit", "freeze", "deposit"]);
    let orders = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}/orders"),
        &user,
        None,
    )
    .await;
    assert_eq!(orders.json["orders"].as_array().unwrap().len(), 2);
    agent.shutdown().await;
    check(&dir.path("cell-a.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_leaves_the_database_unchanged() {
    let dir = TempDir::new("errors");
    let agent = start_in_process(&dir, "cell-a", "blue").await;
    let client = client();
    let users = users_in(&placeholder_rules(), "cell-a", 2);
    let (user, stranger) = (&users[0], &users[1]);
    let foreign = users_in(&placeholder_rules(), "cell-b", 1).remove(0);
    deposit(&client, agent.addr, user, 100, "seed").await;
    let order = call(
        &client,
        "POST",
        agent.addr,
        "/v1/orders",
        user,
        Some(json!({"user": user, "amount": 50, "merchant": "m", "idempotency_key": "o"})),
    )
    .await;
    let id = order.json["id"].as_str().unwrap().to_string();
    call(
        &client,
        "POST",
        agent.addr,
        &format!("/v1/orders/{id}/pay"),
        user,
        None,
    )
    .await;
    let db = dir.path("cell-a.db");
    let before = snapshot(&db);

    let dep = format!("/v1/accounts/{user}/deposit");
    let cases: Vec<(Reply, u16, &str)> = vec![
        (raw(&client, agent.addr, &dep, user, "{not json").await, 400, "bad_request"),
        (raw(&client, agent.addr, &dep, user, "[1,2]").await, 400, "bad_request"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 5}"#).await, 400, "bad_request"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 5, "idempotency_key": "x", "extra": 1}"#).await, 400, "bad_request"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 0, "idempotency_key": "x"}"#).await, 422, "invalid_amount"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": -5, "idempotency_key": "x"}"#).await, 422, "invalid_amount"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 1.5, "idempotency_key": "x"}"#).await, 422, "invalid_amount"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": "5", "idempotency_key": "x"}"#).await, 422, "invalid_amount"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 18446744073709551615, "idempotency_key": "x"}"#).await, 422, "amount_overflow"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 9223372036854775807, "idempotency_key": "x"}"#).await, 422, "amount_overflow"),
        (raw(&client, agent.addr, &dep, user, r#"{"amount": 7, "idempotency_key": "seed"}"#).await, 409, "idempotency_conflict"),
        (raw(&client, agent.addr, &format!("/v1/accounts/{stranger}/deposit"), user, r#"{"amount": 7, "idempotency_key": "z"}"#).await, 400, "bad_request"),
        (raw(&client, agent.addr, &format!("/v1/accounts/{foreign}/deposit"), &foreign, r#"{"amount": 7, "idempotency_key": "z"}"#).await, 421, "misdirected"),
        (raw(&client, agent.addr, "/v1/orders", stranger, &*Box::leak(format!(r#"{{"user": "{stranger}", "amount": 5, "merchant": "m", "idempotency_key": "q"}}"#).into_boxed_str())).await, 404, "unknown_user"),
        (raw(&client, agent.addr, "/v1/orders", user, &*Box::leak(format!(r#"{{"user": "{user}", "amount": 500, "merchant": "m", "idempotency_key": "o"}}"#).into_boxed_str())).await, 409, "idempotency_conflict"),
        (raw(&client, agent.addr, &format!("/v1/orders/{id}/cancel"), user, "").await, 409, "invalid_state"),
        (raw(&client, agent.addr, "/v1/orders/o-cell-a-999/pay", user, "").await, 404, "unknown_order"),
        (raw(&client, agent.addr, &format!("/v1/orders/{id}/pay"), stranger, "").await, 404, "unknown_order"),
        (raw(&client, agent.addr, "/v1/transfers", user, &*Box::leak(format!(r#"{{"from": "{user}", "to": "{stranger}", "amount": 51, "idempotency_key": "t"}}"#).into_boxed_str())).await, 409, "insufficient_funds"),
        (raw(&client, agent.addr, "/v1/transfers", user, &*Box::leak(format!(r#"{{"from": "{user}", "to": "{user}", "amount": 1, "idempotency_key": "t2"}}"#).into_boxed_str())).await, 422, "same_account"),
        (raw(&client, agent.addr, "/v1/nope", user, "").await, 404, "not_found"),
    ];
    for (i, (r, status, code)) in cases.iter().enumerate() {
        assert_eq!(r.status.as_u16(), *status, "case {i}: {}", r.json);
        assert_eq!(r.json["error"], *code, "case {i}: {}", r.json);
        assert!(r.json["message"].is_string(), "case {i}");
    }
    // Missing key.
    let r = call(
        &client,
        "GET",
        agent.addr,
        &format!("/v1/accounts/{user}"),
        "",
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_key"))
    );
    assert_eq!(snapshot(&db), before, "an error path changed the database");
    agent.shutdown().await;
    check(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_refuses_misrouted_users_and_stale_revisions() {
    let dir = TempDir::new("guard");
    let rules_path = dir.path("rules.toml");
    let v1 = placeholder_rules();
    std::fs::write(&rules_path, &v1).unwrap();
    let mut cfg = config("cell-a", "blue", &dir.path("a.db"), &rules_path);
    cfg.reload_interval_ms = 3_600_000; // only a stamped revision triggers a reload
    let agent = cell_agent::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let client = client();
    let b_user = users_in(&v1, "cell-b", 1).remove(0);
    let r = deposit(&client, agent.addr, &b_user, 5, "x").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(r.json["owner_cell"], "cell-b");

    // v2 gives slots 0-15 of cell-a to cell-b.
    let moved: Vec<String> = users_in(&v1, "cell-a", 200)
        .into_iter()
        .filter(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) <= 15)
        .take(3)
        .collect();
    let kept = users_in(&v1, "cell-a", 200)
        .into_iter()
        .find(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) > 15)
        .unwrap();
    assert_eq!(
        deposit(&client, agent.addr, &moved[0], 5, "before")
            .await
            .status,
        StatusCode::OK
    );
    let rev1 = agent.rules.table().revision();
    assert_eq!(rev1, revision_of(&v1), "the document's own revision");
    // A request stamped with a revision the agent cannot load: refused as
    // retryable rather than decided with rules known to be old.
    let ahead = http::Request::post(format!(
        "http://{}/v1/accounts/{}/deposit",
        agent.addr, moved[1]
    ))
    .header("x-user-id", &moved[1])
    .header("x-cellgate-rev", (rev1 + 1).to_string())
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from(
        json!({"amount": 5, "idempotency_key": "ahead"}).to_string(),
    )))
    .unwrap();
    let resp = client.request(ahead).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v2 = v1
        .replace(
            &format!("revision = {rev1}\n"),
            &format!("revision = {}\n", rev1 + 1),
        )
        .replace(
            "[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n",
            "[[ranges]]\nfrom = 0\nto = 15\ncell = \"cell-b\"\n[[ranges]]\nfrom = 16\nto = 32\ncell = \"cell-a\"\n",
        );
    assert_eq!(revision_of(&v2), rev1 + 1);
    std::fs::write(&rules_path, &v2).unwrap();
    // A stale gateway (old revision stamp) still sends the moved user here:
    // the agent has not seen v2 yet, so it would accept...
    // ...but a request stamped with a newer revision makes it reload first.
    let newer = (rev1 + 1).to_string();
    let req = http::Request::post(format!(
        "http://{}/v1/accounts/{}/deposit",
        agent.addr, moved[1]
    ))
    .header("x-user-id", &moved[1])
    .header("x-cellgate-rev", &newer)
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from(
        json!({"amount": 5, "idempotency_key": "n"}).to_string(),
    )))
    .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(agent.rules.table().revision() > rev1, "the agent reloaded");
    // From now on, even requests stamped with the old revision are refused
    // for the moved users, and kept users are served.
    let stale = rev1.to_string();
    for (u, want) in [
        (&moved[0], StatusCode::MISDIRECTED_REQUEST),
        (&moved[2], StatusCode::MISDIRECTED_REQUEST),
        (&kept, StatusCode::OK),
    ] {
        let req = http::Request::post(format!("http://{}/v1/accounts/{u}/deposit", agent.addr))
            .header("x-user-id", u.as_str())
            .header("x-cellgate-rev", &stale)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"amount": 5, "idempotency_key": "s"}).to_string(),
            )))
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), want, "{u}");
    }
    agent.shutdown().await;
}

async fn credited(client: &HttpClient, addr: std::net::SocketAddr, user: &str) -> Option<i64> {
    let r = call(
        client,
        "GET",
        addr,
        &format!("/v1/accounts/{user}"),
        user,
        None,
    )
    .await;
    r.json["balance"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_cell_transfers_are_credited_exactly_once_through_outages_and_crashes() {
    let dir = TempDir::new("xcell");
    let rules_path = dir.path("rules.toml");
    std::fs::write(&rules_path, placeholder_rules()).unwrap();
    let secret = secret_file(&dir);
    let args = |cell: &str| -> Vec<String> {
        [
            "--cell",
            cell,
            "--colour",
            "blue",
            "--db",
            dir.path(&format!("{cell}.db")).to_str().unwrap(),
            "--rules",
            rules_path.to_str().unwrap(),
            "--internal-listen",
            "127.0.0.1:0",
            "--internal-secret-file",
            secret.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut a = AgentProcess::start(&args("cell-a"), "127.0.0.1:0");
    let mut c = AgentProcess::start(&args("cell-c"), "127.0.0.1:0");
    // Publish the real addresses; the agents reload the rules.
    let real = with_internal(
        &rules(
            &[
                ("cell-a", a.addr.to_string(), "127.0.0.1:10".into()),
                ("cell-b", "127.0.0.1:11".into(), "127.0.0.1:12".into()),
                ("cell-c", c.addr.to_string(), "127.0.0.1:14".into()),
            ],
            None,
        ),
        &[
            ("cell-a", a.internal.unwrap()),
            ("cell-c", c.internal.unwrap()),
        ],
    );
    std::fs::write(&rules_path, &real).unwrap();
    let client = client();
    let payer = users_in(&real, "cell-a", 1).remove(0);
    let payees = users_in(&real, "cell-c", 3);
    let published = revision_of(&real);
    for addr in [a.addr, c.addr] {
        wait_until(
            "the agents to load the real rules",
            Duration::from_secs(5),
            || {
                let client = client.clone();
                async move {
                    let r = call(&client, "GET", addr, "/healthz", "", None).await;
                    r.json["revision"].as_u64().unwrap_or(0) >= published
                }
            },
        )
        .await;
    }
    assert_eq!(
        deposit(&client, a.addr, &payer, 10_000, "seed")
            .await
            .status,
        StatusCode::OK
    );

    // 1. Normal delivery.
    let t = call(
        &client,
        "POST",
        a.addr,
        "/v1/transfers",
        &payer,
        Some(json!({"from": payer, "to": payees[0], "amount": 100, "idempotency_key": "t0"})),
    )
    .await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.json);
    assert_eq!(t.json["to_cell"], "cell-c");
    let tid = t.json["id"].as_str().unwrap().to_string();
    wait_until("delivery", Duration::from_secs(10), || {
        let (client, payer, tid) = (client.clone(), payer.clone(), tid.clone());
        async move {
            call(
                &client,
                "GET",
                a.addr,
                &format!("/v1/transfers/{tid}"),
                &payer,
                None,
            )
            .await
            .json["state"]
                == "delivered"
        }
    })
    .await;
    assert_eq!(credited(&client, c.addr, &payees[0]).await, Some(100));

    // 2. The payee's cell is down for a while.
    c.kill();
    for i in 0..5 {
        let r = call(&client, "POST", a.addr, "/v1/transfers", &payer,
            Some(json!({"from": payer, "to": payees[1], "amount": 10, "idempotency_key": format!("down-{i}")}))).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // Let the relay fail a few times.
    wait_until("failed delivery attempts", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let r = client
                .request(
                    http::Request::get(format!("http://{}/metrics", a.addr))
                        .body(Default::default())
                        .unwrap(),
                )
                .await
                .unwrap();
            let text = String::from_utf8(
                http_body_util::BodyExt::collect(r.into_body())
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap();
            text.lines().any(|l| {
                l.starts_with("cell_outbox_deliveries_total{result=\"error\"}")
                    && !l.ends_with(" 0")
            })
        }
    })
    .await;
    let c2 = c.restart();
    wait_until(
        "credits after the payee's cell came back",
        Duration::from_secs(15),
        || {
            let (client, p) = (client.clone(), payees[1].clone());
            async move { credited(&client, c2.addr, &p).await == Some(50) }
        },
    )
    .await;

    // 3. The payer's agent is killed while deliveries are in flight, and restarted.
    for i in 0..20 {
        call(&client, "POST", a.addr, "/v1/transfers", &payer,
            Some(json!({"from": payer, "to": payees[2], "amount": 1, "idempotency_key": format!("crash-{i}")}))).await;
    }
    a.kill();
    let a2 = a.restart();
    wait_until(
        "all 20 credits after the crash",
        Duration::from_secs(15),
        || {
            let (client, p) = (client.clone(), payees[2].clone());
            async move { credited(&client, c2.addr, &p).await == Some(20) }
        },
    )
    .await;
    // Nothing more arrives later (exactly once), and the outbox drains.
    wait_until("the outbox to drain", Duration::from_secs(10), || {
        let db = dir.path("cell-a.db");
        async move {
            let conn = rusqlite::Connection::open(db).unwrap();
            conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE delivered_ms IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                == 0
        }
    })
    .await;
    assert_eq!(credited(&client, c2.addr, &payees[2]).await, Some(20));
    assert_eq!(
        balance(&client, a2.addr, &payer).await,
        10_000 - 100 - 50 - 20
    );
    let ra = check(&dir.path("cell-a.db"));
    let rc = check(&dir.path("cell-c.db"));
    assert_eq!(
        ra.balance_total + rc.balance_total,
        10_000,
        "money is conserved across cells"
    );
    drop(a2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_get_precise_answers() {
    let dir = TempDir::new("odd");
    let agent = start_in_process(&dir, "cell-a", "blue").await;
    let client = client();
    let users = users_in(&placeholder_rules(), "cell-a", 1);
    // A malformed revision stamp.
    let req = http::Request::get(format!("http://{}/v1/accounts/{}", agent.addr, users[0]))
        .header("x-user-id", &users[0])
        .header("x-cellgate-rev", "9223372036854775808")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = client.request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Wrong method on a known path: 405 with Allow.
    let r = call(&client, "DELETE", agent.addr, "/healthz", "", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "GET");
    // Percent-encoded user ids in paths are decoded.
    let odd = users_in(&placeholder_rules(), "cell-a", 500)
        .into_iter()
        .map(|u| format!("{u} x/é"))
        .find(|u| {
            let t = routing_rules::RoutingTable::compile(
                routing_rules::parse_rules(&placeholder_rules()).unwrap(),
                0,
            )
            .unwrap();
            let d = t
                .route(
                    Some(u.as_bytes()),
                    &Default::default(),
                    &routing_rules::AllHealthy,
                )
                .unwrap();
            t.cell_name(d.home_cell) == "cell-a"
        })
        .unwrap();
    let encoded = odd
        .replace(' ', "%20")
        .replace('/', "%2F")
        .replace('é', "%C3%A9");
    let req = http::Request::post(format!(
        "http://{}/v1/accounts/{encoded}/deposit",
        agent.addr
    ))
    .header(
        "x-user-id",
        http::HeaderValue::from_bytes(odd.as_bytes()).unwrap(),
    )
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from(
        json!({"amount": 3, "idempotency_key": "k"}).to_string(),
    )))
    .unwrap();
    let r = client.request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_command_exits_1_on_a_tampered_database() {
    let dir = TempDir::new("check");
    let agent = start_in_process(&dir, "cell-a", "blue").await;
    let client = client();
    let user = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    deposit(&client, agent.addr, &user, 100, "d").await;
    agent.shutdown().await;
    let db = dir.path("cell-a.db");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
            .args(["check", "--db"])
            .arg(&db)
            .output()
            .unwrap()
    };
    let ok = run();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout)
        .trim_end()
        .ends_with("ok"));
    // Someone edits a balance behind the ledger's back.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE accounts SET balance = balance + 1", [])
        .unwrap();
    let bad = run();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("VIOLATION: account"), "{out}");
    assert!(out.contains("cell total 101"), "{out}");
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args(["check", "--db", "/nonexistent/x.db"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_cleanly() {
    let dir = TempDir::new("sigterm");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let args: Vec<String> = [
        "--cell",
        "cell-a",
        "--colour",
        "blue",
        "--db",
        dir.path("a.db").to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = AgentProcess::start(&args, "127.0.0.1:0");
    let client = client();
    let user = users_in(&placeholder_rules(), "cell-a", 1).remove(0);
    assert_eq!(
        deposit(&client, agent.addr, &user, 5, "k").await.status,
        StatusCode::OK
    );
    let pid = agent.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    check(&dir.path("a.db"));
}
