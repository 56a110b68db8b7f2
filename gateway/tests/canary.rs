//! Canary pipelines through real gateways: two gateways follow one rules
//! file, real backends stand in for a cell's blue and green releases, a
//! load of many users runs through the gateways, and the pipeline
//! (`routing_rules::canary::driver`, what `cellctl canary run` drives)
//! steps cell-a's green share, judging from the gateways' own /metrics.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use routing_rules::canary::driver::{self, Ending};
use routing_rules::canary::{Event, Hooks, Status, Verdict};
use support::canary::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_failing_five_percent_is_aborted_at_the_first_step() {
    let s = setup("canary-errors").await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(20, Ordering::Relaxed);
    }
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(
        why.contains("error ratio") && why.contains("green 10%"),
        "{why}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Passed { .. })),
        "no step passed"
    );
    let failed = events
        .iter()
        .find_map(|e| match e {
            Event::Judged { judgement, .. } if judgement.verdict == Verdict::Failed => {
                Some(judgement.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(failed.green.error_ratio > 0.03, "{failed:?}");
    assert_eq!(failed.blue.errors, 0, "{failed:?}");
    assert_eq!(green_share(&s), 0);
    aborted_within_a_second(&events);
    assert_eq!(recorded(&s).await.status, Status::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_30ms_slower_is_aborted_on_latency() {
    let s = setup("canary-latency").await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.delay_ms.store(30, Ordering::Relaxed);
    }
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(why.contains("p99"), "{why}");
    assert_eq!(green_share(&s), 0);
    aborted_within_a_second(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_green_is_promoted_through_every_step() {
    let s = setup("canary-healthy").await;
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    assert_eq!(green_share(&s), 10_000);
    let p = recorded(&s).await;
    assert_eq!((p.status, p.lease), (Status::Promoted, None));
    // Each step's requests split as its share says (2000 users: within
    // 5 points; the 100k-user bound of one point is the exposure test's).
    for (share, want) in [("10%", 0.10), ("50%", 0.50)] {
        let step = events
            .iter()
            .position(|e| matches!(e, Event::StepStarted { green, .. } if green == share))
            .unwrap();
        // The step's last judgement: its whole window.
        let j = events[step..]
            .iter()
            .take_while(|e| !matches!(e, Event::Passed { .. }))
            .filter_map(|e| match e {
                Event::Judged { judgement, .. } => Some(judgement.clone()),
                _ => None,
            })
            .last()
            .unwrap();
        assert_eq!(j.verdict, Verdict::Healthy, "{j:?}");
        let got = j.green.requests as f64 / (j.green.requests + j.blue.requests) as f64;
        assert!(
            (got - want).abs() < 0.05,
            "step {share}: green took {got:.3}"
        );
    }
    assert!(matches!(events.last(), Some(Event::Finished { green, .. }) if green == "100%"));
}

/// With `--prometheus`: the gateways' series read from a real Prometheus
/// server's federation endpoint (every gateway summed) instead of the
/// gateways themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judged_from_a_prometheus_server_a_failing_green_is_aborted() {
    let s = setup("canary-prom").await;
    let targets: Vec<String> = s
        .metrics
        .iter()
        .map(|m| {
            m.trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_string()
        })
        .collect();
    let prom = Prometheus::start(&targets).await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(20, Ordering::Relaxed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, &stop);
    let mut req = request(&s, "10,100", Hooks::default());
    req.metrics = vec![];
    req.prometheus = Some(prom.url.clone());
    let (events, mut emit) = recorder();
    let ending = driver::run(req, &mut emit).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let events = events.lock().unwrap().clone();
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(why.contains("error ratio"), "{why}");
    // The judgement that failed green saw both colours' series through the
    // federation endpoint. (An earlier one may precede the first scrape.)
    let judged = events
        .iter()
        .find_map(|e| match e {
            Event::Judged { judgement, .. } if judgement.verdict == Verdict::Failed => {
                Some(judgement.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(
        judged.blue.requests > 0 && judged.green.requests > 0,
        "{judged:?}"
    );
    assert_eq!(green_share(&s), 0);
}
