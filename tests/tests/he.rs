//! Threshold-HE aggregation end to end: real party processes, a collective
//! key dealt in the first round, a party that crashes after uploading its
//! ciphertext, and the same job under `secagg` for comparison.

use confide_algorithms::Parameters;
use confide_tests::{Federation, job_spec, max_abs_diff, repo_root};

const LOGREG2: &str = "kind = \"logistic_regression\"\nclasses = 2";

/// A 5-party job under `protocol`; `crash` = (party, stage, round) exits there.
fn run(protocol: &str, crash: (&str, &str, u32)) -> (serde_json::Value, Parameters, String) {
    let names: Vec<String> = (0..5).map(|i| format!("site-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "3,2,2,2,1");
    fed.start_coordinator();
    for n in &names {
        let mut extra = format!("[policy]\naggregation = [\"{protocol}\"]\n");
        if crash.0 == n {
            extra.push_str(&format!("[fault]\nexit_on_stage = \"{}\"\nexit_on_round = {}\n", crash.1, crash.2));
        }
        fed.start_party(n, &extra);
    }
    let text = job_spec(&names, 3, 3, LOGREG2, "seed = 4\nlocal_epochs = 2\nlearning_rate = 0.1")
        + &format!(
            "[aggregation]\nprotocol = \"{protocol}\"\n[aggregation.{protocol}]\nmax_examples = 1000\nclip = 4.0\n"
        );
    let id = fed.submit(&format!("{protocol}.toml"), &text);
    let st = fed.wait_done(&id, 180);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    (st, model, fed.coordinator_log())
}

#[test]
fn he_job_matches_secagg_and_counts_a_party_that_crashed_after_uploading() {
    // Round 2 reuses round 1's key: site-3 uploads with its fit answer,
    // then exits when asked for the linear hash; round 3 runs without it.
    let (he, he_model, log) = run("he", ("site-3", "he-hash", 2));
    assert_eq!(he["privacy"]["aggregation"], "he", "{he:#}");
    // site-3 uploaded in round 2 and vanished: its ciphertext is in the sum.
    let all = serde_json::json!(["site-0", "site-1", "site-2", "site-3", "site-4"]);
    assert_eq!(he["history"][1]["participants"], all, "{he:#}");
    // Who decrypted round 2: key parties that answered, never site-3.
    let decryptors = he["history"][1]["roles"]["decryptors"].as_array().cloned().unwrap_or_default();
    assert!(decryptors.len() >= 3 && !decryptors.contains(&serde_json::json!("site-3")), "{he:#}");
    let why = he["history"][1]["dropped"]["site-3"].as_str().unwrap_or_default();
    assert!(why.starts_with("he-hash"), "{why}\n{he:#}");
    // The key was dealt with the setup statistics (round 0); the training
    // rounds reuse it: hash and decryption stages only.
    let metrics = &he["history"][0]["metrics"];
    assert!(metrics.get("stage_he_decrypt_ms").is_some() && metrics.get("stage_he_key_deal_ms").is_none(), "{he:#}");
    // (The metrics above show the he stages ran; the log names the
    // dropped party's stage.)
    assert!(log.contains("he-hash"), "{log}");
    // The same sums under secagg: site-3 leaves before round 3's masked input.
    let (sa, sa_model, _) = run("secagg", ("site-3", "secagg-masked-input", 3));
    assert_eq!(sa["history"][1]["participants"], all, "{sa:#}");
    let (a, b) = (he["metrics"]["accuracy"].as_f64().unwrap_or(0.0), sa["metrics"]["accuracy"].as_f64().unwrap_or(1.0));
    assert!(a > 0.9 && (a - b).abs() <= 0.02, "he accuracy {a}, secagg {b}\n{he:#}");
    // Both decode the same weighted mean up to their fixed-point encodings.
    let diff = max_abs_diff(&he_model, &sa_model);
    assert!(diff < 0.05, "he and secagg models differ by {diff}");
}
