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
    install_crypto();
    let mut fed = Federation::new(&["hospital-a"], &breast_cancer(), true, "1");
    fed.start_coordinator();
    let pki = PkiDir::new(fed.path("pki"));
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

/// A coordinator that welcomes the party, offers it `offer` and, right
/// behind the offer, sends a task of a job the party does not hold (whose
/// refusal it would time); it passes on everything the party sends.
struct Pipelining {
    offer: pb::JobOffer,
    seen: tokio::sync::mpsc::Sender<pb::PartyMessage>,
}

#[tonic::async_trait]
impl confide_proto::pb::party_service_server::PartyService for Pipelining {
    type JoinStream = ReceiverStream<Result<pb::CoordinatorMessage, tonic::Status>>;

    async fn join(
        &self,
        req: tonic::Request<tonic::Streaming<pb::PartyMessage>>,
    ) -> Result<tonic::Response<Self::JoinStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let msg = |body| Ok(pb::CoordinatorMessage { body: Some(body) });
        let welcome = pb::Welcome { party: "hospital-a".into(), ..Default::default() };
        let task = pb::Task {
            job_id: "another".into(),
            round: 0,
            task_id: 7,
            body: Some(pb::task::Body::Setup(pb::SetupTask {})),
            bulk: None,
        };
        // And the offered job's own first task, as a coordinator that
        // re-offers a job on reconnect goes on with its stages.
        let own = pb::Task { job_id: self.offer.job_id.clone(), task_id: 8, ..task.clone() };
        for body in [
            coordinator_message::Body::Welcome(welcome),
            coordinator_message::Body::Offer(self.offer.clone()),
            coordinator_message::Body::Task(task),
            coordinator_message::Body::Task(own),
        ] {
            tx.send(msg(body)).await.expect("send");
        }
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let _open = tx;
            while let Ok(Some(m)) = inbound.message().await {
                if seen.send(m).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A party accepts an offer beside its message loop, not in it: a message
/// the coordinator sends right behind the offer is answered at once, not
/// after the data set is read and set up (here 2 s), which would time the
/// data set's size past any floor on the offer's answer. Without a floor a
/// task of the offered job itself is kept until the job is accepted, then
/// answered (a coordinator that re-offers a job on reconnect goes on with
/// its stages); under a floor it is refused at once, since answered when
/// the acceptance ended it would time it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_right_behind_an_offer_does_not_wait_for_the_acceptance() {
    install_crypto();
    let refused_then_answered = ["task 7 refused", "slow accepted: true", "task 8 answered"];
    assert_eq!(pipelined_behind_an_offer("").await, refused_then_answered);
    let floor = "[policy]\nmin_answer_after_secs = 3.0\n";
    assert_eq!(pipelined_behind_an_offer(floor).await, ["task 7 refused", "task 8 refused", "slow accepted: true"]);
}

/// What a party configured with `extra` sends, in order, to a coordinator
/// that pipelines two tasks behind an offer whose set-up takes 2 s.
async fn pipelined_behind_an_offer(extra: &str) -> Vec<String> {
    let fed = Federation::new(&["hospital-a"], &breast_cancer(), true, "1");
    let pki = PkiDir::new(fed.path("pki"));
    let tls = confide_coordinator::tls::server_config(&pki).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let admission = confide_coordinator::tls::Admission::Relay;
    let incoming = ReceiverStream::new(confide_coordinator::tls::accept_loop(listener, tls, admission, None));
    let spec = job_spec(&fed.names, 1, 1, "kind = \"logistic_regression\"\nclasses = 2", "");
    let offer = pb::JobOffer { job_id: "slow".into(), spec_toml: spec, dataset: "data".into() };
    let (seen, mut party_sent) = tokio::sync::mpsc::channel(16);
    let service = confide_proto::pb::party_service_server::PartyServiceServer::new(Pipelining { offer, seen });
    let server = tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    let mut cfg = PartyConfig::load(&fed.party_config("hospital-a", extra)).expect("config");
    cfg.coordinator = format!("https://127.0.0.1:{port}");
    let node = PartyNode::new(cfg, Arc::new(SlowFactory(Duration::from_secs(2))));
    let party = tokio::spawn(async move { node.run().await });
    let mut order = Vec::new();
    while order.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(60), party_sent.recv()).await.expect("in time").expect("open");
        match m.body {
            Some(party_message::Body::Failed(f)) => order.push(format!("task {} refused", f.task_id)),
            Some(party_message::Body::JobAnswer(a)) => order.push(format!("{} accepted: {}", a.job_id, a.accepted)),
            Some(party_message::Body::Result(r)) => order.push(format!("task {} answered", r.task_id)),
            _ => {}
        }
    }
    party.abort();
    server.abort();
    order
}
