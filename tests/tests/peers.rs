//! Who may connect, and what happens to peers that send garbage.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use confide_algorithms::data::DatasetSource;
use confide_algorithms::{Error as AlgoError, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Parameters, Trainer};
use confide_crypto::pki::{PkiDir, Role};
use confide_party::config::PartyConfig;
use confide_party::node::PartyNode;
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::jobspec::JobSpec;
use confide_proto::pb::party_service_client::PartyServiceClient;
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_tests::{Federation, job_spec, repo_root};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn breast_cancer() -> std::path::PathBuf {
    repo_root().join("examples/data/breast_cancer.csv")
}

/// Opens the party stream with the given client identity (or none) and returns
/// the first message or the error.
async fn try_join(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    first: Vec<pb::PartyMessage>,
) -> Result<pb::CoordinatorMessage, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).map_err(|e| e.to_string())?))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).map_err(|e| e.to_string())?,
            std::fs::read(key).map_err(|e| e.to_string())?,
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = PartyServiceClient::new(channel).max_encoding_message_size(64 << 20);
    let expect_reaction = !first.is_empty();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in first {
        tx.send(m).await.map_err(|e| e.to_string())?;
    }
    let mut inbound = client.join(ReceiverStream::new(rx)).await.map_err(|s| s.message().to_string())?.into_inner();
    // With nothing to send, the first message (Welcome) is the answer. Otherwise
    // keep the sender open until the coordinator reacts to what we sent.
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut welcome = None;
        loop {
            match inbound.message().await {
                Ok(Some(m)) if !expect_reaction => return Ok(m),
                Ok(Some(m)) => welcome = welcome.or(Some(m)),
                Ok(None) => return Err("stream closed".to_string()),
                Err(s) => return Err(s.message().to_string()),
            }
        }
    })
    .await;
    drop(tx);
    r.unwrap_or_else(|_| Err("no reaction within 10 s".into()))
}

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_foreign_ca_unenrolled_expired_and_certless_clients() {
    let (fed, pki) = one_hospital();
    let ca = pki.ca_cert();

    // The enrolled party gets in.
    let hello = || vec![pb::PartyMessage { body: Some(party_message::Body::Hello(pb::Hello::default())) }];
    let ok =
        try_join(&fed.addr, &ca, Some((&pki.party_cert("hospital-a"), &pki.party_key("hospital-a"))), vec![]).await;
    assert!(matches!(ok, Ok(pb::CoordinatorMessage { body: Some(coordinator_message::Body::Welcome(_)) })), "{ok:?}");

    // Same name, another federation's CA.
    let other = PkiDir::new(fed.path("other-pki"));
    other.init("evil", &["hospital-a".into()], &[]).expect("other pki");
    let r = try_join(&fed.addr, &ca, Some((&other.party_cert("hospital-a"), &other.party_key("hospital-a"))), hello())
        .await;
    assert!(r.is_err(), "foreign CA accepted: {r:?}");

    // Signed by the right CA but not enrolled; and expired.
    let fed_ca = pki.load_ca().expect("ca");
    let write = |name: &str, issued: confide_crypto::pki::IssuedCert| {
        let (c, k) = (fed.path(&format!("{name}.pem")), fed.path(&format!("{name}.key")));
        std::fs::write(&c, &issued.cert_pem).expect("cert");
        std::fs::write(&k, issued.key_pem.as_bytes()).expect("key");
        (c, k)
    };
    let (c, k) = write("mallory", fed_ca.issue(Role::Party, "mallory", &[]).expect("issue"));
    let r = try_join(&fed.addr, &ca, Some((&c, &k)), hello()).await;
    assert!(r.is_err(), "unenrolled party accepted: {r:?}");
    let now = time::OffsetDateTime::now_utc();
    let expired = fed_ca
        .issue_with_validity(
            Role::Party,
            "hospital-a",
            &[],
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .expect("issue");
    let (c, k) = write("expired", expired);
    let r = try_join(&fed.addr, &ca, Some((&c, &k)), hello()).await;
    assert!(r.is_err(), "expired certificate accepted: {r:?}");

    // No client certificate at all.
    let r = try_join(&fed.addr, &ca, None, hello()).await;
    assert!(r.is_err(), "client without a certificate accepted: {r:?}");

    // The admin certificate cannot pose as a party.
    let r = try_join(&fed.addr, &ca, Some((&pki.admin_cert(), &pki.admin_key())), hello()).await;
    assert!(r.as_ref().is_err_and(|e| e.contains("not a party certificate")), "{r:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = fed.coordinator_log();
    for why in [
        "invalid peer certificate: UnknownIssuer",
        "party mallory is not enrolled",
        "certificate expired",
        "peer sent no certificates",
    ] {
        assert!(log.contains(why), "the coordinator log does not say {why:?}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_close_only_that_stream() {
    install_crypto();
    let mut fed = Federation::new(&["hospital-a", "hospital-b", "hospital-c"], &breast_cancer(), true, "1,1,1");
    fed.start_coordinator();
    let pki = PkiDir::new(fed.path("pki"));
    let (ca, cert, key) = (pki.ca_cert(), pki.party_cert("hospital-c"), pki.party_key("hospital-c"));

    let chunk = |len: usize| pb::PartyMessage {
        body: Some(party_message::Body::Chunk(pb::Chunk { transfer_id: 1, offset: 0, data: vec![0; len].into() })),
    };
    let r = try_join(&fed.addr, &ca, Some((&cert, &key)), vec![chunk(16)]).await;
    assert!(r.as_ref().is_err_and(|e| e.contains("chunk without an announced transfer")), "{r:?}");

    let lying = pb::PartyMessage {
        body: Some(party_message::Body::Result(pb::TaskResult {
            job_id: "x".into(),
            bulk: Some(pb::BulkHeader {
                transfer_id: 1,
                kind: pb::BulkKind::F32Tensors as i32,
                tensors: vec![pb::TensorSpec { name: "w".into(), shape: vec![1 << 40] }],
                total_bytes: 4 << 40,
            }),
            ..Default::default()
        })),
    };
    let r = try_join(&fed.addr, &ca, Some((&cert, &key)), vec![lying]).await;
    assert!(r.as_ref().is_err_and(|e| e.contains("limit exceeded")), "{r:?}");

    // Larger than the 4 MiB message limit: tonic refuses to decode it.
    let r = try_join(&fed.addr, &ca, Some((&cert, &key)), vec![chunk(5 << 20)]).await;
    assert!(r.is_err(), "oversized message accepted: {r:?}");

    // The coordinator still serves jobs.
    fed.start_party("hospital-a", "");
    fed.start_party("hospital-b", "");
    let names = vec!["hospital-a".to_string(), "hospital-b".to_string()];
    let id = fed.submit("job.toml", &job_spec(&names, 2, 2, "kind = \"logistic_regression\"\nclasses = 2", ""));
    let st = tokio::task::block_in_place(|| fed.wait_done(&id, 60));
    assert_eq!(st["state"], "succeeded", "{st:#}");
}

/// A running coordinator with one enrolled hospital, `hospital-a` (whose
/// node is not started), and its PKI directory.
fn one_hospital() -> (Federation, PkiDir) {
    install_crypto();
    let mut fed = Federation::new(&["hospital-a"], &breast_cancer(), true, "1");
    fed.start_coordinator();
    let pki = PkiDir::new(fed.path("pki"));
    (fed, pki)
}

/// A connection with `party`'s certificate; `window` sets its HTTP/2
/// stream window (0: the coordinator can send nothing on a stream, as to a
/// party that never reads).
async fn party_channel(addr: &str, pki: &PkiDir, party: &str, window: Option<u32>) -> tonic::transport::Channel {
    let pem = |p: &Path| std::fs::read(p).expect("pki file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(&pki.ca_cert())))
        .domain_name("localhost")
        .identity(Identity::from_pem(pem(&pki.party_cert(party)), pem(&pki.party_key(party))));
    let mut endpoint = Endpoint::from_shared(format!("https://{addr}")).expect("address").tls_config(tls).expect("tls");
    if window.is_some() {
        endpoint = endpoint.initial_stream_window_size(window);
    }
    endpoint.connect().await.expect("connect")
}

/// Opens a party stream on `channel` and keeps it open: what the test
/// sends, and what the coordinator sends back (or why it refused).
async fn join_on(
    channel: &tonic::transport::Channel,
) -> Result<(tokio::sync::mpsc::Sender<pb::PartyMessage>, tonic::Streaming<pb::CoordinatorMessage>), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let inbound = PartyServiceClient::new(channel.clone()).join(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

/// Opens a party stream with `party`'s certificate and keeps it open.
async fn open_stream(
    addr: &str,
    pki: &PkiDir,
    party: &str,
) -> (tokio::sync::mpsc::Sender<pb::PartyMessage>, tonic::Streaming<pb::CoordinatorMessage>) {
    join_on(&party_channel(addr, pki, party, None).await).await.expect("join")
}

/// [`open_stream`], with the coordinator's welcome read off it.
async fn open_welcomed(
    addr: &str,
    pki: &PkiDir,
    party: &str,
) -> (tokio::sync::mpsc::Sender<pb::PartyMessage>, tonic::Streaming<pb::CoordinatorMessage>) {
    let (tx, mut inbound) = open_stream(addr, pki, party).await;
    let welcome = inbound.message().await.expect("welcome");
    assert!(matches!(welcome, Some(pb::CoordinatorMessage { body: Some(coordinator_message::Body::Welcome(_)) })));
    (tx, inbound)
}

/// A connection outlives the lists the handshake checked it against, and a
/// party that stops reading could hold a closed stream open. Here a party
/// that never reads (its stream window 0) is revoked: a new stream it opens
/// on its open connection is refused, and its connection is cut once its
/// stream's close (sent ahead of its queue: the queue is not for a revoked
/// party) has not ended the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_party_that_stops_reading_is_cut_off_and_cannot_open_another_stream() {
    let (fed, pki) = one_hospital();
    let stuck = party_channel(&fed.addr, &pki, "hospital-a", Some(0)).await;
    let (_tx, mut never_read) = join_on(&stuck).await.expect("join");
    tokio::task::block_in_place(|| fed.wait_for_log("party connected", 10));
    fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "hospital-a"]);
    tokio::task::block_in_place(|| fed.wait_for_log("revocation list updated", 20));
    // Another stream on the same connection (no new handshake).
    let refused = join_on(&stuck).await.map(|_| ()).unwrap_err();
    assert!(refused.message().contains("hospital-a is revoked"), "{refused:?}");
    // The close, ahead of the queue, cannot be sent either; 5 s later the
    // connection is cut, and the stream (which can carry no message at a
    // window of 0) ends with the connection's error.
    let ended = tokio::time::timeout(Duration::from_secs(40), never_read.message()).await;
    let log = fed.coordinator_log();
    assert!(matches!(ended, Ok(Err(_))), "{ended:?}\n{log}");
    assert!(log.contains("party hospital-a: its certificate is revoked"), "{log}");
    assert!(log.contains("cutting its connection"), "{log}");
}

/// A party that ends its side of the stream and reads nothing more (its
/// stream window 0) is cut off too: the stream's close goes behind its
/// queue, then ahead of it, then the connection is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_that_ends_its_side_and_stops_reading_is_cut_off() {
    let (fed, pki) = one_hospital();
    let stuck = party_channel(&fed.addr, &pki, "hospital-a", Some(0)).await;
    let (tx, mut never_read) = join_on(&stuck).await.expect("join");
    drop(tx);
    let ended = tokio::time::timeout(Duration::from_secs(40), never_read.message()).await;
    let log = fed.coordinator_log();
    assert!(matches!(ended, Ok(Err(_))), "{ended:?}\n{log}");
    assert!(log.contains("party closed its stream") && log.contains("cutting its connection"), "{log}");
}

/// Through a relay too: a party that ends its side and reads nothing more
/// (its stream window 0) is cut off by the relay. The coordinator ends the
/// relay's stream for the party; the relay, which can send the party
/// nothing, ends the party's stream behind its queue, then ahead of it,
/// then cuts the party's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_that_stops_reading_through_a_relay_is_cut_off_by_the_relay() {
    let (mut fed, pki) = one_hospital();
    let relay = tokio::task::block_in_place(|| fed.start_relay("edge-a"));
    let stuck = party_channel(&relay, &pki, "hospital-a", Some(0)).await;
    let key = confide_crypto::pki::read_private_key(&pki.party_key("hospital-a")).expect("key");
    let key = confide_crypto::identity::IdentityKey::from_pem(&key).expect("key");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let (signature, nonce) =
        confide_crypto::relay::sign_delegation(&key, "hospital-a", "edge-a", now).expect("delegation");
    let hello = pb::Hello {
        relay_delegation: signature,
        delegation_nonce: nonce.to_vec(),
        delegation_time: now,
        ..Default::default()
    };
    // The relay answers the join once it has the hello.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::PartyMessage { body: Some(party_message::Body::Hello(hello)) }).await.expect("hello");
    let mut never_read = PartyServiceClient::new(stuck).join(ReceiverStream::new(rx)).await.expect("join").into_inner();
    tokio::task::block_in_place(|| fed.wait_for_log("party connected", 10));
    drop(tx);
    let ended = tokio::time::timeout(Duration::from_secs(60), never_read.message()).await;
    let log = std::fs::read_to_string(fed.path("logs/relay-edge-a.log")).unwrap_or_default();
    assert!(matches!(ended, Ok(Err(_))), "{ended:?}\n{log}");
    assert!(log.contains("party left: closed its stream") && log.contains("cutting its connection"), "{log}");
}

/// A submitted spec's file name is only echoed (in every error): an
/// oversized one with control characters comes back cut to 255 printable
/// characters, once per error, instead of megabytes per unenrolled name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_file_name_is_echoed_cut_and_printable() {
    use confide_proto::pb::admin_service_client::AdminServiceClient;
    let (fed, pki) = one_hospital();
    let names: Vec<String> = (0..20).map(|i| format!("stranger-{i}")).collect();
    let spec = job_spec(&names, 1, 1, "kind = \"logistic_regression\"\nclasses = 2", "");
    let url = format!("https://{}", fed.addr);
    let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
    let who =
        confide_proto::net::ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
    let mut admin = AdminServiceClient::new(confide_proto::net::connect(&who).await.expect("connect"));
    let file_name = "spec\n\u{1b}[31m".to_owned() + &"x".repeat(1 << 20);
    let req = pb::SubmitJobRequest { spec_toml: spec, file_name, grant: None };
    let e = admin.submit_job(req).await.expect_err("strangers are not enrolled");
    let m = e.message();
    assert!(m.contains("stranger-19") && m.contains("spec[31mx"), "{}", &m[..m.len().min(500)]);
    assert!(!m.contains('\u{1b}') && !m.contains(&"x".repeat(256)) && m.len() < 20 * 400, "{} bytes", m.len());
}

