//! Certificate revocation end to end: the CA revokes a party's certificate;
//! the running coordinator closes that party's stream, refuses its
//! reconnections, and sends the new list to the other parties, which keep
//! it on disk and bind its version into every secure round they then run.

use std::time::{Duration, Instant};

use confide_crypto::revocation::Revocations;
use confide_tests::{Federation, job_spec, repo_root};

fn eventually(what: &str, fed: &Federation, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(40), "{what} did not happen\n{}", fed.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_revoked_party_is_cut_off_and_the_others_hold_and_bind_the_new_list() {
    let five = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"];
    let four = &five[..4];
    let mut fed = Federation::new(&five, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1,1,1");
    fed.start_coordinator();
    for n in five {
        fed.start_party(n, "[policy]\naggregation = [\"secagg\"]\n");
    }
    eventually("five parties connecting", &fed, || fed.coordinator_log().matches("party connected").count() >= 5);

    // Where the CA key is kept (here the same directory the coordinator serves from).
    let out = fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "hospital-d"]);
    assert!(out.contains("revocation list version 1"), "{out}");
    let enrolled = std::fs::read_to_string(fed.path("pki/federation.toml")).expect("enrollment");
    assert!(!enrolled.contains("hospital-d"), "{enrolled}");

    // The running coordinator closes d's stream and refuses it from then on.
    eventually("the revoked party's stream closing", &fed, || {
        fed.coordinator_log().contains("closing the stream: party hospital-d: its certificate is revoked")
    });
    eventually("the revoked party's reconnection being refused", &fed, || {
        fed.coordinator_log().contains("refused connection: the certificate of hospital-d is revoked")
    });

    // Every other party received the list, checked the CA's signature, and kept it.
    let ca = std::fs::read(fed.path("pki/ca.pem")).expect("ca");
    for n in &four[..3] {
        let kept = fed.path(&format!("pki/parties/{n}.crl.pem"));
        eventually(&format!("{n} keeping the list"), &fed, || kept.exists());
        let list = Revocations::parse(&std::fs::read(&kept).expect("list"), &ca, "kept").expect("a CA-signed list");
        assert_eq!((list.version(), list.len()), (1, 1), "{n}");
    }

    // A secure job among the others: each round is bound to version 1 on
    // every side, so it completes.
    let names: Vec<String> = four[..3].iter().map(|s| s.to_string()).collect();
    let text = job_spec(&names, 3, 1, "kind = \"logistic_regression\"\nclasses = 2", "seed = 1")
        + "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\nclip = 4.0\n";
    let id = fed.submit("after-revocation.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());

    // De-enrolment alone (no revocation) closes the party's stream too.
    let enrolled = std::fs::read_to_string(fed.path("pki/federation.toml")).expect("enrollment");
    std::fs::write(fed.path("pki/federation.toml"), enrolled.replace("\"hospital-e\",", "")).expect("enrollment");
    eventually("the de-enrolled party's stream closing", &fed, || {
        fed.coordinator_log().contains("closing the stream: party hospital-e is no longer enrolled")
    });

    // The CA revokes the coordinator's own certificate. The coordinator
    // pushes the list (version 2) like any other; a party that holds it
    // drops the connection and refuses the coordinator at every handshake
    // from then on, whatever the coordinator does.
    let out = fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "--coordinator"]);
    assert!(out.contains("revoked the coordinator's certificate: revocation list version 2"), "{out}");
    let party_log = || std::fs::read_to_string(fed.path("logs/hospital-a.log")).unwrap_or_default();
    eventually("the party refusing the revoked coordinator", &fed, || {
        let log = party_log();
        log.contains("coordinator misbehaved: its certificate is revoked (revocation list version 2)")
            && log.contains("invalid peer certificate: Revoked")
    });
    // The administrator's CLI reads the CA directory's list and refuses the
    // coordinator too.
    let refused = fed.cli(&["job", "list"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("Revoked"), "{err}");
}

/// A certificate that expires while its stream is open: the handshake
/// checked it once, and the coordinator's watcher closes the stream once it
/// has expired (found by review); the party's reconnection is then refused
/// at the handshake.
#[test]
fn a_party_whose_certificate_expires_while_connected_is_cut_off() {
    use std::os::unix::fs::PermissionsExt;
    let three = ["hospital-a", "hospital-b", "hospital-c"];
    let mut fed = Federation::new(&three, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    // hospital-c's certificate, reissued to expire in a few seconds.
    let pki = confide_crypto::pki::PkiDir::new(fed.path("pki"));
    let now = time::OffsetDateTime::now_utc();
    let issued = pki
        .load_ca()
        .expect("CA")
        .issue_with_validity(
            confide_crypto::pki::Role::Party,
            "hospital-c",
            &[],
            now - time::Duration::hours(1),
            now + time::Duration::seconds(12),
        )
        .expect("issue");
    std::fs::write(pki.party_cert("hospital-c"), &issued.cert_pem).expect("cert");
    let key = pki.party_key("hospital-c");
    std::fs::write(&key, issued.key_pem.as_bytes()).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("mode");
    fed.start_party("hospital-c", "");
    eventually("hospital-c connecting", &fed, || fed.coordinator_log().contains("party connected"));
    eventually("the expired certificate's stream closing", &fed, || {
        fed.coordinator_log().contains("closing the stream: party hospital-c: its certificate has expired")
    });
    // Its reconnection is refused, at the handshake or on a connection it
    // kept open; it never joins again.
    eventually("the expired certificate's rejoin being refused", &fed, || {
        let log = fed.coordinator_log();
        // (rustls's own words at the handshake: "certificate expired", or
        // "Expired" in its debug form.)
        log.contains("the certificate of hospital-c has expired")
            || log.contains("certificate expired")
            || log.contains("Expired")
    });
    let after = fed.coordinator_log();
    let closed_at = after.find("its certificate has expired").expect("closed");
    assert_eq!(after[closed_at..].matches("party connected").count(), 0, "{after}");
}
