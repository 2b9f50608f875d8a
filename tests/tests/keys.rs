//! Keys stay with their owners: a party whose key was made on its own
//! machine (`confide-party keygen`), certified from its request alone
//! (`confide certs sign`, where the CA key is kept), takes part in a secure
//! job run by a coordinator whose directory holds neither the CA key nor any
//! party's key.

use std::os::unix::fs::PermissionsExt;

use confide_tests::{Federation, job_spec, repo_root};

#[test]
fn a_party_keyed_on_its_own_machine_joins_a_secure_job_run_without_the_ca_key() {
    let three = ["hospital-a", "hospital-b", "hospital-c"];
    let mut fed = Federation::new(&three, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");

    // On hospital-d's machine: its key and a request. Only the request travels.
    let machine = fed.path("hospital-d-machine");
    let out = std::process::Command::new(&fed.party_bin)
        .args(["keygen", "--name", "hospital-d", "--out", machine.to_str().expect("utf-8")])
        .output()
        .expect("keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The key's fingerprint, read to the administrator out of band.
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let print = said
        .lines()
        .find_map(|l| l.strip_prefix("key fingerprint: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fingerprint printed: {said}"))
        .to_owned();
    let key = machine.join("hospital-d.key");
    assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);

    // Where the CA key is kept: sign the request, enroll the party.
    let csr = machine.join("hospital-d.csr");
    let csr_arg = csr.to_str().expect("utf-8");
    // Another fingerprint or another name than the request's: refused,
    // nothing enrolled.
    let wrong_print = "0".repeat(64);
    let pki = fed.s("pki");
    for args in [["--fingerprint", wrong_print.as_str()], ["--name", "hospital-e"]] {
        let mut cmd = vec!["certs", "sign", "--ca", pki.as_str(), "--csr", csr_arg];
        cmd.extend(args);
        let out = fed.cli(&cmd);
        assert!(!out.status.success(), "{args:?} signed");
        assert!(!fed.path("pki/parties/hospital-d.pem").exists(), "{args:?}");
    }
    let signed = fed.run_ok(&[
        "certs",
        "sign",
        "--ca",
        &fed.s("pki"),
        "--csr",
        csr_arg,
        "--name",
        "hospital-d",
        "--fingerprint",
        &print,
    ]);
    assert!(signed.contains("signed and enrolled party hospital-d"), "{signed}");
    assert!(signed.contains(&format!("its key's fingerprint: {print}")), "{signed}");
    assert!(!fed.path("pki/parties/hospital-d.key").exists(), "the CA side never had the key");
    std::fs::copy(fed.path("pki/parties/hospital-d.pem"), machine.join("hospital-d.pem")).expect("cert to party");
    std::fs::copy(fed.path("data/hospital-a.csv"), fed.path("data/hospital-d.csv")).expect("data");

    // The coordinator's host: CA certificate, its own pair, the enrollment list. No other key.
    let coord = fed.path("coordinator-pki");
    std::fs::create_dir_all(&coord).expect("dir");
    for f in ["ca.pem", "coordinator.pem", "coordinator.key", "federation.toml"] {
        std::fs::copy(fed.path(&format!("pki/{f}")), coord.join(f)).expect("copy");
    }
    std::fs::set_permissions(coord.join("coordinator.key"), std::fs::Permissions::from_mode(0o600)).expect("mode");
    let keys: Vec<_> = std::fs::read_dir(&coord)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".key"))
        .collect();
    assert_eq!(keys, ["coordinator.key"]);
    fed.coordinator_pki = Some(coord);
    fed.start_coordinator();
    for n in three {
        fed.start_party(n, "[policy]\naggregation = [\"secagg\"]\n");
    }
    // hospital-d's config points at its own machine's files.
    let cfg = fed.party_config("hospital-d", "[policy]\naggregation = [\"secagg\"]\n");
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "cert = \"pki/parties/hospital-d.pem\"\nkey = \"pki/parties/hospital-d.key\"",
        "cert = \"hospital-d-machine/hospital-d.pem\"\nkey = \"hospital-d-machine/hospital-d.key\"",
    );
    std::fs::write(&cfg, text).expect("config");
    fed.start_party_with_config("hospital-d", &cfg);

    let names: Vec<String> = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"].map(String::from).to_vec();
    let spec = job_spec(&names, 4, 2, "kind = \"logistic_regression\"\nclasses = 2", "")
        + "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\n";
    let id = fed.submit("job.toml", &spec);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["history"][1]["participants"], serde_json::json!(names));
}
