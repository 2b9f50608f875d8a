//! Joint inference end to end: an edge service whose signed deployment names
//! a cloud tier forwards its hard examples, encrypted to the cloud party's
//! signed key, through the coordinator; the answer comes back with its
//! provenance, every forwarded input is in the edge's audit log, an edge
//! whose policy does not allow the cloud flags its hard rows instead, and a
//! cloud party killed under load makes the edge answer itself, flagged,
//! without a failed request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use confide_bench::loadgen::request_once;
use confide_tests::{Federation, job_spec, repo_root};
use serde_json::Value;

fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (status, text) = rt.block_on(request_once(addr, "POST", path, body)).expect("http");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn wait_ready(fed: &Federation, addr: SocketAddr, service: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = rt.block_on(request_once(addr, "GET", "/healthz", "")).expect("http");
        let v: Value = serde_json::from_str(&text).expect("json");
        if v["services"][service]["ready"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "{service} never ready: {v}\n{}", fed.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects as site-1 (replacing its stream) and sends three forwards: one
/// to a party the deployment does not name; one sealed to the cloud's key
/// (as the coordinator, which relays that key, could) but not signed by the
/// party it names; and one sealed and signed by site-1, whose certificate
/// key this test holds, to a cloud that answers only site-0. Returns the
/// three answers' errors.
fn rogue_forwards(fed: &Federation) -> Vec<String> {
    use confide_crypto::secagg::protocol::IdentitySigner;
    use confide_proto::net::{ClientIdentity, connect};
    use confide_proto::pb::{self, coordinator_message, party_message, party_service_client::PartyServiceClient};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let (ca, cert, key) =
            (fed.path("pki/ca.pem"), fed.path("pki/parties/site-1.pem"), fed.path("pki/parties/site-1.key"));
        let url = format!("https://{}", fed.addr);
        let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
        let channel = connect(&id).await.expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let send = |body| pb::PartyMessage { body: Some(body) };
        tx.send(send(party_message::Body::Hello(pb::Hello::default()))).await.expect("hello");
        let mut inbound = PartyServiceClient::new(channel)
            .join(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("join")
            .into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // The cloud's key, as the coordinator relays it to every party.
        let cloud_key: [u8; 32] = loop {
            let msg = tokio::time::timeout_at(deadline, inbound.message()).await.expect("a cloud key").expect("stream");
            if let Some(coordinator_message::Body::CloudKey(a)) = msg.and_then(|m| m.body)
                && a.party == "cloud-0"
            {
                break a.key.expect("key").public_key.try_into().expect("32 bytes");
            }
        };
        let site_1_der = confide_proto::net::load_certs(&cert).expect("cert")[0].to_vec();
        let signer =
            confide_crypto::identity::IdentityKey::from_pem(&confide_crypto::pki::read_private_key(&key).expect("key"))
                .expect("key");
        let sealed_to_cloud = |request_id: u64, sign: bool| {
            let ctx = confide_party::serving::joint::context("site-1", "cloud-0", "triage", "triage-cloud", request_id);
            let mut plain = 30u32.to_le_bytes().to_vec();
            plain.extend(std::iter::repeat_n(0u8, 4 * 30));
            let (sealed, _) =
                confide_crypto::sealed::seal_request(&cloud_key, &ctx, &plain, &mut rand_core::OsRng).expect("seal");
            let transcript = confide_crypto::sealed::request_transcript(&ctx, &sealed);
            let signature = if sign { signer.sign(&transcript).expect("sign") } else { vec![7; 64] };
            pb::Forward {
                request_id,
                peer: "cloud-0".into(),
                service: "triage".into(),
                cloud_service: "triage-cloud".into(),
                ephemeral: sealed.ephemeral.to_vec(),
                ciphertext: sealed.ciphertext,
                signature,
                certificate: site_1_der.clone(),
            }
        };
        let elsewhere = pb::Forward {
            request_id: 1,
            peer: "site-0".into(),
            service: "triage".into(),
            cloud_service: "triage".into(),
            ephemeral: vec![9; 32],
            ciphertext: vec![0; 48],
            ..Default::default()
        };
        for f in [elsewhere, sealed_to_cloud(2, false), sealed_to_cloud(3, true)] {
            tx.send(send(party_message::Body::Forward(f))).await.expect("send");
        }
        let mut errors = vec![String::new(); 3];
        while errors.iter().any(String::is_empty) {
            let msg = tokio::time::timeout_at(deadline, inbound.message()).await.expect("answers").expect("stream");
            if let Some(coordinator_message::Body::ForwardAnswer(a)) = msg.and_then(|m| m.body) {
                assert!(a.ciphertext.is_empty(), "answered: {a:?}");
                errors[(a.request_id - 1) as usize] = a.error;
            }
        }
        errors
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    confide_party::serving::sha256_hex(bytes)
}

#[test]
fn hard_examples_go_to_the_cloud_encrypted_audited_and_only_where_policy_allows() {
    let names: Vec<String> = ["site-0", "site-1", "cloud-0"].iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    let edge = "[serve]\nservices = [\"triage\"]\nlisten = \"127.0.0.1:0\"\n";
    fed.start_party("site-0", &format!("{edge}[policy.share_inputs]\ntriage = [\"cloud-0\"]\n"));
    fed.start_party("site-1", edge);
    fed.start_party(
        "cloud-0",
        "[serve]\nservices = [\"triage-cloud\"]\nlisten = \"127.0.0.1:0\"\n[cloud]\nservices = [\"triage-cloud\"]\naccept_from = [\"site-0\"]\n",
    );
    let (a0, a1, ac) = (fed.party_endpoint("site-0"), fed.party_endpoint("site-1"), fed.party_endpoint("cloud-0"));
    let text = job_spec(&names, 3, 3, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.1");
    let id = fed.submit("joint.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());

    // The cloud model: round 3; the edge model: round 1, with a cloud tier
    // that finds almost every row hard.
    fed.run_ok(&["model", "deploy", "triage-cloud", "--job", &id, "--round", "3"]);
    wait_ready(&fed, ac, "triage-cloud");
    let out = fed.run_ok(&[
        "model",
        "deploy",
        "triage",
        "--job",
        &id,
        "--round",
        "1",
        "--cloud",
        "cloud-0",
        "--cloud-service",
        "triage-cloud",
        "--hard-examples",
        "confidence",
        "--threshold",
        "0.99999",
        "--timeout-ms",
        "5000",
    ]);
    assert!(out.contains("deployment 1"), "{out}");
    wait_ready(&fed, a0, "triage");
    wait_ready(&fed, a1, "triage");
    let services = fed.run_ok(&["model", "services", "triage", "--json"]);
    assert!(services.contains("\"cloud\":\"cloud-0\""), "{services}");
    let human = fed.run_ok(&["model", "services", "triage"]);
    assert!(human.contains("cloud cloud-0/triage-cloud (confidence 0.99999, 5000 ms)"), "{human}");

    let rows = confide_algorithms::data::Dataset::load_csv(
        &fed.path("data/site-0.csv"),
        &confide_algorithms::data::CsvOptions::default(),
    )
    .expect("rows");
    let five: Vec<&[f32]> = (0..5).map(|i| rows.row(i)).collect();
    let body = serde_json::json!({ "rows": five }).to_string();
    let path = "/v1/services/triage/predict";

    // site-0 may share with cloud-0: its hard rows are the cloud's answers,
    // which are the round-3 model's.
    let (status, v) = post(a0, path, &body);
    assert_eq!(status, 200, "{v}");
    let by: Vec<&str> =
        v["provenance"]["answered_by"].as_array().expect("rows").iter().filter_map(|x| x.as_str()).collect();
    let hard: Vec<bool> = v["hard"].as_array().expect("rows").iter().map(|h| h == true).collect();
    assert!(by.contains(&"cloud"), "{v}\n{}", fed.logs());
    assert_eq!(v["provenance"]["cloud"]["party"], "cloud-0", "{v}");
    assert_eq!(v["provenance"]["cloud"]["round"], 3, "{v}");
    assert_eq!(v["version"]["round"], 1, "{v}");
    let m3 = fed.path("round-3.safetensors");
    fed.run_ok(&["job", "model", &id, "--round", "3", "--out", m3.to_str().expect("utf-8")]);
    let params = confide_algorithms::Parameters::from_safetensors(&std::fs::read(&m3).expect("model")).expect("model");
    let cloud_model = confide_party::trainers::BuiltinTrainers::default()
        .inference_model(&confide_algorithms::ModelConfig::logistic_regression(2), &params)
        .expect("model");
    let mut forwarded_rows: Vec<f32> = Vec::new();
    for (i, row) in five.iter().enumerate() {
        let got: Vec<f64> = v["probabilities"][i].as_array().expect("row").iter().filter_map(Value::as_f64).collect();
        if by[i] == "cloud" {
            assert!(hard[i]);
            let want = cloud_model.predict(row).expect("predict");
            for (a, b) in got.iter().zip(&want) {
                assert!((a - f64::from(*b)).abs() < 1e-6, "row {i}: {got:?} vs {want:?}");
            }
            forwarded_rows.extend_from_slice(row);
        }
    }
    // The audit log holds the forwarded rows' hash, the destination and its
    // certificate's fingerprint; the input itself is not in it.
    let audit = confide_party::audit::AuditLog::read(&fed.path("pki/parties/site-0.audit.jsonl")).expect("audit");
    assert_eq!(audit.len(), 1, "{audit:?}");
    let cloud_der = confide_proto::net::load_certs(&fed.path("pki/parties/cloud-0.pem")).expect("cert")[0].to_vec();
    let a = &audit[0];
    assert_eq!((a.service.as_str(), a.destination.as_str()), ("triage", "cloud-0"));
    assert_eq!(a.destination_certificate_sha256, sha256_hex(&cloud_der));
    assert_eq!(a.input_sha256, confide_party::audit::rows_sha256(&forwarded_rows));
    assert_eq!(a.rows, forwarded_rows.len() / 30);

    // site-1's policy does not name cloud-0: its hard rows are its own
    // answers, flagged, and nothing leaves it.
    let (status, v) = post(a1, path, &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["provenance"]["answered_by"].as_array().expect("rows").iter().all(|x| x == "edge"), "{v}");
    assert!(v["hard"].as_array().expect("rows").iter().any(|h| h == true), "{v}");
    assert!(v["provenance"]["fallback"].as_str().unwrap_or("").contains("policy.share_inputs"), "{v}");
    assert!(
        confide_party::audit::AuditLog::read(&fed.path("pki/parties/site-1.audit.jsonl")).expect("audit").is_empty()
    );

    // A party cannot use the coordinator to send inputs anywhere else than
    // the cloud tier the service's signed deployment names; the cloud party
    // answers no request its named sender did not sign (what the coordinator
    // could make up, holding the cloud's key), and, with accept_from, none
    // from a party it does not list.
    let answers = rogue_forwards(&fed);
    assert!(answers[0].contains("does not send hard examples to site-0"), "{answers:?}");
    assert!(answers[1].contains("a request site-1 did not sign"), "{answers:?}\n{}", fed.logs());
    assert!(answers[2].contains("site-1 is not in this party's [cloud] accept_from"), "{answers:?}");

    // The cloud party is killed while four clients keep site-0 busy: no
    // request fails; rows the cloud answered before, the edge after
    // (flagged; requests in flight at the kill wait out the timeout).
    let load = fed.start_load(&a0.to_string(), "triage", "site-0", 4, 3);
    std::thread::sleep(Duration::from_millis(1200));
    fed.kill_party("cloud-0");
    let report = load.report();
    assert_eq!(report["failures"], 0, "{report}\n{}", fed.logs());
    assert!(report["rows_from_cloud"].as_u64() > Some(0), "{report}");
    assert!(report["rows_edge_fallback"].as_u64() > Some(0), "{report}");

    // site-0's serving report reaches the coordinator (every 10 s while
    // it changes): counts only, with the forwarded rows among them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let serving = loop {
        let out = fed.run_ok(&["model", "services", "triage", "--json"]);
        let current: Value = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["current"] == true)
            .expect("the current deployment");
        let s = current["serving"].clone();
        if s["cloud_rows"].as_u64() >= report["rows_from_cloud"].as_u64() && s["requests"].as_u64() > Some(0) {
            break s;
        }
        assert!(Instant::now() < deadline, "no serving report with the load's rows: {current}\n{report}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(serving["parties"].as_array().expect("parties").iter().any(|p| p == "site-0"), "{serving}");
    assert!(serving["edge_hard_rows"].as_u64() >= report["rows_edge_fallback"].as_u64(), "{serving}\n{report}");

    // Once the coordinator knows it is gone, site-0 answers itself at once:
    // the reason is "not connected", not the timeout's "no answer within"
    // (no timing asserted: the reason says which path ran).
    let (status, v) = post(a0, path, &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["provenance"]["answered_by"].as_array().expect("rows").iter().all(|x| x == "edge"), "{v}");
    let why = v["provenance"]["fallback"].as_str().unwrap_or("");
    assert!(why.contains("cloud-0") && why.contains("not connected") && !why.contains("within"), "{v}");
}
