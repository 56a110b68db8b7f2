//! Canary pipelines through real gateways: what operators and CI do to a
//! running pipeline — webhooks and a gate, a driver killed mid-step (status,
//! a refused second run, resume), pause and resume, and the rules in etcd.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use routing_rules::canary::driver::{self, Ending, RunRequest, Where};
use routing_rules::canary::{Event, Hooks, Status};
use support::canary::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_hear_every_step_and_a_refusing_gate_holds_the_step() {
    let s = setup("canary-hooks").await;
    let hooks = HookServer::start(2).await;
    let (ending, events) = canary(
        &s,
        "10,100",
        Hooks {
            on_step: hooks.url("/step"),
            on_abort: hooks.url("/abort"),
            gate: hooks.url("/gate"),
        },
    )
    .await;
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    // The gate said no twice: the first step waited, then went on.
    let gated = events
        .iter()
        .filter(|e| matches!(e, Event::Gated { .. }))
        .count();
    assert_eq!(gated, 2, "{events:#?}");
    assert_eq!(
        hooks.events("/gate").len(),
        4,
        "asked twice in vain, then once per step"
    );
    assert_eq!(
        hooks.events("/step"),
        ["step_started", "passed", "step_started", "passed"]
    );
    assert!(hooks.events("/abort").is_empty());

    // A failing green: the abort hook hears the abort, with its reason.
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(10, Ordering::Relaxed);
    }
    routing_rules::switchover::edit_rules_file(&s.rules, |t| {
        Ok(routing_rules::edit::set_split(t, "cell-a", 0)?)
    })
    .unwrap();
    let abort = HookServer::start(0).await;
    let (ending, _) = canary(
        &s,
        "10,100",
        Hooks {
            on_abort: abort.url("/abort"),
            ..Hooks::default()
        },
    )
    .await;
    assert!(matches!(ending, Ending::Aborted(_)));
    let got = abort.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1["event"], "aborted");
    assert!(
        got[0].1["reason"].as_str().unwrap().contains("error ratio"),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pipeline_is_shown_refuses_a_second_run_and_resumes() {
    let s = setup("canary-resume").await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, &stop);
    // The first driver passes its first step, then dies (its task is
    // dropped mid-step: no cleanup, as with kill -9).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = request(&s, "10,50,100", Hooks::default());
    let first = tokio::spawn(async move {
        let mut emit = move |e: &Event| {
            let _ = tx.send(e.clone());
        };
        driver::run(req, &mut emit).await
    });
    while let Some(e) = rx.recv().await {
        if matches!(e, Event::Passed { .. }) {
            break;
        }
    }
    first.abort();
    let _ = first.await;
    // Its lease is still live: a second run is refused, nothing changes.
    let before = std::fs::read_to_string(&s.rules).unwrap();
    let mut ignore = |_: &Event| {};
    let e = driver::run(request(&s, "10,100", Hooks::default()), &mut ignore)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    assert_eq!(std::fs::read_to_string(&s.rules).unwrap(), before);
    let p = recorded(&s).await;
    assert_eq!((p.status, p.step), (Status::Running, 1));
    // The lease runs out; status tells, resume finishes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded(&s)
        .await
        .leased(routing_rules::canary::store::now_ms())
    {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = recorded(&s)
        .await
        .summary(routing_rules::canary::store::now_ms());
    assert!(summary.contains("resume cell-a"), "{summary}");
    let ended = driver::resume(&Where::file(&s.rules), "cell-a", &mut ignore)
        .await
        .unwrap();
    assert_eq!(ended, Some(Ending::Promoted));
    assert_eq!(green_share(&s), 10_000);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_step_is_not_advanced_until_resumed() {
    let s = setup("canary-pause").await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, &stop);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = request(&s, "10,100", Hooks::default());
    let run = tokio::spawn(async move {
        let mut emit = move |e: &Event| {
            let _ = tx.send(e.clone());
        };
        driver::run(req, &mut emit).await
    });
    while let Some(e) = rx.recv().await {
        if matches!(e, Event::Propagated { .. }) {
            break;
        }
    }
    let place = Where::file(&s.rules);
    let p = driver::pause(&place, "cell-a").await.unwrap();
    assert_eq!(p.status, Status::Paused);
    // Three holds long: judged, never passed.
    let t0 = Instant::now();
    let mut judged = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            assert!(!matches!(e, Event::Passed { .. }), "a paused step passed");
            judged += matches!(e, Event::Judged { .. }) as usize;
        }
    }
    assert!(judged > 0, "a paused step is still judged");
    // Resume: the live driver goes on (no second driver).
    let mut ignore = |_: &Event| {};
    assert_eq!(
        driver::resume(&place, "cell-a", &mut ignore).await.unwrap(),
        None
    );
    assert_eq!(run.await.unwrap().unwrap(), Ending::Promoted);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

