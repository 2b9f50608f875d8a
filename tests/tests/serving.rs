//! Serving: a trained model version deployed to a service (signed by the
//! administrator), pulled and verified by the party that serves it, answered
//! on its local HTTP endpoint, hot-swapped under load with no failed request,
//! rolled back, and refused with a 4xx that names the problem.

use std::time::Duration;

use confide_tests::{Federation, bin_dir, job_spec, repo_root};
use serde_json::Value;

mod http;
use http::{get, wait_for_sequence};

#[test]
fn deployed_versions_are_served_swapped_under_load_rolled_back_and_bad_input_is_named() {
    // site-2 is enrolled and serves "triage" too, but takes no part in the job.
    let all: Vec<String> = (0..3).map(|i| format!("site-{i}")).collect();
    let names: Vec<String> = all[..2].to_vec();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    let serve = "[serve]\nservices = [\"triage\"]\nlisten = \"127.0.0.1:0\"\nmax_rows = 50\nmax_body_bytes = 65536\n";
    fed.start_party("site-0", serve);
    fed.start_party("site-1", "");
    fed.start_party("site-2", "[serve]\nservices = [\"triage\"]\nlisten = \"127.0.0.1:0\"\n");
    let addr = fed.party_endpoint("site-0");
    // Before any deployment: healthy, not ready, and predictions say why.
    let (status, v) = get(addr, "GET", "/healthz", "");
    assert_eq!((status, &v["services"]["triage"]["ready"]), (200, &Value::Bool(false)), "{v}");
    let row: Vec<f64> = vec![1.0; 30];
    let one = serde_json::json!({ "rows": [row] }).to_string();
    let (status, v) = get(addr, "POST", "/v1/services/triage/predict", &one);
    assert!(status == 503 && v["error"].as_str().unwrap_or("").contains("no deployed model"), "{status} {v}");

    let text = job_spec(&names, 2, 3, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.1");
    let id = fed.submit("serve.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());

    // Deploy round 1: the party pulls, verifies and serves it.
    let out = fed.run_ok(&["model", "deploy", "triage", "--job", &id, "--round", "1"]);
    assert!(out.contains("deployment 1 (deploy)"), "{out}");
    let h = wait_for_sequence(&fed, addr, "triage", 1);
    assert_eq!((h["version"]["round"].as_u64(), h["width"].as_u64()), (Some(1), Some(30)), "{h}");
    // The outsider hears of the deployment but is not handed the model (it
    // did not help train it), and serves nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !fed.coordinator_log().contains("party site-2 took no part in job") {
        assert!(std::time::Instant::now() < deadline, "no refused pull by site-2\n{}", fed.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, v) = get(fed.party_endpoint("site-2"), "GET", "/healthz", "");
    assert_eq!(v["services"]["triage"]["ready"], Value::Bool(false), "{v}");
    // The answer is the round-1 model's, computed here from the downloaded file.
    let rows = confide_algorithms::data::Dataset::load_csv(
        &fed.path("data/site-0.csv"),
        &confide_algorithms::data::CsvOptions::default(),
    )
    .expect("rows");
    let five: Vec<&[f32]> = (0..5).map(|i| rows.row(i)).collect();
    let body = serde_json::json!({ "rows": five }).to_string();
    let (status, v) = get(addr, "POST", "/v1/services/triage/predict", &body);
    assert_eq!(status, 200, "{v}");
    let m1 = fed.path("round-1.safetensors");
    fed.run_ok(&["job", "model", &id, "--round", "1", "--out", m1.to_str().expect("utf-8")]);
    let params = confide_algorithms::Parameters::from_safetensors(&std::fs::read(&m1).expect("model")).expect("model");
    let local = confide_party::trainers::BuiltinTrainers::default()
        .inference_model(&confide_algorithms::ModelConfig::logistic_regression(2), &params)
        .expect("model")
        .predict(&five.concat())
        .expect("predict");
    let served: Vec<f64> = v["probabilities"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r.as_array().expect("row").iter().map(|p| p.as_f64().expect("p")))
        .collect();
    assert_eq!(served.len(), local.len());
    for (a, b) in served.iter().zip(&local) {
        assert!((a - f64::from(*b)).abs() < 1e-6, "{served:?} vs {local:?}");
    }
    assert_eq!(v["version"]["round"], 1);
    assert_eq!(v["provenance"]["answered_by"], serde_json::json!(vec!["edge"; 5]));
    assert_eq!(v["hard"], serde_json::json!(vec![false; 5]));
    assert_eq!(v["predictions"].as_array().map(Vec::len), Some(5));

    // The batch CLI answers from the kept deployment the same way.
    let features = fed.path("features.csv");
    let csv: String =
        five.iter().map(|r| r.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",") + "\n").collect();
    std::fs::write(&features, csv).expect("features");
    let out = std::process::Command::new(bin_dir().join("confide-party"))
        .args(["predict", "--config", &fed.s("site-0.toml"), "--service", "triage", "--data", &fed.s("features.csv")])
        .env("CONFIDE_LOG", "warn")
        .output()
        .expect("confide-party predict");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!((lines.len(), lines[0]), (6, "prediction,p0,p1"), "{text}");
    let p1: f64 = lines[1].split(',').nth(2).and_then(|p| p.parse().ok()).expect("p1");
    assert!((p1 - served[1]).abs() < 1e-6, "{text} vs {served:?}");
    // `--out`: the same answers, in a file only its owner reads.
    let answers = fed.path("answers.csv");
    let out = std::process::Command::new(bin_dir().join("confide-party"))
        .args(["predict", "--config", &fed.s("site-0.toml"), "--service", "triage", "--data", &fed.s("features.csv")])
        .args(["--out", answers.to_str().expect("utf-8")])
        .env("CONFIDE_LOG", "warn")
        .output()
        .expect("confide-party predict --out");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&answers).expect("answers"), text);
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&answers).expect("answers").permissions().mode() & 0o777, 0o600);
    }

    // Hot swap under load: round 3 is deployed while four clients send
    // requests back to back; not one fails, and both versions answer.
    let load = fed.start_load(&addr.to_string(), "triage", "site-0", 4, 6);
    std::thread::sleep(Duration::from_millis(1500));
    fed.run_ok(&["model", "deploy", "triage", "--job", &id]);
    let report = load.report();
    assert_eq!(report["failures"], 0, "{report}\n{}", fed.logs());
    assert!(report["versions"]["1"].as_u64() > Some(0) && report["versions"]["2"].as_u64() > Some(0), "{report}");
    assert_eq!(wait_for_sequence(&fed, addr, "triage", 2)["version"]["round"], 3);

    // Roll back: the version before, as a new signed deployment; once more
    // there is nothing before it.
    let out = fed.run_ok(&["model", "rollback", "triage"]);
    assert!(out.contains("deployment 3 (rollback)") && out.contains("round 1"), "{out}");
    let h = wait_for_sequence(&fed, addr, "triage", 3);
    assert_eq!((&h["version"]["round"], &h["version"]["action"]), (&Value::from(1), &Value::from("rollback")), "{h}");
    let again = fed.cli(&["model", "rollback", "triage"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("no earlier version"), "{err}");
    let history = fed.run_ok(&["model", "services", "triage", "--json"]);
    let history: Vec<Value> = history.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let seqs: Vec<(u64, u64)> =
        history.iter().map(|d| (d["sequence"].as_u64().unwrap_or(0), d["round"].as_u64().unwrap_or(0))).collect();
    assert_eq!(seqs, [(3, 1), (2, 3), (1, 1)]);
    // Deployed versions are marked (and kept by retention).
    let listed = fed.run_ok(&["model", "list", "--job", &id, "--json"]);
    let marked: Vec<u64> = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|v| v["services"].as_array().is_some_and(|s| !s.is_empty()))
        .map(|v| v["round"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(marked, [3, 1], "{listed}");
    // Deploying a round that is not kept, or to a bad service name, is refused.
    let bad = fed.cli(&["model", "deploy", "triage", "--job", &id, "--round", "9"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("round 9"));
    let bad = fed.cli(&["model", "deploy", "tri age", "--job", &id]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a service name"));

    // Bad input: each a 4xx that names the problem.
    let cases: [(&str, String, u16, &str); 7] = [
        ("triage", serde_json::json!({ "rows": [[1.0, 2.0]] }).to_string(), 422, "takes 30"),
        ("triage", "{\"rows\": [[1, \"x\"]]}".into(), 400, "rows[0][1]"),
        ("triage", "not json".into(), 400, "not JSON"),
        ("triage", serde_json::json!({ "rows": vec![row.clone(); 51] }).to_string(), 413, "at most 50"),
        ("triage", format!("{{\"rows\": [[{}]]}}", vec!["1.0"; 20_000].join(",")), 413, "max_body_bytes"),
        ("billing", one.clone(), 404, "not served here"),
        ("triage", "{\"rows\": [[1, 2], [3]]}".into(), 400, "rows[1]"),
    ];
    for (service, body, want, says) in cases {
        let (status, v) = get(addr, "POST", &format!("/v1/services/{service}/predict"), &body);
        let msg = v["error"].as_str().unwrap_or("");
        assert!(status == want && msg.contains(says), "{service}: got {status} {v}, wanted {want} saying {says:?}");
    }
    // Still serving after all that.
    assert_eq!(get(addr, "POST", "/v1/services/triage/predict", &one).0, 200);
}