/// An administrator's connection outlives a revocation of its certificate
/// too: its calls on that connection are refused from then on, and a job
/// watch it started before ends once the list is in force, though the job
/// does not change (its party has not started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_is_refused_on_its_open_connection_and_its_watch_ends() {
    use confide_proto::pb::admin_service_client::AdminServiceClient;
    let (fed, pki) = one_hospital();
    // The job waits for its party, which never starts: nothing but the
    // revocation ends the watch.
    let names = vec!["hospital-a".to_string()];
    let spec = job_spec(&names, 1, 1, "kind = \"logistic_regression\"\nclasses = 2", "");
    let id = tokio::task::block_in_place(|| fed.submit("job.toml", &spec));
    let url = format!("https://{}", fed.addr);
    let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
    let who =
        confide_proto::net::ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
    let mut admin = AdminServiceClient::new(confide_proto::net::connect(&who).await.expect("connect"));
    admin.list_jobs(pb::ListJobsRequest {}).await.expect("an admin call before the revocation");
    let mut watch =
        admin.watch_job(pb::JobRef { job_id: id.clone(), ..Default::default() }).await.expect("watch").into_inner();
    watch.message().await.expect("first status").expect("a status");
    // A second valid administrator certificate is not issued by accident.
    let refused = fed.cli(&["certs", "issue", "--dir", &fed.s("pki"), "--admin"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("not revoked"));
    let cert_arg = cert.to_string_lossy().into_owned();
    fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "--admin", "--cert", &cert_arg, "confide-admin"]);
    tokio::task::block_in_place(|| fed.wait_for_log("revocation list updated", 20));
    let refused = admin.list_jobs(pb::ListJobsRequest {}).await.expect_err("revoked");
    assert!(refused.message().contains("confide-admin is revoked"), "{refused:?}");
    let revoked_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    // An update computed before the revocation may still be on its way (the
    // job's own start can make one, under load after the first): none
    // computed after it is sent, and the watch ends within a poll or two.
    let next = loop {
        let next =
            tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("the watch ends in time");
        match &next {
            Ok(Some(st)) if st.updated_at <= revoked_at && st.rounds_completed == 0 => continue,
            _ => break next,
        }
    };
    assert!(next.as_ref().is_err_and(|s| s.message().contains("confide-admin is revoked")), "{next:?}");
    // The way back: a new administrator certificate, on a new connection.
    fed.run_ok(&["certs", "issue", "--dir", &fed.s("pki"), "--admin"]);
    let mut admin = AdminServiceClient::new(confide_proto::net::connect(&who).await.expect("connect"));
    admin.list_jobs(pb::ListJobsRequest {}).await.expect("the new administrator certificate");
}