/// With the rules in etcd: the pipeline finds the gateways by their
/// registrations, edits the rules by compare-and-swap and keeps its state
/// in etcd; `abort` rolls green back there.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_the_registered_gateways_are_judged_and_the_state_lives_in_etcd() {
    use routing_rules::etcd::testing::EtcdServer;
    use routing_rules::etcd::ControlPlane;
    let topo = Topology::start(1).await;
    let etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "gw-test")
        .await
        .unwrap();
    let text = topo.rules([0, 0, 0], "");
    cp.apply(&text, 0, "test", "v1").await.unwrap();
    let dirs = [TempDir::new("canary-etcd-1"), TempDir::new("canary-etcd-2")];
    let mut gateways = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        gateways.push(
            gateway::start(
                etcd_config(&etcd, &d.0, &format!("g{i}")),
                prometheus::Registry::new(),
            )
            .await
            .unwrap(),
        );
    }
    let place = Where {
        rules: None,
        etcd: Some(routing_rules::switchover::EtcdTarget {
            endpoints: vec![etcd.url.clone()],
            cluster: "gw-test".into(),
        }),
    };
    // Both gateways registered (with their admin addresses).
    wait_until("two gateways registered", Duration::from_secs(10), || {
        let url = etcd.url.clone();
        async move {
            let mut cp = ControlPlane::connect(&[url], "gw-test").await.unwrap();
            cp.status().await.unwrap().gateways.len() == 2
        }
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let proxies: Vec<_> = gateways.iter().map(|g| g.proxy_addr).collect();
    let clients = load_through(&proxies, users_of_a(&text, 2000), &stop);
    let mut req = RunRequest {
        place: place.clone(),
        cell: "cell-a".into(),
        plan: plan("10,100"),
        metrics: vec![],
        prometheus: None,
        hooks: Hooks::default(),
    };
    let (events, mut emit) = recorder();
    let ending = driver::run(req.clone(), &mut emit).await.unwrap();
    let events = events.lock().unwrap().clone();
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Propagated { gateways: 2, .. })),
        "both registered gateways were read: {events:#?}"
    );
    let stored = cp.get().await.unwrap().unwrap();
    let green = |doc: &str| {
        routing_rules::parse_rules(doc).unwrap().cells["cell-a"]
            .split
            .green
    };
    assert_eq!(green(&stored.document), 10_000);
    let p = driver::status(&place, "cell-a").await.unwrap();
    assert_eq!(p.status, Status::Promoted);
    // The history says who moved the share.
    let history = cp.history().await.unwrap();
    assert!(history
        .iter()
        .any(|h| h.message == "canary: cell cell-a green 10%"));
    // Abort through etcd: green 0 % at once, seen by both gateways.
    let (revision, ms) = driver::abort(&place, "cell-a", "test").await.unwrap();
    assert_eq!(revision, Some(stored.revision + 1));
    assert!(ms.is_some_and(|ms| ms < 1000), "{ms:?}");
    assert_eq!(green(&cp.get().await.unwrap().unwrap().document), 0);
    assert_eq!(
        driver::status(&place, "cell-a").await.unwrap().status,
        Status::Aborted
    );
    // A bad plan against etcd changes nothing either.
    req.cell = "nope".into();
    let before = cp.get().await.unwrap().unwrap().revision;
    let mut ignore = |_: &Event| {};
    assert!(driver::run(req, &mut ignore).await.is_err());
    assert_eq!(cp.get().await.unwrap().unwrap().revision, before);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}
