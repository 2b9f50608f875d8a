//! Hierarchical `he` aggregation: two `confide relay` processes with three
//! real parties each. Every relay sums its parties' ciphertexts and
//! forwards one per round; the coordinator admits each relayed stream only
//! with the party's delegation, and the job reaches the accuracy of a
//! direct one.

use confide_tests::{Federation, job_spec, repo_root};

/// Three parties with thirds of the breast-cancer rows, and a coordinator.
fn three_sites() -> Federation {
    let mut fed = Federation::new(
        &["site-0", "site-1", "site-2"],
        &repo_root().join("examples/data/breast_cancer.csv"),
        true,
        "1,1,1",
    );
    fed.start_coordinator();
    fed
}

const LOGREG2: &str = "kind = \"logistic_regression\"\nclasses = 2";

#[test]
fn two_relays_of_three_parties_sum_their_ciphertexts_and_the_job_succeeds() {
    let names: Vec<String> = (0..6).map(|i| format!("site-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "3,2,2,2,1,2");
    fed.start_coordinator();
    let relays = [fed.start_relay("edge-a"), fed.start_relay("edge-b")];
    for (i, n) in names.iter().enumerate() {
        let mut extra = "[policy]\naggregation = [\"he\"]\n".to_owned();
        // site-4 exits when round 3's fit task reaches it: its relay must
        // not wait for it, and forwards the other two's sum.
        if n == "site-4" {
            extra.push_str("[fault]\nexit_on_stage = \"fit\"\nexit_on_round = 3\n");
        }
        fed.start_party_via(n, ["edge-a", "edge-b"][i / 3], &relays[i / 3], &extra);
    }
    let text = job_spec(&names, 4, 3, LOGREG2, "seed = 4\nlocal_epochs = 2\nlearning_rate = 0.1")
        + "[aggregation]\nprotocol = \"he\"\n[aggregation.he]\nmax_examples = 1000\nclip = 4.0\n";
    let id = fed.submit("he-relay.toml", &text);
    let st = fed.wait_done(&id, 240);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let all = serde_json::json!(names);
    for round in 0..2 {
        assert_eq!(st["history"][round]["participants"], all, "round {round}: {st:#}\n{}", fed.logs());
    }
    let without_4 = serde_json::json!(["site-0", "site-1", "site-2", "site-3", "site-5"]);
    assert_eq!(st["history"][2]["participants"], without_4, "{st:#}\n{}", fed.logs());
    // The status names each relay's group and who decrypted.
    let roles = &st["history"][1]["roles"];
    assert_eq!(roles["relay edge-a"], serde_json::json!(names[..3]), "{st:#}");
    assert_eq!(roles["relay edge-b"], serde_json::json!(names[3..]), "{st:#}");
    assert_eq!(st["history"][2]["roles"]["relay edge-b"], serde_json::json!(["site-3", "site-5"]), "{st:#}");
    let decryptors = roles["decryptors"].as_array().cloned().unwrap_or_default();
    assert!(
        decryptors.len() >= 4 && decryptors.iter().all(|d| all.as_array().is_some_and(|a| a.contains(d))),
        "{st:#}"
    );
    let text = fed.run_ok(&["job", "status", &id]);
    assert!(text.contains("decryptors: site-") && text.contains("relay edge-b: site-3, site-5"), "{text}");
    let accuracy = st["metrics"]["accuracy"].as_f64().unwrap_or(0.0);
    assert!(accuracy > 0.9, "accuracy {accuracy}\n{st:#}");
    // Each party's stream came through its relay, admitted on its delegation.
    let log = fed.coordinator_log();
    for (i, n) in names.iter().enumerate() {
        let relay = ["edge-a", "edge-b"][i / 3];
        assert!(
            log.lines().any(|l| l.contains("through a relay") && l.contains(relay) && l.contains(n.as_str())),
            "{n} via {relay}:\n{log}"
        );
    }
    // Each relay forwarded one sum of its three parties per he round (the
    // keygen round with the setup statistics, then training and evaluation).
    for relay in ["edge-a", "edge-b"] {
        let text = std::fs::read_to_string(fed.path(&format!("logs/relay-{relay}.log"))).unwrap_or_default();
        let sums = text.lines().filter(|l| l.contains("forwarding a group sum") && l.contains("members=3")).count();
        assert!(sums >= 3, "relay {relay} forwarded {sums} sums of three:\n{text}");
        // Never a wait for the hold time: a member that left is not waited for.
        assert!(!text.contains("hold time over"), "{text}");
    }
    // Revoking a relay closes every stream it carries, and its parties,
    // given the new list, refuse it at the handshake from then on.
    fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "--relay", "edge-a"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = fed.coordinator_log();
        let expelled = ["site-0", "site-1", "site-2"]
            .iter()
            .all(|p| log.contains(&format!("party {p}: its relay edge-a's certificate is revoked")));
        let refused = ["site-0", "site-1", "site-2"].iter().all(|p| {
            let log = std::fs::read_to_string(fed.path(&format!("logs/{p}.log"))).unwrap_or_default();
            log.contains("invalid peer certificate: Revoked")
        });
        if expelled && refused {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "relay edge-a not cut off:\n{}", fed.logs());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Opens a party stream at the coordinator as relay `relay`, carrying
/// `party`'s certificate and the given delegation; returns the party name
/// the coordinator welcomed, or its refusal.
async fn relayed_join(
    fed: &Federation,
    relay: &str,
    party: &str,
    (signature, nonce): (&[u8], &[u8]),
    time: u64,
) -> Result<String, String> {
    use confide_proto::net::{ClientIdentity, connect};
    use confide_proto::pb::{self, coordinator_message, party_message, party_service_client::PartyServiceClient};
    let (ca, cert, key) = (
        fed.path("pki/ca.pem"),
        fed.path(&format!("pki/relays/{relay}.pem")),
        fed.path(&format!("pki/relays/{relay}.key")),
    );
    let url = format!("https://{}", fed.addr);
    let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
    let channel = connect(&id).await.map_err(|e| e.to_string())?;
    let party_pem = std::fs::read(fed.path(&format!("pki/parties/{party}.pem"))).map_err(|e| e.to_string())?;
    let der =
        confide_proto::net::load_certs(&fed.path(&format!("pki/parties/{party}.pem"))).map_err(|e| e.to_string())?;
    assert!(!party_pem.is_empty());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PartyMessage { body: Some(party_message::Body::Hello(pb::Hello::default())) }).await.ok();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let meta = req.metadata_mut();
    meta.insert_bin("confide-party-cert-bin", tonic::metadata::MetadataValue::from_bytes(der[0].as_ref()));
    if !signature.is_empty() {
        meta.insert_bin("confide-delegation-bin", tonic::metadata::MetadataValue::from_bytes(signature));
    }
    meta.insert_bin("confide-delegation-nonce-bin", tonic::metadata::MetadataValue::from_bytes(nonce));
    meta.insert("confide-delegation-time", time.to_string().parse().expect("ascii"));
    let mut inbound =
        PartyServiceClient::new(channel).join(req).await.map_err(|s| s.message().to_string())?.into_inner();
    let first = inbound.message().await.map_err(|s| s.message().to_string())?;
    drop(tx);
    match first.and_then(|m| m.body) {
        Some(coordinator_message::Body::Welcome(w)) => Ok(w.party),
        other => Err(format!("unexpected {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_admits_a_relayed_party_only_on_its_delegation_to_that_relay() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut fed = three_sites();
    fed.run_ok(&["certs", "relay", "--dir", &fed.s("pki"), "--name", "edge-a"]);
    fed.run_ok(&["certs", "relay", "--dir", &fed.s("pki"), "--name", "edge-b"]);
    let key = confide_crypto::pki::read_private_key(&fed.path("pki/parties/site-0.key")).expect("key");
    let key = confide_crypto::identity::IdentityKey::from_pem(&key).expect("key");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let sign =
        |relay: &str, time: u64| confide_crypto::relay::sign_delegation(&key, "site-0", relay, time).expect("sign");
    let (sig, nonce) = sign("edge-a", now);
    let to_a = (sig.as_slice(), nonce.as_slice());
    // The relay it delegated to is admitted as site-0.
    assert_eq!(relayed_join(&fed, "edge-a", "site-0", to_a, now).await.as_deref(), Ok("site-0"));
    // Once: the same relay cannot replay it for a second stream.
    let e = relayed_join(&fed, "edge-a", "site-0", to_a, now).await.unwrap_err();
    assert!(e.contains("replayed a delegation of site-0"), "{e}");
    // Nor after the coordinator restarts: the nonces are in its database.
    tokio::task::block_in_place(|| {
        fed.kill_coordinator();
        fed.start_coordinator();
    });
    let e = relayed_join(&fed, "edge-a", "site-0", to_a, now).await.unwrap_err();
    assert!(e.contains("replayed a delegation of site-0"), "{e}");
    // Another relay cannot reuse a delegation, nor claim another party with it.
    let (sig, nonce) = sign("edge-a", now);
    let e = relayed_join(&fed, "edge-b", "site-0", (&sig, &nonce), now).await.unwrap_err();
    assert!(e.contains("relay edge-b") && e.contains("did not sign"), "{e}");
    let e = relayed_join(&fed, "edge-a", "site-1", (&sig, &nonce), now).await.unwrap_err();
    assert!(e.contains("site-1") && e.contains("did not sign"), "{e}");
    // No delegation, or a stale one.
    let e = relayed_join(&fed, "edge-a", "site-0", (&[], &nonce), now).await.unwrap_err();
    assert!(e.contains("no confide-delegation-bin"), "{e}");
    let old = now - 3600;
    let (sig, nonce) = sign("edge-a", old);
    let e = relayed_join(&fed, "edge-a", "site-0", (&sig, &nonce), old).await.unwrap_err();
    assert!(e.contains("from now"), "{e}");
    // A party that is not enrolled (its certificate still valid), and a
    // revoked one, are refused even on a fresh delegation of their own.
    let federation = fed.path("pki/federation.toml");
    let text = std::fs::read_to_string(&federation).expect("enrollment list");
    let without = text.replace("  \"site-2\",\n", "");
    assert_ne!(without, text, "site-2 was enrolled");
    std::fs::write(&federation, without).expect("enrollment list");
    let key_of = |party: &str| {
        let pem = confide_crypto::pki::read_private_key(&fed.path(&format!("pki/parties/{party}.key"))).expect("key");
        confide_crypto::identity::IdentityKey::from_pem(&pem).expect("key")
    };
    let (sig, nonce) =
        confide_crypto::relay::sign_delegation(&key_of("site-2"), "site-2", "edge-a", now).expect("sign");
    let e = relayed_join(&fed, "edge-a", "site-2", (&sig, &nonce), now).await.unwrap_err();
    assert!(e.contains("site-2 (through relay edge-a) is not enrolled"), "{e}");
    fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "site-1"]);
    tokio::task::block_in_place(|| fed.wait_for_log("revocation list updated", 20));
    let (sig, nonce) =
        confide_crypto::relay::sign_delegation(&key_of("site-1"), "site-1", "edge-a", now).expect("sign");
    let e = relayed_join(&fed, "edge-a", "site-1", (&sig, &nonce), now).await.unwrap_err();
    assert!(e.contains("relay edge-a") && e.contains("site-1") && e.contains("revoked"), "{e}");
    // An admin API client with the certificate and key under `pki/{holder}`.
    let admin_as = |holder: &str| {
        let (ca, cert, key) =
            (fed.path("pki/ca.pem"), fed.path(&format!("pki/{holder}.pem")), fed.path(&format!("pki/{holder}.key")));
        let url = format!("https://{}", fed.addr);
        async move {
            let id = confide_proto::net::ClientIdentity {
                url: &url,
                server_name: "localhost",
                ca: &ca,
                cert: &cert,
                key: &key,
            };
            let channel = confide_proto::net::connect(&id).await.expect("connect");
            confide_proto::pb::admin_service_client::AdminServiceClient::new(channel)
        }
    };
    // A relay certificate does not open the admin API.
    let mut admin = admin_as("relays/edge-a").await;
    let refused = admin.list_jobs(confide_proto::pb::ListJobsRequest {}).await.expect_err("relay is not admin");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Nor does a party's.
    let mut as_party = admin_as("parties/site-0").await;
    let refused = as_party.list_jobs(confide_proto::pb::ListJobsRequest {}).await.expect_err("a party is not admin");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // The administrator's requests name job ids and services that are ones
    // (refused, the echo bounded, before any lookup).
    let mut as_admin = admin_as("admin").await;
    let long = "x".repeat(100_000);
    for bad in [long.as_str(), "j1\nforged", ""] {
        let e = as_admin
            .get_job(confide_proto::pb::JobRef { job_id: bad.into(), ..Default::default() })
            .await
            .expect_err("not a job id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("is not a job id") && e.message().len() < 300, "{}", e.message());
    }
    let e = as_admin
        .list_services(confide_proto::pb::ListServicesRequest { service: long.clone() })
        .await
        .expect_err("not a service");
    assert!(e.message().starts_with("service:") && e.message().len() < 300, "{}", e.message());
    let log = fed.coordinator_log();
    assert!(log.contains("refused a stream through the relay"), "{log}");
}

/// A relay dials only the coordinator: one whose upstream address leads to
/// another relay (a rogue server with a certificate of the federation, but
/// not the coordinator's) refuses to open the party's stream there, and the
/// party never reaches the coordinator through it.
#[test]
fn a_relay_refuses_an_upstream_without_the_coordinator_certificate() {
    let mut fed = three_sites();
    let genuine = fed.start_relay("edge-b");
    let rogue = fed.start_relay_to("edge-a", &format!("https://{genuine}"));
    fed.start_party_via("site-0", "edge-a", &rogue, "");
    let log = |name: &str| std::fs::read_to_string(fed.path(&format!("logs/{name}.log"))).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Refused at the handshake (every one: the channel reconnects by itself).
    let refusal = "the server shows a Relay certificate (edge-b), not one of [Coordinator]";
    while !(log("relay-edge-a").contains(refusal) || log("site-0").contains(refusal)) {
        assert!(std::time::Instant::now() < deadline, "{}", fed.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !fed.coordinator_log().lines().any(|l| l.contains("party connected") && l.contains("site-0")),
        "{}",
        fed.logs()
    );
    // Nor does the administrator's CLI talk to a relay given as the
    // coordinator (a relay's certificate is also the CA's and names
    // localhost too): what it signs must not rest on a relay's answers.
    let out = fed.cli(&["job", "list", "--coordinator", &format!("https://{genuine}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Relay certificate (edge-b)"), "{err}");
    fed.run_ok(&["job", "list"]);
}

/// A party talks through a relay only if its config names that relay: one
/// that names another relay, and one that names none, both refuse the relay
/// their address leads to (its certificate says who it is), while a party
/// that names it connects through it.
#[test]
fn a_party_refuses_a_relay_its_config_does_not_name() {
    let mut fed = three_sites();
    let addr = fed.start_relay("edge-b");
    fed.start_party_via("site-0", "edge-a", &addr, "");
    let cfg = fed.party_config("site-1", "");
    let text = std::fs::read_to_string(&cfg).expect("config").replacen(
        &format!("coordinator = \"https://{}\"", fed.addr),
        &format!("coordinator = \"https://{addr}\""),
        1,
    );
    std::fs::write(&cfg, text).expect("config");
    fed.start_party_with_config("site-1", &cfg);
    fed.start_party_via("site-2", "edge-b", &addr, "");
    let log = |party: &str| std::fs::read_to_string(fed.path(&format!("logs/{party}.log"))).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let connected = fed.coordinator_log().lines().any(|l| l.contains("party connected") && l.contains("site-2"));
        let refused_0 = log("site-0").contains("is relay edge-b, not the configured relay edge-a");
        let refused_1 = log("site-1").contains("is relay edge-b, which this party's config does not name");
        if connected && refused_0 && refused_1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", fed.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let coordinator = fed.coordinator_log();
    for refused in ["site-0", "site-1"] {
        assert!(
            !coordinator.lines().any(|l| l.contains("party connected") && l.contains(refused)),
            "{refused} reached the coordinator through a relay it did not name\n{coordinator}"
        );
    }
}
