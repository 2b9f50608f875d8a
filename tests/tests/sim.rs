//! A whole federation in one process on a virtual clock: the coordinator's
//! sans-IO session and each party's sans-IO session with the real training
//! handler, SecAgg+ client and trainer, connected by an in-memory queue
//! instead of gRPC. Deterministic and fast, so behaviour under dropouts and
//! timeouts is tested exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use confide_algorithms::Parameters;
use confide_coordinator::plugins::Plugins;
use confide_coordinator::session::{Input, Output, Session, Start};
use confide_crypto::secagg::testing::identity;
use confide_party::plugins::{JobContext, PartyJobKind};
use confide_party::session::{PartyInput, PartyOutput, PartySession};
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_party::training::TrainingKind;
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::Task;
use confide_proto::status::JobState;
use confide_tests::{Federation, independent_fedavg, job_spec, max_abs_diff, repo_root};

/// Rewrites a task on its way to the named party.
type Tamper = Box<dyn FnMut(&str, &mut Task)>;

enum Event {
    ToCoordinator(Input),
    ToParty(String, Task),
}

struct Sim {
    now: u64,
    coordinator: Session,
    parties: BTreeMap<String, PartySession>,
    /// A party vanishes on receiving a task of this stage and round.
    crash_at: BTreeMap<String, (String, u32)>,
    /// The coordinator stops delivering tasks of this stage (a stalled coordinator).
    withhold: Option<String>,
    /// A malicious coordinator rewrites tasks before they reach a party.
    tamper: Option<Tamper>,
    queue: VecDeque<Event>,
    model: Option<Arc<Parameters>>,
    end: Option<(JobState, Option<String>)>,
    notes: Vec<(String, String)>,
}

impl Sim {
    fn new(fed: &Federation, text: &str) -> Sim {
        let spec = Arc::new(JobSpec::parse(text, "sim.toml", &Limits::default()).expect("spec"));
        let coordinator = confide_coordinator::jobs::session(
            "sim",
            spec.clone(),
            Start::Fresh { model: None },
            // Hash-tag signatures stand in for certificates on the virtual clock.
            &Plugins::default().peer_verifier(|| Ok(Box::new(confide_crypto::secagg::testing::InsecureTagVerifier))),
            Limits::default(),
            0,
        )
        .expect("session");
        let mut parties = BTreeMap::new();
        for name in &fed.names {
            let cx = JobContext {
                job_id: "sim",
                spec: &spec,
                party: name,
                dataset: &fed.party_data(name),
                trainers: &BuiltinTrainers::default(),
                protocols: confide_crypto::aggregation::Protocols::builtin(),
                identity: identity(name),
                limits: &Limits::default(),
                min_parties: 1,
                budget: None,
                noise_rounds_ahead: 1,
                answers_held: false,
            };
            let handler = TrainingKind::TRAIN.handler(cx).expect("handler");
            parties.insert(name.clone(), PartySession::new("sim", handler, spec.timeouts.round_secs * 2000));
        }
        let mut sim = Sim {
            now: 0,
            coordinator,
            parties,
            crash_at: BTreeMap::new(),
            withhold: None,
            tamper: None,
            queue: VecDeque::new(),
            model: None,
            end: None,
            notes: Vec::new(),
        };
        for name in &fed.names {
            sim.queue.push_back(Event::ToCoordinator(Input::connected(name)));
        }
        sim
    }

    /// Delivers messages until none is left, acknowledging checkpoints.
    fn run(&mut self) {
        while let Some(event) = self.queue.pop_front() {
            match event {
                Event::ToCoordinator(input) => self.coordinator.handle(self.now, input),
                Event::ToParty(party, mut task) => {
                    if let Some(t) = self.tamper.as_mut() {
                        t(&party, &mut task);
                    }
                    if self.crash_at.get(&party).is_some_and(|(s, r)| s == task.body.stage_name() && *r == task.round) {
                        self.parties.remove(&party);
                        self.queue.push_back(Event::ToCoordinator(Input::Disconnected(party)));
                        continue;
                    }
                    let Some(p) = self.parties.get_mut(&party) else { continue };
                    p.handle(self.now, PartyInput::Task(task));
                    self.drain_party(&party);
                }
            }
            while let Some(out) = self.coordinator.poll_output() {
                match out {
                    Output::Offer { party } => {
                        let answer = Input::Answer { party, accepted: true, reason: String::new() };
                        self.queue.push_back(Event::ToCoordinator(answer));
                    }
                    Output::Task { to, task, stage } => {
                        if self.withhold.as_deref() == Some(stage.name()) {
                            continue;
                        }
                        for p in to {
                            self.queue.push_back(Event::ToParty(p, (*task).clone()));
                        }
                    }
                    Output::Checkpoint(c) => {
                        self.model = c.model.clone().or(self.model.take());
                        self.queue.push_back(Event::ToCoordinator(Input::Persisted { round: c.round }));
                    }
                    Output::Finished { state, error } => self.end = Some((state, error)),
                }
            }
        }
    }