/// A party that reconnects replaces its older stream. What still arrives on
/// the older one must not act for the newer: before, a protocol error there
/// closed the newer stream (the close went by the party's name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_streams_messages_do_not_act_for_the_newer_stream() {
    let (fed, pki) = one_hospital();
    let (old_tx, _old_in) = open_welcomed(&fed.addr, &pki, "hospital-a").await;
    let (new_tx, mut new_in) = open_welcomed(&fed.addr, &pki, "hospital-a").await;
    // A message without a body: a protocol error, on the older stream.
    old_tx.send(pb::PartyMessage { body: None }).await.expect("the older stream takes it");
    let quiet = tokio::time::timeout(Duration::from_secs(2), new_in.message()).await;
    assert!(quiet.is_err(), "the newer stream got {quiet:?}");
    let log = fed.coordinator_log();
    assert!(log.contains("read no further"), "{log}");
    assert!(!log.contains("empty message"), "the older stream's message was handled:\n{log}");
    // The newer stream still works: its own protocol error closes it.
    new_tx.send(pb::PartyMessage { body: None }).await.expect("the newer stream takes it");
    let closed = tokio::time::timeout(Duration::from_secs(10), new_in.message()).await.expect("closed in time");
    assert!(closed.as_ref().is_err_and(|s| s.message().contains("empty message")), "{closed:?}");
}

