//! Prometheus metrics end to end: a federation of real processes runs a
//! short job; the coordinator's and a party's `/metrics` are scraped and
//! parsed with a Prometheus text-format parser.

use confide_tests::{Federation, job_spec, repo_root, scrape};
use prometheus_parse::{Scrape, Value};

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("the Prometheus text format")
}

/// The value of `metric` with `labels` (all of them), if the series exists.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).map(|x| {
        match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(_) | Value::Summary(_) => f64::NAN,
        }
    })
}

#[test]
fn the_coordinator_and_a_party_expose_what_a_job_did() {
    let names = ["hospital-a", "hospital-b", "hospital-c"];
    let mut fed = Federation::new(&names, &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2");
    fed.start_coordinator();
    fed.start_party("hospital-a", "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    fed.start_party("hospital-b", "");
    fed.start_party("hospital-c", "");
    let id =
        fed.submit("job.toml", &job_spec(&fed.names, 3, 3, "kind = \"logistic_regression\"\nclasses = 2", "seed = 3"));
    // While the job runs, its series carry its id.
    let running = fed.wait_for(&id, 120, "a round", |s| s["rounds_completed"].as_u64() >= Some(1));
    if running["state"] == "running" {
        let s = parse(&scrape(&fed.metrics_addr));
        // The job can finish between the status and the scrape (its series
        // then go): checked when the scrape itself still counts it running.
        if value(&s, "confide_coordinator_jobs", &[("state", "running")]).is_some_and(|n| n >= 1.0) {
            assert!(value(&s, "confide_coordinator_job_round", &[("job", &id)]).is_some_and(|r| r >= 1.0), "{s:?}");
        }
    }
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());

    // The gauges read off state are refreshed at most once a second: a
    // scrape within a second of the one above may show the job running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let c = loop {
        let c = parse(&scrape(&fed.metrics_addr));
        let done = value(&c, "confide_coordinator_jobs", &[("state", "succeeded")]) == Some(1.0);
        if done || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(value(&c, "confide_coordinator_connected_parties", &[]), Some(3.0));
    assert_eq!(value(&c, "confide_coordinator_party_connected", &[("party", "hospital-b")]), Some(1.0));
    assert_eq!(value(&c, "confide_coordinator_jobs", &[("state", "succeeded")]), Some(1.0));
    assert_eq!(value(&c, "confide_coordinator_rounds_total", &[]), Some(3.0));
    let rounds =
        c.samples.iter().find(|x| x.metric == "confide_coordinator_round_duration_seconds").expect("histogram");
    let Value::Histogram(buckets) = &rounds.value else { panic!("{rounds:?}") };
    assert_eq!(buckets.last().map(|b| b.count), Some(3.0), "every round in the +Inf bucket: {buckets:?}");
    assert!(
        c.samples
            .iter()
            .any(|x| x.metric == "confide_coordinator_stage_duration_seconds" && x.labels.get("stage") == Some("fit"))
    );
    for p in names {
        let sent = value(&c, "confide_coordinator_sent_bytes_total", &[("party", p)]).unwrap_or(0.0);
        let received = value(&c, "confide_coordinator_received_bytes_total", &[("party", p)]).unwrap_or(0.0);
        assert!(sent > 1000.0 && received > 1000.0, "{p}: {sent} sent, {received} received");
    }
    // Job-labelled series end with the job.
    assert!(c.samples.iter().all(|x| x.labels.get("job").is_none()), "{c:?}");

    let a = parse(&scrape(&fed.party_metrics_addr("hospital-a")));
    assert_eq!(value(&a, "confide_party_connected", &[]), Some(1.0));
    assert_eq!(value(&a, "confide_party_job_offers_total", &[("outcome", "accepted")]), Some(1.0));
    assert!(value(&a, "confide_party_tasks_total", &[("stage", "fit")]).is_some_and(|n| n >= 3.0), "{a:?}");
    assert!(value(&a, "confide_party_sent_bytes_total", &[]).is_some_and(|b| b > 1000.0));
    // A job without DP costs ε = ∞ in the ledger.
    assert_eq!(value(&a, "confide_party_epsilon_spent", &[("dataset", "data")]), Some(f64::INFINITY));

    // Tracing spans: a stage's duration is logged with its job and round.
    let log = fed.coordinator_log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("job{{job={id}}}:round{{round=2}}:stage{{stage=fit}}")))
        .unwrap_or_else(|| panic!("no fit stage span of round 2:\n{log}"));
    assert!(
        log.lines().any(|l| l.contains("round{round=2}:stage{stage=fit}") && l.contains("stage finished ms=")),
        "{line}"
    );
    let party_log = std::fs::read_to_string(fed.path("logs/hospital-b.log")).unwrap();
    assert!(
        party_log
            .lines()
            .any(|l| l.contains(&format!("job{{job={id}}}:round{{round=2 stage=fit}}")) && l.contains("ms=")),
        "{party_log}"
    );
}

/// A TLS handshake without a client certificate is refused and counted by
/// reason.
#[test]
fn refused_handshakes_are_counted_by_reason() {
    let mut fed = Federation::new(&["hospital-a"], &repo_root().join("examples/data/breast_cancer.csv"), true, "1");
    fed.start_coordinator();
    {
        use std::io::Write;
        // Not TLS at all: the handshake fails.
        let mut s = std::net::TcpStream::connect(&fed.addr).expect("connect");
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let c = parse(&scrape(&fed.metrics_addr));
        if value(&c, "confide_coordinator_tls_handshake_refusals_total", &[("reason", "handshake_failed")]) == Some(1.0)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal counted: {c:?}\n{}", fed.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
