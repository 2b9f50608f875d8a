//! Model versions: every kept checkpoint with its lineage, fetched by round.

use confide_tests::{Federation, job_spec, repo_root};

#[test]
fn every_rounds_model_is_a_version_with_its_metrics_and_digest() {
    let names: Vec<String> = (0..3).map(|i| format!("site-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let text = job_spec(&names, 3, 3, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.1");
    let id = fed.submit("models.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    // One version per round (round 0: the initial model), newest first,
    // each with its round's metrics.
    let listed = fed.run_ok(&["model", "list", "--job", &id, "--json"]);
    let versions: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let rounds: Vec<u64> = versions.iter().map(|v| v["round"].as_u64().unwrap_or(0)).collect();
    assert_eq!(rounds, [3, 2, 1, 0], "{listed}");
    for v in &versions[..3] {
        let r = v["round"].as_u64().unwrap_or(0) as usize;
        assert_eq!(v["metrics"]["accuracy"], st["history"][r - 1]["metrics"]["accuracy"], "{listed}\n{st:#}");
        // The digest is the file's.
        let out = fed.path(&format!("round-{r}.safetensors"));
        fed.run_ok(&["job", "model", &id, "--round", &r.to_string(), "--out", out.to_str().expect("utf-8")]);
        let sum = std::process::Command::new("sha256sum").arg(&out).output().expect("sha256sum");
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(sum.split_whitespace().next(), v["sha256"].as_str(), "round {r}");
    }
    // Round 1 and round 3 are different models; the latest is round 3's.
    let read = |p: &str| std::fs::read(fed.path(p)).expect("model file");
    assert_ne!(read("round-1.safetensors"), read("round-3.safetensors"));
    assert_eq!(fed.model(&id), read("round-3.safetensors"));
    // A round that is not kept: an error that says which are.
    let out = fed.cli(&["job", "model", &id, "--round", "9", "--out", &fed.s("x.safetensors")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("round 9") && err.contains("kept: 3, 2, 1, 0"), "{err}");
    // The human listing names the job and rounds.
    let human = fed.run_ok(&["model", "list"]);
    assert!(human.contains(&id) && human.contains("round    3") && human.contains("accuracy"), "{human}");
}