/// A stream that a newer one replaced is left at once, with what it was
/// sending: a party (or a thief of its key) that starts a large result on
/// one stream, opens another and never sends on the first again used to
/// keep the first's reader, and its half-received transfer, for as long as
/// the connection lived, and could pile such streams up (found by review).
/// A result for a job that is not running keeps none of its bytes either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_stream_is_left_at_once_with_its_half_received_result() {
    let (fed, pki) = one_hospital();
    let (old_tx, mut old_in) = open_welcomed(&fed.addr, &pki, "hospital-a").await;
    // A result of a million values for a job that is not running: its
    // header and a first chunk, then nothing more on this stream.
    let encoded = encoded_model(7, 1_000_000);
    let first = confide_proto::transfer::chunks(7, &encoded.bytes, 64 * 1024).next().expect("a chunk");
    let result =
        pb::TaskResult { job_id: "j-not-running".into(), task_id: 1, bulk: Some(encoded.header), ..Default::default() };
    old_tx.send(pb::PartyMessage { body: Some(party_message::Body::Result(result)) }).await.expect("sent");
    old_tx.send(pb::PartyMessage { body: Some(party_message::Body::Chunk(first)) }).await.expect("sent");
    let (_new_tx, _new_in) = open_welcomed(&fed.addr, &pki, "hospital-a").await;
    tokio::task::block_in_place(|| fed.wait_for_log("is read no further (and what it was sending is dropped)", 10));
    let log = fed.coordinator_log();
    assert!(log.contains("its chunks are dropped"), "the result for no job was kept:\n{log}");
    assert!(!log.contains("closing the stream"), "the result for no job was taken as a protocol error:\n{log}");
    // The older stream's response side ends too.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match old_in.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the older stream stayed open");
}

/// A model of one tensor of `values` values, encoded as transfer `id`.
fn encoded_model(id: u64, values: usize) -> confide_proto::transfer::Encoded {
    let tensor = confide_algorithms::params::Tensor { name: "w".into(), shape: vec![values], data: vec![0.5; values] };
    let params = Parameters::new(vec![tensor]).expect("params");
    confide_proto::transfer::encode(id, &confide_proto::transfer::Bulk::Params(Arc::new(params)))
}

/// Wraps the built-in trainer and poisons its updates with NaN.
struct NanFactory;

struct NanTrainer {
    inner: Box<dyn Trainer>,
    poisoned: AtomicBool,
}

impl TrainerFactory for NanFactory {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        Ok(Box::new(NanTrainer {
            inner: BuiltinTrainers::default().build(spec, data, party)?,
            poisoned: AtomicBool::new(false),
        }))
    }
}