    fn drain_party(&mut self, party: &str) {
        let Some(p) = self.parties.get_mut(party) else { return };
        while let Some(out) = p.poll_output() {
            let input = match out {
                PartyOutput::Result(r) => Input::Result { party: party.into(), task_id: r.task_id, result: r.body },
                PartyOutput::Failed { task_id, reason } => Input::TaskFailed { party: party.into(), task_id, reason },
                PartyOutput::Note(n) => {
                    self.notes.push((party.into(), n));
                    continue;
                }
            };
            self.queue.push_back(Event::ToCoordinator(input));
        }
    }

    /// Moves the virtual clock to `now` and ticks everyone.
    fn advance(&mut self, now: u64) {
        self.now = now;
        let names: Vec<String> = self.parties.keys().cloned().collect();
        for n in &names {
            if let Some(p) = self.parties.get_mut(n) {
                p.handle(now, PartyInput::Tick);
            }
            self.drain_party(n);
        }
        self.queue.push_back(Event::ToCoordinator(Input::Tick));
        self.run();
    }
}

fn federation(n: usize) -> Federation {
    let names: Vec<String> = (0..n).map(|i| format!("site-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let weights = vec!["1"; n].join(",");
    Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, &weights)
}

const LOGREG: &str = "kind = \"logistic_regression\"\nclasses = 2";
const SECAGG: &str = "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\nclip = 4.0\n";

#[test]
fn a_secure_federation_on_the_virtual_clock_equals_fedavg_of_the_survivors() {
    let fed = federation(5);
    let text = job_spec(&fed.names, 4, 2, LOGREG, "seed = 2") + SECAGG;
    let mut sim = Sim::new(&fed, &text);
    sim.crash_at.insert("site-3".into(), ("secagg-masked-input".into(), 1));
    sim.run();
    assert_eq!(sim.end, Some((JobState::Succeeded, None)), "notes: {:?}", sim.notes);
    let spec = JobSpec::parse(&text, "sim.toml", &Limits::default()).expect("spec");
    let build = |n: &str| BuiltinTrainers::default().build(&spec, &fed.party_data(n), n).expect("trainer");
    // Setup over all five, then FedAvg over the four that stayed.
    let all: Vec<_> = fed.names.iter().map(|n| build(n)).collect();
    let start = confide_tests::standardised_start(&all);
    let mut survivors: Vec<_> = fed.names.iter().filter(|n| *n != "site-3").map(|n| build(n)).collect();
    let expected = independent_fedavg(&mut survivors, start, &spec.training, 2);
    let model = sim.model.expect("a model");
    assert!(max_abs_diff(&model, &expected) < 1e-4, "the simulated secure federation is not FedAvg of the survivors");
}

#[test]
fn a_party_wipes_an_open_round_when_the_coordinator_goes_silent() {
    let fed = federation(3);
    let text = job_spec(&fed.names, 3, 1, LOGREG, "seed = 2") + SECAGG;
    let mut sim = Sim::new(&fed, &text);
    // The coordinator never sends the unmask step.
    sim.withhold = Some("secagg-unmask".into());
    sim.run();
    assert!(sim.end.is_none());
    assert!(sim.notes.is_empty());
    let idle: BTreeSet<String> = {
        sim.advance(30_000 * 2 - 1);
        sim.notes.iter().map(|(p, _)| p.clone()).collect()
    };
    assert!(idle.is_empty(), "too early: {:?}", sim.notes);
    sim.advance(30_000 * 2);
    let wiped: BTreeSet<&str> =
        sim.notes.iter().filter(|(_, n)| n.contains("abandoned the open round")).map(|(p, _)| p.as_str()).collect();
    assert_eq!(wiped.len(), 3, "{:?}", sim.notes);
}

#[test]
fn a_party_catches_a_coordinator_fault_leaves_the_job_and_says_so() {
    use confide_crypto::aggregation::secagg::{CONSISTENCY, wire};
    use confide_proto::messages::TaskBody;
    let fed = federation(5);
    let text = job_spec(&fed.names, 4, 2, LOGREG, "seed = 2") + SECAGG;
    let mut sim = Sim::new(&fed, &text);
    // The coordinator leaves site-0 out of the survivor set it shows site-0
    // (to learn its mask key while its masked input is in the sum).
    sim.tamper = Some(Box::new(|party, task| {
        if let TaskBody::Aggregation { stage, message } = &mut task.body
            && party == "site-0"
            && stage == CONSISTENCY.as_str()
        {
            let mut set: wire::Survivors = message.decode("test", "survivors").expect("survivors");
            set.survivors.retain(|p| p != "site-0");
            *message = confide_crypto::aggregation::Envelope::encode(&set);
        }
    }));
    sim.run();
    // The hospital sees it in its own log, in its own words.
    let fault: Vec<&String> = sim
        .notes
        .iter()
        .filter(|(p, n)| p == "site-0" && n.starts_with("coordinator fault:"))
        .map(|(_, n)| n)
        .collect();
    assert!(
        fault.iter().any(|n| n.contains("out of the survivors") && n.contains("leaving the job")),
        "{:?}",
        sim.notes
    );
    // The coordinator is told, the job's record shows it, and site-0 stays out.
    let (state, error) = sim.end.clone().expect("the job ended");
    assert_eq!(state, JobState::Succeeded, "{error:?}");
    let parties = sim.coordinator.parties();
    let detail = parties["site-0"].detail.clone().unwrap_or_default();
    assert!(detail.contains("coordinator fault") && detail.contains("out of the survivors"), "{detail}");
}