impl Trainer for NanTrainer {
    fn parameters(&self) -> Result<Parameters, AlgoError> {
        let mut p = self.inner.parameters()?;
        if self.poisoned.load(Ordering::Relaxed)
            && let Some((_, v)) = p.values_mut().last()
        {
            v[0] = f32::NAN;
        }
        Ok(p)
    }
    fn set_parameters(&mut self, params: &Parameters) -> Result<(), AlgoError> {
        self.inner.set_parameters(params)
    }
    fn feature_stats(&self) -> FeatureStats {
        self.inner.feature_stats()
    }
    fn fit(&mut self, config: &FitConfig) -> Result<FitOutcome, AlgoError> {
        self.poisoned.store(true, Ordering::Relaxed);
        self.inner.fit(config)
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, AlgoError> {
        self.inner.evaluate()
    }
    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, AlgoError> {
        self.inner.predict(features)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_sending_nan_is_named_and_left_out() {
    install_crypto();
    let mut fed = Federation::new(&["hospital-a", "hospital-b", "hospital-c"], &breast_cancer(), true, "1,1,1");
    fed.start_coordinator();
    fed.start_party("hospital-a", "");
    fed.start_party("hospital-b", "");
    let cfg = PartyConfig::load(&fed.party_config("hospital-c", "")).expect("config");
    let node = PartyNode::new(cfg, Arc::new(NanFactory));
    let task = tokio::spawn(async move { node.run().await });
    let id = fed.submit("job.toml", &job_spec(&fed.names, 2, 2, "kind = \"logistic_regression\"\nclasses = 2", ""));
    let st = tokio::task::block_in_place(|| fed.wait_done(&id, 60));
    task.abort();
    assert_eq!(st["state"], "succeeded", "{st:#}");
    let dropped = st["history"][0]["dropped"]["hospital-c"].as_str().unwrap_or_default();
    assert!(dropped.contains("party hospital-c sent a bad update") && dropped.contains("NaN"), "{st:#}");
    assert_eq!(st["history"][0]["participants"], serde_json::json!(["hospital-a", "hospital-b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_a_diverged_party_refuses_to_send_and_is_left_out() {
    install_crypto();
    // Five parties: with no corrupt party tolerated, the majority threshold
    // (t = 3 of k = 4) lets a round of five lose one.
    let names = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"];
    let mut fed = Federation::new(&names, &breast_cancer(), true, "1,1,1,1,1");
    fed.start_coordinator();
    let policy = "[policy]\naggregation = [\"secagg\"]\n";
    for n in names.iter().filter(|n| **n != "hospital-d") {
        fed.start_party(n, policy);
    }
    let cfg = PartyConfig::load(&fed.party_config("hospital-d", policy)).expect("config");
    let node = PartyNode::new(cfg, Arc::new(NanFactory));
    let task = tokio::spawn(async move { node.run().await });
    let spec = job_spec(&fed.names, 3, 2, "kind = \"logistic_regression\"\nclasses = 2", "")
        + "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\ncorrupt_fraction = 0.0\n";
    let id = fed.submit("job.toml", &spec);
    let st = tokio::task::block_in_place(|| fed.wait_done(&id, 60));
    task.abort();
    assert_eq!(st["state"], "succeeded", "{st:#}");
    // The party says why, in its own words: nothing masked was ever sent.
    let dropped = st["history"][0]["dropped"]["hospital-d"].as_str().unwrap_or_default();
    assert!(dropped.contains("local model after training") && dropped.contains("NaN"), "{st:#}");
    assert_eq!(
        st["history"][0]["participants"],
        serde_json::json!(["hospital-a", "hospital-b", "hospital-c", "hospital-e"])
    );
}

/// Trainers that take this long to build: an acceptance that reads a large
/// data set.
struct SlowFactory(Duration);

impl TrainerFactory for SlowFactory {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        std::thread::sleep(self.0);
        BuiltinTrainers::default().build(spec, data, party)
    }
}

/// A coordinator that welcomes the party, then sends its script (each
/// message at its time after the welcome), and passes on everything the
/// party sends, with when it came.
struct Scripted {
    script: Vec<(Duration, coordinator_message::Body)>,
    seen: tokio::sync::mpsc::Sender<(pb::PartyMessage, std::time::Instant)>,
    /// When the first offer was sent.
    offered: Arc<std::sync::OnceLock<std::time::Instant>>,
    /// End the stream this long after the script is played.
    hang_up: Option<Duration>,
    /// With `hang_up`: and not before this is notified.
    hang_up_on: Option<Arc<tokio::sync::Notify>>,
    /// When each connection came.
    joins: tokio::sync::mpsc::UnboundedSender<std::time::Instant>,
    /// The name its welcome gives the party (its certificate's, unless a
    /// test says otherwise); no welcome at all when `None`.
    welcome_as: Option<String>,
}

/// What a test watches of a [`Scripted`] coordinator.
struct Watch {
    /// Every message the party sent, with when it came.
    sent: tokio::sync::mpsc::Receiver<(pb::PartyMessage, std::time::Instant)>,
    /// When each connection came.
    joined: tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>,
    /// When the first offer was sent.
    offered: Arc<std::sync::OnceLock<std::time::Instant>>,
}

impl Scripted {
    /// A coordinator that plays `script` on every connection, ending the
    /// stream `hang_up` after it (and once `hang_up_on` is notified), and
    /// what a test watches of it.
    fn new(
        script: Vec<(Duration, coordinator_message::Body)>,
        hang_up: Option<Duration>,
        hang_up_on: Option<Arc<tokio::sync::Notify>>,
    ) -> (Scripted, Watch) {
        let (seen, sent) = tokio::sync::mpsc::channel(64);
        let (joins, joined) = tokio::sync::mpsc::unbounded_channel();
        let offered = Arc::new(std::sync::OnceLock::new());
        let welcome_as = Some("hospital-a".to_owned());
        let coordinator = Scripted { script, seen, offered: offered.clone(), hang_up, hang_up_on, joins, welcome_as };
        (coordinator, Watch { sent, joined, offered })
    }
}

#[tonic::async_trait]
impl confide_proto::pb::party_service_server::PartyService for Scripted {
    type JoinStream = ReceiverStream<Result<pb::CoordinatorMessage, tonic::Status>>;

    async fn join(
        &self,
        req: tonic::Request<tonic::Streaming<pb::PartyMessage>>,
    ) -> Result<tonic::Response<Self::JoinStream>, tonic::Status> {
        let _ = self.joins.send(std::time::Instant::now());
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let msg = |body| Ok(pb::CoordinatorMessage { body: Some(body) });
        if let Some(party) = self.welcome_as.clone() {
            let welcome = pb::Welcome { party, ..Default::default() };
            tx.send(msg(coordinator_message::Body::Welcome(welcome))).await.expect("send");
        }
        let (script, offered, hang_up) = (self.script.clone(), self.offered.clone(), self.hang_up);
        let hang_up_on = self.hang_up_on.clone();
        let sender = tx.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (at, body) in script {
                tokio::time::sleep_until(start + at).await;
                if matches!(body, coordinator_message::Body::Offer(_)) {
                    let _ = offered.set(std::time::Instant::now());
                }
                if sender.send(msg(body)).await.is_err() {
                    break;
                }
            }
            if let Some(after) = hang_up {
                tokio::time::sleep(after).await;
                if let Some(on) = hang_up_on {
                    on.notified().await;
                }
            }
        });
        let seen = self.seen.clone();
        let keep_open = self.hang_up.is_none().then_some(tx);
        tokio::spawn(async move {
            let _open = keep_open;
            while let Ok(Some(m)) = inbound.message().await {
                if seen.send((m, std::time::Instant::now())).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A task of `job_id` (a set-up step, which a session answers at once).
fn setup_task(job_id: &str, task_id: u64) -> coordinator_message::Body {
    coordinator_message::Body::Task(pb::Task {
        job_id: job_id.into(),
        round: 0,
        task_id,
        body: Some(pb::task::Body::Setup(pb::SetupTask {})),
        bulk: None,
    })
}

/// An offer of `job_id` on the party's data set.
fn offer_of(job_id: &str, spec_toml: String) -> coordinator_message::Body {
    coordinator_message::Body::Offer(pb::JobOffer { job_id: job_id.into(), spec_toml, dataset: "data".into() })
}

/// A valid one-party spec.
fn one_party_spec() -> String {
    job_spec(&["hospital-a".to_string()], 1, 1, "kind = \"logistic_regression\"\nclasses = 2", "")
}

/// A party accepts an offer beside its message loop, not in it: a message
/// the coordinator sends right behind the offer is answered at once, not
/// after the data set is read and set up (here 2 s), which would time the
/// data set's size past any floor on the offer's answer. A task of the
/// offered job itself is kept until the job is answered, then answered (a
/// coordinator that re-offers a job on reconnect goes on with its stages).
/// Under a floor (3 s) the answer comes no sooner than that after the offer,
/// over the network, though the acceptance took 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_right_behind_an_offer_does_not_wait_for_the_acceptance() {
    install_crypto();
    let script = || {
        let now = Duration::ZERO;
        vec![(now, offer_of("slow", one_party_spec())), (now, setup_task("another", 7)), (now, setup_task("slow", 8))]
    };
    let refused_then_answered = ["task 7 refused", "slow accepted: true", "task 8 answered"];
    let seen = scripted("", Duration::from_secs(2), script(), 3).await;
    assert_eq!(labels(&seen), refused_then_answered);
    assert_eq!(seen[0].reason, NOT_ACCEPTED);
    assert!(seen[1].after >= Duration::from_secs(2), "answered before the acceptance ended: {seen:?}");
    let floor = "[policy]\nmin_answer_after_secs = 3.0\n";
    let seen = scripted(floor, Duration::from_secs(2), script(), 3).await;
    assert_eq!(labels(&seen), refused_then_answered);
    assert_eq!(seen[0].reason, NOT_ACCEPTED);
    assert!(seen[1].after >= Duration::from_secs(3), "answered before the floor: {seen:?}");
}

/// A task of a job the party never accepted, with a model in chunks, is
/// refused as any such task is once its chunks are in; they are checked and
/// not kept (found by review: they were reassembled first, up to the
/// party's limit on values, for nothing). The connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_no_accepted_job_is_refused_without_keeping_its_model() {
    install_crypto();
    let encoded = encoded_model(5, 300_000);
    let fit = pb::Task {
        job_id: "never".into(),
        round: 1,
        task_id: 11,
        body: Some(pb::task::Body::Fit(pb::FitTask::default())),
        bulk: Some(encoded.header.clone()),
    };
    // (The harness times answers from an offer, of another job here.)
    let mut script = vec![
        (Duration::ZERO, offer_of("other", one_party_spec())),
        (Duration::ZERO, coordinator_message::Body::Task(fit)),
    ];
    for c in confide_proto::transfer::chunks(5, &encoded.bytes, 256 * 1024) {
        script.push((Duration::ZERO, coordinator_message::Body::Chunk(c)));
    }
    script.push((Duration::ZERO, setup_task("never", 12)));
    let seen = scripted("", Duration::ZERO, script, 3).await;
    let refused: Vec<&Seen> = seen.iter().filter(|s| s.label.ends_with("refused")).collect();
    assert_eq!(refused.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["task 11 refused", "task 12 refused"]);
    assert_eq!(refused[0].reason, format!("{NOT_ACCEPTED} (its chunks were not kept)"), "{seen:?}");
    assert_eq!(refused[1].reason, NOT_ACCEPTED, "{seen:?}");
}

/// Under an answer floor nothing the coordinator can ask tells when an
/// acceptance ended before it: the job's worker appears with the answer,
/// at the floor. Floor 3 s, set-up 1 s: a task of the job sent at 0.5 s
/// (acceptance under way) and one sent at 2 s (acceptance over, answer
/// held) get the same treatment: both kept, both answered after the
/// offer's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_floor_a_task_cannot_tell_when_the_acceptance_ended() {
    install_crypto();
    let script = vec![
        (Duration::ZERO, offer_of("slow", one_party_spec())),
        (Duration::from_millis(500), setup_task("slow", 8)),
        (Duration::from_secs(2), setup_task("slow", 9)),
    ];
    let floor = "[policy]\nmin_answer_after_secs = 3.0\n";
    let seen = scripted(floor, Duration::from_secs(1), script, 3).await;
    assert_eq!(labels(&seen), ["slow accepted: true", "task 8 answered", "task 9 answered"]);
    assert!(seen[0].after >= Duration::from_secs(3), "answered before the floor: {seen:?}");
}

/// Trainers that take this long to build, counting how many are built at
/// once and how many were started, and notifying `started` of each.
struct Overlapping {
    set_up: Duration,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    builds: std::sync::atomic::AtomicUsize,
    started: Arc<tokio::sync::Notify>,
}

impl TrainerFactory for Overlapping {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.builds.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        std::thread::sleep(self.set_up);
        self.now.fetch_sub(1, Ordering::SeqCst);
        BuiltinTrainers::default().build(spec, data, party)
    }
}

/// A coordinator that hangs up right behind an offer, on every connection,
/// gets one set-up at a time: an acceptance dropped with its connection
/// finishes its blocking work in the background, holding the node's one
/// acceptance slot, so set-ups do not pile up one per reconnect. The
/// coordinator hangs up once a set-up (3 s) has started, on each of four
/// connections; without the slot the next connection's set-up would start
/// beside the one cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptances_cut_off_by_hang_ups_run_one_at_a_time() {
    install_crypto();
    let script = vec![(Duration::ZERO, offer_of("slow", one_party_spec()))];
    let started = Arc::new(tokio::sync::Notify::new());
    let (coordinator, mut watch) = Scripted::new(script, Some(Duration::ZERO), Some(started.clone()));
    let factory = Arc::new(Overlapping {
        set_up: Duration::from_secs(3),
        now: 0.into(),
        most: 0.into(),
        builds: 0.into(),
        started,
    });
    let (party, server) = party_against("", factory.clone(), coordinator).await;
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(60), watch.joined.recv()).await.expect("a connection").expect("open");
    }
    party.abort();
    server.abort();
    assert!(factory.builds.load(Ordering::SeqCst) >= 3, "set-ups started: {}", factory.builds.load(Ordering::SeqCst));
    assert_eq!(factory.most.load(Ordering::SeqCst), 1, "set-ups at once");
}

/// A coordinator that welcomes a party twice on one connection is cut off
/// (each welcome started a task reporting serving counts, and changed the
/// name later acceptances use): the party reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_welcome_ends_the_connection() {
    install_crypto();
    let welcome = pb::Welcome { party: "hospital-a".into(), ..Default::default() };
    let script = vec![(Duration::from_secs(1), coordinator_message::Body::Welcome(welcome))];
    let (coordinator, mut watch) = Scripted::new(script, None, None);
    let (party, server) = party_against("", Arc::new(SlowFactory(Duration::ZERO)), coordinator).await;
    let mut joins = Vec::new();
    for _ in 0..2 {
        let join = tokio::time::timeout(Duration::from_secs(30), watch.joined.recv()).await;
        joins.push(join.expect("a connection").expect("open"));
    }
    party.abort();
    server.abort();
    assert!(joins[1] - joins[0] >= Duration::from_secs(1), "reconnected before the second welcome");
    // Without the second welcome the connection stays.
    let (coordinator, mut watch) = Scripted::new(Vec::new(), None, None);
    let (party, server) = party_against("", Arc::new(SlowFactory(Duration::ZERO)), coordinator).await;
    tokio::time::timeout(Duration::from_secs(30), watch.joined.recv()).await.expect("a connection").expect("open");
    let again = tokio::time::timeout(Duration::from_secs(2), watch.joined.recv()).await;
    party.abort();
    server.abort();
    assert!(again.is_err(), "reconnected (or the fake coordinator ended) without a second welcome: {again:?}");
}

/// A coordinator that welcomes a party under another name, or sends an
/// offer before any welcome, is cut off: the name a party signs under,
/// keeps its ledger and logs under is its certificate's, not the
/// coordinator's word for it, and nothing is taken from a stream before its
/// welcome (which carries the revocation list). (Under the wrong name it
/// would have accepted offers addressed to another party.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_under_another_name_or_none_ends_the_connection() {
    install_crypto();
    for welcome_as in [Some("hospital-b"), None] {
        let offer = vec![(Duration::ZERO, offer_of("named", one_party_spec()))];
        let (mut coordinator, mut watch) = Scripted::new(offer, None, None);
        coordinator.welcome_as = welcome_as.map(String::from);
        let (party, server) = party_against("", Arc::new(SlowFactory(Duration::ZERO)), coordinator).await;
        for _ in 0..2 {
            let join = tokio::time::timeout(Duration::from_secs(30), watch.joined.recv()).await;
            join.expect("a connection").expect("open");
        }
        party.abort();
        server.abort();
        let mut answered = false;
        while let Ok((m, _)) = watch.sent.try_recv() {
            answered |= matches!(m.body, Some(party_message::Body::JobAnswer(_)));
        }
        assert!(!answered, "{welcome_as:?}: the party answered an offer on a connection it should have left");
    }
}

/// A party runs at most `policy.max_jobs` jobs at once: a third offer is
/// refused at once, naming the setting, when no worker is ending; one that
/// comes as a job is closed waits for its worker to end and takes its
/// place; a re-offer of a running job is not counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_beyond_the_policys_most_jobs_are_refused() {
    install_crypto();
    let closed = pb::JobClosed { job_id: "a".into(), state: 0, reason: "done".into() };
    let script = vec![
        (Duration::ZERO, offer_of("a", one_party_spec())),
        (Duration::ZERO, offer_of("b", one_party_spec())),
        (Duration::ZERO, offer_of("c", one_party_spec())),
        (Duration::from_millis(300), offer_of("b", one_party_spec())),
        (Duration::from_millis(300), coordinator_message::Body::Closed(closed)),
        (Duration::from_millis(300), offer_of("d", one_party_spec())),
    ];
    let seen = scripted("[policy]\nmax_jobs = 2\n", Duration::ZERO, script, 5).await;
    // c finds no room and no worker ending: refused at once. d comes as a
    // is closed: it waits for a's worker to end (a refusal is for good at
    // the coordinator) and takes its place.
    assert_eq!(
        labels(&seen),
        ["a accepted: true", "b accepted: true", "c refused", "b accepted: true", "d accepted: true"],
        "{seen:?}"
    );
    assert_eq!(seen[2].reason, "this party already runs 2 jobs (policy.max_jobs = 2)");
    assert!(seen[2].after < Duration::from_secs(5), "{seen:?}");
}

/// A close that comes while its job's offer is in flight is kept, not lost:
/// the job is closed as soon as it is answered. Floor 2 s, set-up 0.5 s,
/// the close at 0.2 s: a task of the job sent after the answer is refused,
/// as the job is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_the_offer_is_in_flight_closes_the_job_once_answered() {
    install_crypto();
    let closed = pb::JobClosed { job_id: "slow".into(), state: 0, reason: "cancelled".into() };
    let script = vec![
        (Duration::ZERO, offer_of("slow", one_party_spec())),
        (Duration::from_millis(200), coordinator_message::Body::Closed(closed)),
        (Duration::from_secs(3), setup_task("slow", 8)),
    ];
    let floor = "[policy]\nmin_answer_after_secs = 2.0\n";
    let seen = scripted(floor, Duration::from_millis(500), script, 2).await;
    assert_eq!(labels(&seen), ["slow accepted: true", "task 8 refused"]);
    assert_eq!(seen[1].reason, NOT_ACCEPTED);
}

/// A close sent between two offers of the same job (a coordinator that
/// re-offers it) is for the session before the re-offer: it closes that
/// one, and the re-offer's session answers a later task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_between_two_offers_of_a_job_closes_the_older_session() {
    install_crypto();
    let closed = pb::JobClosed { job_id: "slow".into(), state: 0, reason: "reconnected".into() };
    let script = vec![
        (Duration::ZERO, offer_of("slow", one_party_spec())),
        (Duration::from_millis(100), coordinator_message::Body::Closed(closed)),
        (Duration::from_millis(200), offer_of("slow", one_party_spec())),
        (Duration::from_millis(2500), setup_task("slow", 8)),
    ];
    let floor = "[policy]\nmin_answer_after_secs = 1.0\n";
    let seen = scripted(floor, Duration::from_millis(200), script, 3).await;
    assert_eq!(labels(&seen), ["slow accepted: true", "slow accepted: true", "task 8 answered"], "{seen:?}");
    // And it is not lost: with a re-offer that is refused, the older
    // session is closed and nothing answers the task.
    let closed = pb::JobClosed { job_id: "slow".into(), state: 0, reason: "reconnected".into() };
    let script = vec![
        (Duration::ZERO, offer_of("slow", one_party_spec())),
        (Duration::from_millis(100), coordinator_message::Body::Closed(closed)),
        (Duration::from_millis(200), offer_of("slow", "not toml".into())),
        (Duration::from_millis(2500), setup_task("slow", 8)),
    ];
    let seen = scripted(floor, Duration::from_millis(200), script, 3).await;
    assert_eq!(labels(&seen), ["slow accepted: true", "slow refused", "task 8 refused"], "{seen:?}");
    assert_eq!(seen[2].reason, NOT_ACCEPTED);
}

/// Under an answer floor at most 8 offers are in flight, counted from each
/// one's arrival until its answer is sent, so whether the limit is reached
/// tells nothing of how long the acceptances took:
/// - 10 offers at once, each refused by the party for its spec in
///   microseconds: the 9th and 10th are refused at once, the others at
///   the floor (2 s), in order of arrival;
/// - 8 offers accepted in 10 ms each, then a 9th at 1.5 s, when every
///   acceptance has ended but no answer has gone (floor 3 s): the 9th is
///   refused; after the floor the party takes offers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_floor_offers_in_flight_are_bounded_by_their_arrival_alone() {
    install_crypto();
    let floor = "[policy]\nmin_answer_after_secs = 2.0\n";
    let in_flight = "8 offers are already in flight under policy.min_answer_after_secs";
    let now = Duration::ZERO;
    let script: Vec<_> = (0..10).map(|i| (now, offer_of(&format!("j{i}"), "not toml".into()))).collect();
    let seen = scripted(floor, Duration::ZERO, script, 10).await;
    assert_eq!(labels(&seen[..2]), ["j8 refused", "j9 refused"], "{seen:?}");
    assert!(seen[..2].iter().all(|s| s.reason.starts_with(in_flight)), "{seen:?}");
    for (i, s) in seen[2..].iter().enumerate() {
        assert_eq!(s.label, format!("j{i} refused"), "in order of arrival: {seen:?}");
        assert!(s.reason.starts_with("invalid job spec"), "{s:?}");
        assert!(s.after >= Duration::from_secs(2), "answered before the floor: {s:?}");
    }
    let floor = "[policy]\nmin_answer_after_secs = 3.0\n";
    let mut script: Vec<_> = (0..8).map(|i| (now, offer_of(&format!("a{i}"), one_party_spec()))).collect();
    script.push((Duration::from_millis(1500), offer_of("ninth", one_party_spec())));
    script.push((Duration::from_millis(3500), offer_of("later", one_party_spec())));
    let seen = scripted(floor, Duration::from_millis(10), script, 10).await;
    assert_eq!(seen[0].label, "ninth refused", "{seen:?}");
    assert!(seen[0].reason.starts_with(in_flight), "{seen:?}");
    let accepted: Vec<String> = (0..8).map(|i| format!("a{i} accepted: true")).collect();
    assert_eq!(labels(&seen[1..9]), accepted, "{seen:?}");
    assert!(seen[1..9].iter().all(|s| s.after >= Duration::from_secs(3)), "{seen:?}");
    assert_eq!(seen[9].label, "later accepted: true", "{seen:?}");
}

/// What a party sent: "task 7 refused", "slow accepted: true", "j8 refused"
/// or "task 8 answered", with the refusal's reason, and how long after the
/// first offer it came.
#[derive(Debug)]
struct Seen {
    label: String,
    reason: String,
    after: Duration,
}

fn labels(seen: &[Seen]) -> Vec<&str> {
    seen.iter().map(|s| s.label.as_str()).collect()
}

/// A task refused because its job is not (or no longer) accepted here.
const NOT_ACCEPTED: &str = "this party has not accepted the job";

/// The first `count` answers and task outcomes a party configured with
/// `extra`, whose trainers take `set_up` to build, sends a coordinator that
/// plays `script`: each labelled, with how long after the first offer it came.
async fn scripted(
    extra: &str,
    set_up: Duration,
    script: Vec<(Duration, coordinator_message::Body)>,
    count: usize,
) -> Vec<Seen> {
    let (coordinator, mut watch) = Scripted::new(script, None, None);
    let (party, server) = party_against(extra, Arc::new(SlowFactory(set_up)), coordinator).await;
    let mut seen = Vec::new();
    while seen.len() < count {
        let (m, at) =
            tokio::time::timeout(Duration::from_secs(60), watch.sent.recv()).await.expect("in time").expect("open");
        let (label, reason) = match m.body {
            Some(party_message::Body::Failed(f)) => (format!("task {} refused", f.task_id), f.reason),
            Some(party_message::Body::JobAnswer(a)) if a.accepted => (format!("{} accepted: true", a.job_id), a.reason),
            Some(party_message::Body::JobAnswer(a)) => (format!("{} refused", a.job_id), a.reason),
            Some(party_message::Body::Result(r)) => (format!("task {} answered", r.task_id), String::new()),
            _ => continue,
        };
        seen.push(Seen { label, reason, after: at - *watch.offered.get().expect("an offer was sent first") });
    }
    party.abort();
    server.abort();
    seen
}

/// Runs party "hospital-a" configured with `extra`, whose trainers
/// `factory` builds, against `coordinator` over mutual TLS.
async fn party_against(
    extra: &str,
    factory: Arc<dyn TrainerFactory>,
    coordinator: Scripted,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let fed = Federation::new(&["hospital-a"], &breast_cancer(), true, "1");
    let pki = PkiDir::new(fed.path("pki"));
    let tls = confide_coordinator::tls::server_config(&pki).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let admission = confide_coordinator::tls::Admission::Relay;
    let incoming = ReceiverStream::new(confide_coordinator::tls::accept_loop(listener, tls, admission, None));
    let service = confide_proto::pb::party_service_server::PartyServiceServer::new(coordinator);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    let mut cfg = PartyConfig::load(&fed.party_config("hospital-a", extra)).expect("config");
    cfg.coordinator = format!("https://127.0.0.1:{port}");
    let node = PartyNode::new(cfg, factory);
    let party = tokio::spawn(async move {
        let _fed = fed;
        let _ = node.run().await;
    });
    (party, server)
}

/// A coordinator that ends the stream right behind an offer learns nothing
/// from when the party reconnects: the acceptance under way (here 6 s) is
/// dropped with the connection, not awaited (which timed it, ±25 ms, past
/// any floor), and the party reconnects after its usual delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_reconnects_without_waiting_for_an_acceptance() {
    install_crypto();
    let script = vec![(Duration::ZERO, offer_of("slow", one_party_spec()))];
    let (coordinator, mut watch) = Scripted::new(script, Some(Duration::from_millis(300)), None);
    let (party, server) = party_against("", Arc::new(SlowFactory(Duration::from_secs(6))), coordinator).await;
    tokio::time::timeout(Duration::from_secs(60), watch.joined.recv()).await.expect("first connection").expect("open");
    let again = tokio::time::timeout(Duration::from_secs(4), watch.joined.recv()).await;
    party.abort();
    server.abort();
    let again = again.expect("reconnected before the acceptance ended").expect("open");
    assert!(again >= *watch.offered.get().expect("the offer was sent"));
}
