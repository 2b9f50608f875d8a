//! Session tests on a virtual clock: the built-in job machines driven
//! through the session with scripted parties (plaintext) and with real
//! SecAgg+ clients standing in for them.

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::{EvalOutcome, FeatureStats, Metrics, Parameters, State, Tensor};
use confide_crypto::aggregation::plain::Plain;
use confide_crypto::aggregation::secagg::{CONSISTENCY, MASKED_INPUT, SHARES, SecAggPlus, UNMASK, wire};
use confide_crypto::aggregation::sum::{self, SumLayout};
use confide_crypto::aggregation::{AggregationClient, AggregationProtocol, Bulk, Envelope, LocalUpdate};
use confide_crypto::secagg::testing::identity;
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::{ResultBody, Stage, SumOf, Task, TaskBody};
use confide_proto::status::{JobState, PartyState, PartyStatus};

use super::{Checkpoint, Input, Millis, Output, Session, Start};
use crate::jobs;
use crate::plugins::Plugins;

fn params(v: &[f32]) -> Parameters {
    Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
}

/// A session for `spec` with the built-in machines.
fn session(spec: JobSpec, start: Start, plugins: &Plugins) -> Session {
    // Hash-tag signatures stand in for certificates here.
    let plugins = plugins.clone().peer_verifier(|| Ok(Box::new(confide_crypto::secagg::testing::InsecureTagVerifier)));
    jobs::session("job-t", Arc::new(spec), start, &plugins, Limits::default(), 0).unwrap()
}

/// One recipient's view of a task output.
#[derive(Debug, Clone)]
struct TaskOut {
    stage: Stage,
    round: u32,
    task_id: u64,
    params: Option<Arc<Parameters>>,
    task: Arc<Task>,
}

fn task_pairs(outputs: Vec<Output>) -> Vec<(String, TaskOut)> {
    let mut v = Vec::new();
    for o in outputs {
        if let Output::Task { to, stage, task } = o {
            let params = match &task.body {
                TaskBody::Fit { global, .. }
                | TaskBody::Evaluate { global }
                | TaskBody::SecureSum { of: SumOf::Evaluation { global }, .. } => Some(global.clone()),
                _ => None,
            };
            for p in to {
                let t = TaskOut {
                    stage,
                    round: task.round,
                    task_id: task.task_id,
                    params: params.clone(),
                    task: task.clone(),
                };
                v.push((p, t));
            }
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Feeds `input` and collects the outputs, acknowledging checkpoints as the
/// driver does once they are durable (or failing them, when `fail_persist`).
fn drive(s: &mut Session, now: Millis, input: Input, fail_persist: bool) -> Vec<Output> {
    s.handle(now, input);
    let mut out = Vec::new();
    while let Some(o) = s.poll_output() {
        let ack = match &o {
            Output::Checkpoint(c) if fail_persist => {
                Some(Input::PersistFailed { round: c.round, reason: "disk full (test)".into() })
            }
            Output::Checkpoint(c) => Some(Input::Persisted { round: c.round }),
            _ => None,
        };
        out.push(o);
        if let Some(ack) = ack {
            s.handle(now, ack);
        }
    }
    out
}

fn finished(outputs: &[Output]) -> Option<(JobState, Option<String>)> {
    outputs.iter().find_map(|o| match o {
        Output::Finished { state, error } => Some((*state, error.clone())),
        _ => None,
    })
}

/// A plaintext party's fit answer: its model and example count.
fn plain_fit(task: &TaskOut, n: u64, v: &[f32]) -> ResultBody {
    let global = task.params.clone().expect("a fit task carries the model");
    let job = JobSpec::parse(BASE_SPEC, "t", &Limits::default()).unwrap().facts("job-t", &Limits::default());
    let mut client = Plain.client(&toml::Table::new(), &job, identity("x")).unwrap();
    let TaskBody::Fit { config, .. } = &task.task.body else { panic!("not a fit task: {task:?}") };
    let update = LocalUpdate { global: &global, fit: config, local: params(v), num_examples: n, train_loss: None };
    let contribution = client.contribute(task.round, &[], update).unwrap();
    ResultBody::Fit { metrics: Metrics::new(), contribution }
}

const BASE_SPEC: &str = "name = \"t\"\nkind = \"train\"\n[parties]\nnames = [\"a\"]\ndataset = \"d\"\n\
                         [model]\nkind = \"logistic_regression\"\nclasses = 2\n";

mod plaintext {
    use super::*;

    pub(super) fn spec(names: &[&str], min: usize, rounds: u32, extra: &str) -> JobSpec {
        let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let text = format!(
            "name = \"t\"\nkind = \"train\"\nrounds = {rounds}\n{extra}\n[parties]\nnames = [{}]\nmin = {min}\ndataset = \"d\"\n\
             [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[timeouts]\nround_secs = 10\nrecruit_secs = 5\n",
            names.join(",")
        );
        JobSpec::parse(&text, "test", &Limits::default()).unwrap()
    }

    pub(super) struct H {
        pub(super) s: Session,
        pub(super) now: Millis,
        outputs: Vec<Output>,
        pub(super) fail_persist: bool,
    }

    impl H {
        pub(super) fn new(spec: JobSpec, start: Start) -> H {
            H::with(spec, start, &Plugins::default())
        }
        pub(super) fn with(spec: JobSpec, start: Start, plugins: &Plugins) -> H {
            H { s: session(spec, start, plugins), now: 0, outputs: Vec::new(), fail_persist: false }
        }
        pub(super) fn feed(&mut self, input: Input) {
            let out = drive(&mut self.s, self.now, input, self.fail_persist);
            self.outputs.extend(out);
        }
        pub(super) fn take(&mut self) -> Vec<Output> {
            std::mem::take(&mut self.outputs)
        }
        pub(super) fn connect_and_accept(&mut self, parties: &[&str]) {
            for p in parties {
                self.feed(Input::connected(p));
            }
            for p in parties {
                self.feed(Input::Answer { party: (*p).into(), accepted: true, reason: String::new() });
            }
        }
        /// Tasks of the current stage: (party, task).
        pub(super) fn tasks(&mut self) -> Vec<(String, TaskOut)> {
            task_pairs(self.take())
        }
        pub(super) fn setup(&mut self, tasks: &[(String, TaskOut)], init: &[f32]) {
            for (p, t) in tasks {
                assert_eq!(t.stage, Stage::Setup);
                let result = ResultBody::Setup { params: params(init), stats: FeatureStats::default() };
                self.feed(Input::Result { party: p.clone(), task_id: t.task_id, result });
            }
        }
        pub(super) fn fit(&mut self, party: &str, task: &TaskOut, n: u64, v: &[f32]) {
            let result = plain_fit(task, n, v);
            self.feed(Input::Result { party: party.into(), task_id: task.task_id, result });
        }
        pub(super) fn eval(&mut self, party: &str, task: &TaskOut, n: u64, acc: f64) {
            let result = ResultBody::Evaluate {
                num_examples: n,
                loss: 1.0 - acc,
                metrics: [("accuracy".to_string(), acc)].into(),
            };
            self.feed(Input::Result { party: party.into(), task_id: task.task_id, result });
        }
    }

    fn status(state: PartyState, detail: Option<String>, last_round: u32) -> PartyStatus {
        PartyStatus { state, detail, last_round }
    }

    pub(super) fn through_setup(h: &mut H, parties: &[&str]) -> Vec<(String, TaskOut)> {
        h.connect_and_accept(parties);
        let t = h.tasks();
        h.setup(&t, &[0.0]);
        h.tasks()
    }

    #[test]
    fn full_job_aggregates_the_weighted_mean_each_round() {
        let mut h = H::new(spec(&["a", "b", "c"], 3, 2, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        assert_eq!(t.len(), 3);
        h.setup(&t, &[0.0, 0.0]);
        let cp = h.take();
        assert!(matches!(&cp[0], Output::Checkpoint(Checkpoint { round: 0, record: None, .. })));
        let fit = task_pairs(cp);
        assert!(fit.iter().all(|(_, t)| t.stage == Stage::Fit && t.round == 1));
        h.now = 40;
        h.fit("a", &fit[0].1, 1, &[1.0, 1.0]);
        h.fit("b", &fit[1].1, 2, &[4.0, 1.0]);
        assert!(h.tasks().is_empty(), "no evaluation before the last fit result");
        h.now = 250;
        h.fit("c", &fit[2].1, 1, &[3.0, 5.0]);
        let ev = h.tasks();
        assert!(ev.iter().all(|(_, t)| t.stage == Stage::Evaluate));
        // (1*1 + 2*4 + 1*3)/4 = 3, (1 + 2 + 5)/4 = 2
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![3.0, 2.0]);
        h.eval("a", &ev[0].1, 10, 0.5);
        h.eval("b", &ev[1].1, 30, 1.0);
        h.now = 265;
        h.eval("c", &ev[2].1, 10, 0.5);
        let out = h.take();
        let Output::Checkpoint(Checkpoint { round: 1, record: Some(rec), .. }) = &out[0] else { panic!("{out:?}") };
        assert_eq!(rec.metrics["accuracy"], 0.8);
        // Each stage's duration on the session's clock: fit from 0 to 250 ms
        // (the slowest party), evaluation from 250 to 265 ms.
        assert_eq!(rec.metrics["stage_fit_ms"], 250.0);
        assert_eq!(rec.metrics["stage_evaluate_ms"], 15.0);
        assert_eq!(rec.participants, vec!["a", "b", "c"]);
        assert_eq!(h.s.rounds_completed(), 1);
        assert!(finished(&out).is_none());
    }

    /// Central party-level DP: the coordinator's noise reaches the model.
    /// Two of three named parties send no change to a model of 4,000 zeros
    /// (the third drops); at z = 50 and clip 1 the sum is divided by the
    /// three named parties, a public count, so the model carries noise of
    /// s.d. z·C/3 ≈ 16.7 a value (a coordinator that dropped the noise
    /// would leave zeros; one that divided by the two that answered, 25).
    #[test]
    fn central_dp_noise_reaches_the_aggregate_at_its_calibrated_scale() {
        let dp = "[dp]\nlevel = \"party\"\nnoise_multiplier = 50.0\nupdate_clip = 1.0\n";
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, dp), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        let zeros = vec![0.0f32; 4000];
        h.setup(&t, &zeros);
        let fit = h.tasks();
        assert!(fit.iter().all(|(_, t)| t.stage == Stage::Fit), "{fit:?}");
        h.fit("a", &fit[0].1, 1, &zeros);
        h.feed(Input::Disconnected("c".into()));
        h.fit("b", &fit[1].1, 1, &zeros);
        let out = h.take();
        let model = out
            .iter()
            .find_map(|o| match o {
                Output::Checkpoint(Checkpoint { round: 1, model: Some(m), .. }) => Some(m.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no round-1 checkpoint: {out:?}"));
        let values = &model.tensors()[0].data;
        let var = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / values.len() as f64;
        let want = (50.0f64 / 3.0).powi(2);
        // 4,000 values: the sample variance's relative s.d. is about 2%.
        assert!((var / want - 1.0).abs() < 0.15, "variance {var}, calibrated {want}");
    }

    #[test]
    fn party_lost_mid_round_is_dropped_and_the_round_completes() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.feed(Input::Disconnected("c".into()));
        h.fit("b", &fit[1].1, 1, &[4.0]);
        let ev = h.tasks();
        assert_eq!(ev.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![3.0]);
        h.eval("a", &ev[0].1, 1, 1.0);
        h.eval("b", &ev[1].1, 1, 1.0);
        let out = h.take();
        let Output::Checkpoint(Checkpoint { record: Some(rec), .. }) = &out[0] else { panic!() };
        assert_eq!(rec.dropped["c"], "fit: disconnected");
        assert_eq!(finished(&out), Some((JobState::Succeeded, None)));
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);
    }

    #[test]
    fn a_party_lost_between_stages_is_dropped_at_the_next_one() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 2, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        for (i, (p, t)) in fit.iter().enumerate() {
            h.fit(p, t, 1, &[i as f32]);
        }
        let ev = h.tasks();
        h.eval("c", &ev[2].1, 1, 1.0);
        h.feed(Input::Disconnected("c".into()));
        h.eval("a", &ev[0].1, 1, 1.0);
        h.eval("b", &ev[1].1, 1, 1.0);
        let out = h.take();
        let fit2: Vec<String> = task_pairs(out).into_iter().map(|(p, _)| p).collect();
        assert_eq!(fit2, vec!["a", "b"]);
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);
        assert_eq!(h.s.parties()["c"].detail.as_deref(), Some("round 2 fit: not connected"));
    }

    #[test]
    fn below_the_minimum_the_job_fails_naming_the_missing_party() {
        let mut h = H::new(spec(&["a", "b", "c"], 3, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.fit("b", &fit[1].1, 1, &[2.0]);
        h.feed(Input::Disconnected("c".into()));
        let (state, err) = finished(&h.take()).unwrap();
        assert_eq!(state, JobState::Failed);
        let err = err.unwrap();
        assert!(err.contains("c (fit: disconnected)") && err.contains("needs 3"), "{err}");
    }

    #[test]
    fn a_silent_party_times_out_on_the_virtual_clock() {
        let mut h = H::new(spec(&["a", "b"], 1, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        assert_eq!(h.s.next_deadline(), Some(10_000));
        h.now = 9_999;
        h.feed(Input::Tick);
        assert!(h.tasks().is_empty());
        h.now = 10_000;
        h.feed(Input::Tick);
        let ev = h.tasks();
        // b is still connected, so it is asked to evaluate; only a's update was aggregated.
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![2.0]);
        assert!(h.s.parties()["b"].detail.as_deref().unwrap().contains("no answer within 10s"));
    }

    /// With `timeouts.straggler_secs`, a stage waits that long after
    /// `parties.min` have answered, not to its deadline: a party that
    /// answers just before each deadline costs a round that much at most.
    /// Without it (above) the stage waits to `round_secs`.
    #[test]
    fn a_straggler_is_dropped_once_the_minimum_has_answered_and_its_time_is_up() {
        let mut spec = spec(&["a", "b", "c"], 2, 1, "");
        spec.timeouts.straggler_secs = Some(2);
        let mut h = H::new(spec, Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.now = 100;
        h.fit("a", &fit[0].1, 1, &[2.0]);
        assert_eq!(h.s.next_deadline(), Some(10_000), "one answer: below the minimum");
        h.now = 500;
        h.fit("b", &fit[1].1, 1, &[4.0]);
        assert_eq!(h.s.next_deadline(), Some(2_500), "two answers: 2 s more");
        h.now = 2_499;
        h.feed(Input::Tick);
        assert!(h.tasks().is_empty());
        h.now = 2_500;
        h.feed(Input::Tick);
        let ev = h.tasks();
        assert_eq!(ev.len(), 3, "c is still connected: it evaluates");
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![3.0]);
        let detail = h.s.parties()["c"].detail.clone().unwrap();
        assert_eq!(detail, "round 1 fit: no answer within 2s of the first 2 answers");
        // Late is late: c's answer now is stale.
        h.fit("c", &fit[2].1, 1, &[9.0]);
        assert!(h.tasks().is_empty());
    }

    /// The cut counts answers from parties still connected: one that
    /// answered and then left stops the clock (cutting the rest could
    /// leave the next stage below the minimum), and another answer starts
    /// it again.
    #[test]
    fn the_straggler_cut_counts_only_parties_still_connected() {
        let mut spec = spec(&["a", "b", "c", "d"], 2, 1, "");
        spec.timeouts.straggler_secs = Some(2);
        let mut h = H::new(spec, Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c", "d"]);
        h.now = 100;
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.now = 500;
        h.fit("b", &fit[1].1, 1, &[4.0]);
        assert_eq!(h.s.next_deadline(), Some(2_500));
        h.now = 600;
        h.feed(Input::Disconnected("a".into()));
        assert_eq!(h.s.next_deadline(), Some(10_000), "one connected answer: below the minimum");
        h.now = 3_000;
        h.feed(Input::Tick);
        assert!(h.tasks().is_empty(), "no cut while the clock is stopped");
        // a comes back: its answer counts again, from now.
        h.now = 3_050;
        h.feed(Input::connected("a"));
        assert_eq!(h.s.next_deadline(), Some(5_050), "a and b: 2 s from now");
        h.now = 3_100;
        h.fit("c", &fit[2].1, 1, &[6.0]);
        assert_eq!(h.s.next_deadline(), Some(5_050), "the clock runs on");
    }

    /// `timeouts.straggler_secs` must be a real cut: at least a second and
    /// below the stage deadline, else the spec is refused naming it.
    #[test]
    fn a_straggler_cut_that_never_applies_is_refused() {
        for bad in ["0", "10", "11"] {
            let text = format!(
                "name = \"t\"\nkind = \"train\"\n[parties]\nnames = [\"a\"]\ndataset = \"d\"\n\
                 [model]\nkind = \"logistic_regression\"\nclasses = 2\n[timeouts]\nround_secs = 10\nstraggler_secs = {bad}\n"
            );
            let e = JobSpec::parse(&text, "t", &Limits::default()).unwrap_err().to_string();
            assert!(e.contains("timeouts.straggler_secs") && e.contains("below timeouts.round_secs (10)"), "{e}");
        }
    }

    #[test]
    fn a_nan_update_drops_the_party_by_name() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.fit("b", &fit[1].1, 1, &[f32::NAN]);
        h.fit("c", &fit[2].1, 3, &[6.0]);
        let ev = h.tasks();
        // (1*2 + 3*6)/4 = 5: b's update is left out; b may still evaluate.
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![5.0]);
        let d = h.s.parties()["b"].detail.clone().unwrap();
        assert!(d.contains("party b sent a bad update") && d.contains("NaN"), "{d}");
    }

    /// A training metric out of bounds (a loss of 1e13, an accuracy of 2)
    /// drops its party by name on arrival: checked only by the strategy, it
    /// failed the whole job (found by review).
    #[test]
    fn an_out_of_bounds_training_metric_drops_the_party_not_the_job() {
        let mut h = H::new(spec(&["a", "b", "c"], 1, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        for (p, task, metric) in [("b", &fit[1].1, ("train_loss", 1e13)), ("c", &fit[2].1, ("accuracy", 2.0))] {
            let ResultBody::Fit { contribution, .. } = plain_fit(task, 1, &[9.0]) else { panic!() };
            let result = ResultBody::Fit { metrics: [(metric.0.to_string(), metric.1)].into(), contribution };
            h.feed(Input::Result { party: p.into(), task_id: task.task_id, result });
        }
        h.fit("a", &fit[0].1, 1, &[2.0]);
        let out = h.take();
        assert!(finished(&out).is_none_or(|f| f.0 != JobState::Failed), "the job goes on: {out:?}");
        let d = |p: &str| h.s.parties()[p].detail.clone().unwrap_or_default();
        assert!(d("b").contains("party b sent a bad update: metric train_loss"), "{}", d("b"));
        assert!(d("c").contains("party c sent a bad update: metric accuracy is 2"), "{}", d("c"));
        assert_ne!(h.s.parties()["a"].state, PartyState::Failed);
    }

    /// A party dropped while its stream comes through a relay is named
    /// with the relay, which could have altered what it forwarded.
    #[test]
    fn a_party_dropped_through_a_relay_is_named_with_its_relay() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        for p in ["a", "b", "c"] {
            let relay = (p == "b").then(|| "edge-a".to_string());
            h.feed(Input::Connected { party: p.into(), certificate: Arc::from(Vec::new()), relay });
        }
        for p in ["a", "b", "c"] {
            h.feed(Input::Answer { party: p.into(), accepted: true, reason: String::new() });
        }
        let t = h.tasks();
        h.setup(&t, &[0.0]);
        let fit = h.tasks();
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.fit("b", &fit[1].1, 1, &[f32::NAN]);
        h.fit("c", &fit[2].1, 3, &[6.0]);
        let d = h.s.parties()["b"].detail.clone().unwrap();
        assert!(d.contains("party b sent a bad update") && d.contains("through relay edge-a"), "{d}");
        assert!(!h.s.parties()["c"].detail.clone().unwrap_or_default().contains("relay"));
        // A stream the relay cut: the drop names the relay too.
        let ev = h.tasks();
        h.feed(Input::Connected {
            party: "c".into(),
            certificate: Arc::from(Vec::new()),
            relay: Some("edge-b".into()),
        });
        h.feed(Input::Disconnected("c".into()));
        assert!(!ev.is_empty());
        let d = h.s.parties()["c"].detail.clone().unwrap();
        assert!(d.contains("disconnected (its stream came through relay edge-b)"), "{d}");
    }

    #[test]
    fn refusals_fail_recruitment_with_the_reason() {
        let mut h = H::new(spec(&["a", "b"], 2, 1, ""), Start::Fresh { model: None });
        h.feed(Input::connected("a"));
        h.feed(Input::connected("b"));
        h.feed(Input::Answer { party: "a".into(), accepted: true, reason: String::new() });
        h.feed(Input::Answer {
            party: "b".into(),
            accepted: false,
            reason: "policy forbids privacy mode \"none\"".into(),
        });
        let (state, err) = finished(&h.take()).unwrap();
        assert_eq!(state, JobState::Failed);
        assert!(err.unwrap().contains("b: policy forbids privacy mode"));
        assert_eq!(h.s.parties()["b"].state, PartyState::Refused);
    }

    #[test]
    fn recruitment_deadline_starts_with_enough_parties_or_fails() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b"]);
        assert!(h.tasks().is_empty(), "waits for c until the deadline");
        h.now = 5_000;
        h.feed(Input::Tick);
        assert_eq!(h.tasks().len(), 2);
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);

        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a"]);
        h.now = 5_000;
        h.feed(Input::Tick);
        let err = finished(&h.take()).unwrap().1.unwrap();
        assert!(err.contains("b: not connected") && err.contains("c: not connected"), "{err}");
    }

    #[test]
    fn setup_excludes_a_party_with_another_architecture() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        h.setup(&t[..2], &[0.0]);
        let result = ResultBody::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "c".into(), task_id: t[2].1.task_id, result });
        let fit = h.tasks();
        assert_eq!(fit.len(), 2);
        assert_eq!(h.s.parties()["c"].state, PartyState::Failed);
    }

    /// The architecture most parties sent is the model's, whichever party's
    /// name sorts first: an odd party "a" is excluded, not the honest "b"
    /// and "c" for differing from it (found by review); with no majority
    /// the job fails, naming each side.
    #[test]
    fn setup_takes_the_majoritys_architecture_not_the_first_partys() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        let odd = ResultBody::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "a".into(), task_id: t[0].1.task_id, result: odd });
        h.setup(&t[1..], &[0.0]);
        let fit = h.tasks();
        assert_eq!(fit.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(h.s.parties()["a"].state, PartyState::Failed);
        assert!(h.s.parties()["a"].detail.as_deref().is_some_and(|e| e.contains("differs from the one 2 of the 3")));

        let mut h = H::new(spec(&["a", "b"], 1, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b"]);
        let t = h.tasks();
        let odd = ResultBody::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "a".into(), task_id: t[0].1.task_id, result: odd });
        h.setup(&t[1..], &[0.0]);
        let err = finished(&h.take()).unwrap().1.unwrap();
        assert!(err.contains("none is the majority's (a against b)"), "{err}");

        // Nor through statistics nobody uses (no standardisation here): "a"
        // sends some, the honest parties none, and nobody is excluded.
        let mut h = H::new(spec(&["a", "b", "c"], 3, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        let stats = FeatureStats { count: 5, sum: vec![1.0], sum_sq: vec![1.0] };
        let odd = ResultBody::Setup { params: params(&[0.0]), stats };
        h.feed(Input::Result { party: "a".into(), task_id: t[0].1.task_id, result: odd });
        h.setup(&t[1..], &[0.0]);
        assert_eq!(h.tasks().len(), 3, "an honest party was excluded over statistics nobody uses");

        // A starting model that is not finite, from the party first by
        // name, is not everyone's starting point: that party is excluded,
        // and round 1 starts from the next one's.
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        let odd = ResultBody::Setup { params: params(&[f32::INFINITY]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "a".into(), task_id: t[0].1.task_id, result: odd });
        h.setup(&t[1..], &[0.0]);
        let fit = h.tasks();
        assert_eq!(fit.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert!(fit.iter().all(|(_, t)| t.params.as_ref().unwrap().tensors()[0].data[0].is_finite()));
        assert!(h.s.parties()["a"].detail.as_deref().is_some_and(|e| e.contains("starting model is not finite")));

        // Nor does the first party by name choose the starting values: the
        // ones most parties sent are taken (honest parties derive them from
        // the spec's seed), and nobody is excluded for differing.
        let mut h = H::new(spec(&["a", "b", "c"], 3, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        let chosen = ResultBody::Setup { params: params(&[1e30]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "a".into(), task_id: t[0].1.task_id, result: chosen });
        h.setup(&t[1..], &[0.5]);
        let fit = h.tasks();
        assert_eq!(fit.len(), 3, "nobody excluded");
        assert!(fit.iter().all(|(_, t)| t.params.as_ref().unwrap().tensors()[0].data == [0.5]), "{fit:?}");
    }

    #[test]
    fn stale_and_unsolicited_results_are_ignored() {
        let mut h = H::new(spec(&["a", "b"], 2, 2, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b"]);
        h.fit("a", &TaskOut { task_id: 999, ..fit[0].1.clone() }, 1, &[100.0]);
        h.fit("x", &fit[0].1, 1, &[100.0]);
        h.fit("a", &fit[0].1, 1, &[1.0]);
        h.fit("a", &fit[0].1, 1, &[100.0]); // duplicate
        h.fit("b", &fit[1].1, 1, &[3.0]);
        let ev = h.tasks();
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![2.0]);
    }

    #[test]
    fn resume_starts_at_the_next_round_with_the_checkpoint() {
        let parties: BTreeMap<String, PartyStatus> = [
            ("a".to_string(), status(PartyState::Accepted, None, 3)),
            ("b".to_string(), status(PartyState::Refused, Some("no".into()), 0)),
        ]
        .into();
        let start = Start::Resume { round: 3, model: Some(params(&[7.0])), state: State::new(), parties };
        let mut h = H::new(spec(&["a", "b"], 1, 5, ""), start);
        h.feed(Input::connected("a"));
        assert!(matches!(h.take()[0], Output::Offer { .. }));
        h.feed(Input::Answer { party: "a".into(), accepted: true, reason: String::new() });
        let t = h.tasks();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].1.stage, t[0].1.round), (Stage::Fit, 4));
        assert_eq!(t[0].1.params.as_ref().unwrap().tensors()[0].data, vec![7.0]);
    }

    /// An evaluation over no rows at all (a pipeline's count when nothing
    /// new arrived) succeeds with zero examples rather than failing.
    #[test]
    fn an_evaluation_over_no_rows_records_zero_examples() {
        let mut spec = spec(&["a", "b"], 2, 1, "from_job = \"j0\"");
        spec.kind = confide_proto::jobspec::JobKind::Evaluate;
        let mut h = H::new(spec, Start::Fresh { model: Some(params(&[1.0])) });
        h.connect_and_accept(&["a", "b"]);
        let tasks = h.tasks();
        assert!(tasks.iter().all(|(_, t)| t.stage == Stage::Evaluate), "{tasks:?}");
        for (p, t) in &tasks {
            h.eval(p, t, 0, 0.0);
        }
        let out = h.take();
        let record = out.iter().find_map(|o| match o {
            Output::Checkpoint(Checkpoint { record: Some(r), .. }) => Some(r.clone()),
            _ => None,
        });
        assert_eq!(record.expect("a round record").metrics.get("num_examples"), Some(&0.0));
        assert_eq!(finished(&out).map(|f| f.0), Some(JobState::Succeeded), "{out:?}");
    }

    /// A plaintext evaluation's weight and metrics are its party's word:
    /// a party claiming more rows than `aggregation.none.max_examples`, or an
    /// accuracy outside [0, 1], is dropped by name and left out of the
    /// means (before, 10^12 rows and accuracy 1.0 decided a pipeline's
    /// gate alone; found by review).
    #[test]
    fn an_evaluation_claiming_too_many_rows_or_an_impossible_accuracy_drops_its_party() {
        let mut spec = spec(&["a", "b", "c"], 1, 1, "from_job = \"j0\"");
        spec.kind = confide_proto::jobspec::JobKind::Evaluate;
        let mut h = H::new(spec, Start::Fresh { model: Some(params(&[1.0])) });
        h.connect_and_accept(&["a", "b", "c"]);
        let tasks = h.tasks();
        h.eval("a", &tasks[0].1, 100, 0.5);
        h.eval("b", &tasks[1].1, 1_000_000_000_000, 1.0);
        h.eval("c", &tasks[2].1, 10, 1.5);
        let out = h.take();
        let record = out.iter().find_map(|o| match o {
            Output::Checkpoint(Checkpoint { record: Some(r), .. }) => Some(r.clone()),
            _ => None,
        });
        let record = record.expect("a round record");
        assert_eq!(record.metrics.get("accuracy"), Some(&0.5), "{record:?}");
        assert_eq!(record.participants, ["a"], "{record:?}");
        let detail = |p: &str| h.s.parties()[p].detail.clone().unwrap_or_default();
        assert!(detail("b").contains("aggregation.none.max_examples"), "{}", detail("b"));
        assert!(detail("c").contains("metric accuracy is 1.5"), "{}", detail("c"));
    }

    #[test]
    fn evaluation_cadence_and_cancel() {
        let mut h = H::new(spec(&["a"], 1, 3, "[evaluation]\nevery = 2"), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a"]);
        h.fit("a", &fit[0].1, 1, &[1.0]);
        let out = h.take();
        assert!(matches!(out[0], Output::Checkpoint(Checkpoint { round: 1, .. })), "round 1 is not evaluated");
        let Output::Task { task, stage, .. } = &out[1] else { panic!() };
        assert_eq!((*stage, task.round), (Stage::Fit, 2));
        h.feed(Input::Cancel);
        assert_eq!(finished(&h.take()).unwrap().0, JobState::Cancelled);
        h.feed(Input::connected("a"));
        assert!(h.take().is_empty(), "a finished session ignores input");
    }
}

mod secure {
    use super::*;

    // Five parties: the default threat model's majority threshold (t = 3 of
    // k = 4) lets a round lose one.
    const PARTIES: [&str; 5] = ["a", "b", "c", "d", "e"];

    fn spec(min: usize) -> JobSpec {
        let text = format!(
            "name = \"s\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"a\", \"b\", \"c\", \"d\", \"e\"]\nmin = {min}\n\
             dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
             [aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 100\nclip = 2.0\n[timeouts]\nround_secs = 10\n"
        );
        JobSpec::parse(&text, "t", &Limits::default()).unwrap()
    }

    /// Each party's examples and trained parameters.
    fn local(p: &str) -> (u64, Vec<f32>) {
        match p {
            "a" => (10, vec![1.0, -1.0]),
            "b" => (30, vec![0.5, 0.5]),
            "c" => (20, vec![-1.0, 1.5]),
            "d" => (40, vec![0.25, 0.0]),
            _ => (25, vec![-0.5, 0.75]),
        }
    }

    fn tasks(out: Vec<Output>) -> Vec<(String, TaskOut)> {
        task_pairs(out)
    }

    struct Run {
        s: Session,
        clients: BTreeMap<String, Box<dyn AggregationClient>>,
    }

    impl Run {
        fn feed(&mut self, input: Input) -> Vec<Output> {
            drive(&mut self.s, 0, input, false)
        }

        fn answer(&mut self, party: &str, task_id: u64, result: ResultBody) -> Vec<Output> {
            self.feed(Input::Result { party: party.into(), task_id, result })
        }

        /// Connects the five parties to a session of `spec`, each with a
        /// SecAgg+ client; returns the run and the setup tasks.
        fn recruit(spec: JobSpec) -> (Run, Vec<Output>) {
            let job = spec.facts("job-t", &Limits::default());
            let clients = PARTIES
                .iter()
                .map(|p| {
                    let c = SecAggPlus.client(&spec.aggregation.settings, &job, identity(p)).unwrap();
                    (p.to_string(), c)
                })
                .collect();
            let mut r = Run { s: session(spec, Start::Fresh { model: None }, &Plugins::default()), clients };
            for p in PARTIES {
                r.feed(Input::connected(p));
            }
            let mut out = Vec::new();
            for p in PARTIES {
                out = r.feed(Input::Answer { party: p.into(), accepted: true, reason: String::new() });
            }
            (r, out)
        }

        /// Recruits, runs setup, and returns the secure fit tasks.
        fn start(min: usize) -> (Run, Vec<(String, TaskOut)>) {
            Run::start_spec(spec(min))
        }

        /// [`Run::start`] for a spec of the caller's.
        fn start_spec(spec: JobSpec) -> (Run, Vec<(String, TaskOut)>) {
            let (mut r, out) = Run::recruit(spec);
            let mut fit = Vec::new();
            for (p, t) in tasks(out) {
                let result = ResultBody::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
                fit = tasks(r.answer(&p, t.task_id, result));
            }
            (r, fit)
        }

        /// Every party answers its fit task and deals its shares: the
        /// masked-input tasks.
        fn through_fit_and_shares(&mut self, fit: &[(String, TaskOut)]) -> Vec<(String, TaskOut)> {
            let mut shares = Vec::new();
            for (p, t) in fit {
                shares = tasks(self.fit(p, t));
            }
            let mut masked = Vec::new();
            for (p, t) in &shares {
                masked = tasks(self.step(p, t));
            }
            masked
        }

        /// A party trains and advertises keys.
        fn fit(&mut self, p: &str, t: &TaskOut) -> Vec<Output> {
            let TaskBody::Fit { global, round_message, config } = &t.task.body else { panic!("{t:?}") };
            let (n, l) = local(p);
            let update = LocalUpdate { global, fit: config, local: params(&l), num_examples: n, train_loss: None };
            let contribution = self.clients.get_mut(p).unwrap().contribute(t.round, round_message, update).unwrap();
            self.answer(p, t.task_id, ResultBody::Fit { metrics: Metrics::new(), contribution })
        }

        /// What party `p`'s client answers to an aggregation task.
        fn client_answer(&mut self, p: &str, t: &TaskOut) -> Envelope {
            let TaskBody::Aggregation { stage, message } = &t.task.body else { panic!("{t:?}") };
            let Stage::Aggregation(name) = t.stage else { panic!() };
            assert_eq!(stage, name.as_str());
            self.clients.get_mut(p).unwrap().on_step(t.round, name, message.clone()).unwrap()
        }

        fn step(&mut self, p: &str, t: &TaskOut) -> Vec<Output> {
            let message = self.client_answer(p, t);
            let stage = t.stage.name().to_owned();
            self.answer(p, t.task_id, ResultBody::Aggregation { stage, message })
        }

        /// Party `p`'s part of a secure sum: its feature sums or its evaluation.
        fn sum(&mut self, p: &str, t: &TaskOut) -> Vec<Output> {
            let TaskBody::SecureSum { of, round_message } = &t.task.body else { panic!("{t:?}") };
            let (layout, values) = match of {
                SumOf::FeatureStats => (SumLayout::feature_stats(2), sum::feature_stats_values(&local_stats(p))),
                SumOf::Evaluation { global } => {
                    (SumLayout::evaluation(global), sum::evaluation_values(&local_eval(p)).unwrap())
                }
            };
            let client = self.clients.get_mut(p).unwrap();
            let contribution = client.contribute_sum(t.round, round_message, &layout, &values).unwrap();
            self.answer(p, t.task_id, ResultBody::SecureSum { contribution })
        }

        /// Answers `tasks` and the protocol steps that follow until the
        /// tasks of another stage (or none) come; returns the last outputs.
        fn through_steps(&mut self, mut tasks: Vec<(String, TaskOut)>) -> Vec<Output> {
            loop {
                let mut out = Vec::new();
                for (p, t) in &tasks {
                    out = match &t.task.body {
                        TaskBody::SecureSum { .. } => self.sum(p, t),
                        _ => self.step(p, t),
                    };
                }
                let next = task_pairs(out.clone());
                if next.is_empty() || !next.iter().all(|(_, t)| matches!(t.stage, Stage::Aggregation(_))) {
                    return out;
                }
                tasks = next;
            }
        }
    }

    fn local_stats(p: &str) -> FeatureStats {
        let (n, v) = local(p);
        FeatureStats {
            count: n,
            sum: v.iter().map(|x| f64::from(*x) * n as f64).collect(),
            sum_sq: v.iter().map(|x| f64::from(x * x) * n as f64 + 1.0).collect(),
        }
    }

    fn local_eval(p: &str) -> EvalOutcome {
        let (n, v) = local(p);
        let accuracy = f64::from(v[0].abs()) / 2.0;
        EvalOutcome { num_examples: n, loss: f64::from(v[1].abs()), metrics: [("accuracy".into(), accuracy)].into() }
    }

    fn expected(parties: &[&str]) -> Vec<f32> {
        let total: u64 = parties.iter().map(|p| local(p).0).sum();
        (0..2).map(|j| parties.iter().map(|p| local(p).0 as f32 * local(p).1[j]).sum::<f32>() / total as f32).collect()
    }

    #[test]
    fn a_party_lost_at_the_masked_input_stage_is_left_out_of_an_exact_sum() {
        let (mut r, fit) = Run::start(3);
        assert_eq!(fit.len(), 5);
        let mut next = Vec::new();
        for (p, t) in &fit {
            next = tasks(r.fit(p, t));
        }
        assert!(next.iter().all(|(_, t)| t.stage == Stage::Aggregation(SHARES)));
        let mut masked = Vec::new();
        for (p, t) in &next {
            masked = tasks(r.step(p, t));
        }
        assert!(masked.iter().all(|(_, t)| t.stage == Stage::Aggregation(MASKED_INPUT)));
        let mut consistency = Vec::new();
        for (p, t) in masked.iter().filter(|(p, _)| p != "c") {
            consistency = tasks(r.step(p, t));
        }
        assert!(consistency.is_empty(), "still waiting for c");
        consistency = tasks(r.feed(Input::Disconnected("c".into())));
        assert_eq!(consistency.len(), 4);
        assert!(consistency.iter().all(|(_, t)| t.stage == Stage::Aggregation(CONSISTENCY)));
        let mut unmask = Vec::new();
        for (p, t) in &consistency {
            unmask = tasks(r.step(p, t));
        }
        assert_eq!(unmask.len(), 4);
        let mut eval = Vec::new();
        for (p, t) in &unmask {
            eval = tasks(r.step(p, t));
        }
        assert!(eval.iter().all(|(_, t)| t.stage == Stage::Evaluate), "{eval:?}");
        // The evaluation is a secure sum too: no party is asked for its metrics in the clear.
        assert!(eval.iter().all(|(_, t)| matches!(t.task.body, TaskBody::SecureSum { .. })), "{eval:?}");
        let got: Vec<f32> = eval[0].1.params.as_ref().unwrap().flat_values().collect();
        let want = expected(&["a", "b", "d", "e"]);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
        assert_eq!(r.s.record().unwrap().dropped["c"], "secagg-masked-input: disconnected");
        assert_eq!(r.s.record().unwrap().participants, vec!["a", "b", "d", "e"]);
        let out = r.through_steps(eval);
        let Some(rec) = out.iter().find_map(|o| match o {
            Output::Checkpoint(Checkpoint { round: 1, record: Some(rec), .. }) => Some(rec),
            _ => None,
        }) else {
            panic!("the last round ends with its checkpoint: {out:?}")
        };
        let survivors = ["a", "b", "d", "e"];
        let n: u64 = survivors.iter().map(|p| local(p).0).sum();
        let mean = |f: &dyn Fn(&EvalOutcome) -> f64| {
            survivors.iter().map(|p| f(&local_eval(p)) * local(p).0 as f64).sum::<f64>() / n as f64
        };
        assert!((rec.metrics["accuracy"] - mean(&|e| e.metrics["accuracy"])).abs() < 1e-6, "{:?}", rec.metrics);
        assert!((rec.metrics["loss"] - mean(&|e| e.loss)).abs() < 1e-6, "{:?}", rec.metrics);
        let metrics = &rec.metrics;
        for stage in [
            Stage::Fit,
            Stage::Aggregation(SHARES),
            Stage::Aggregation(MASKED_INPUT),
            Stage::Aggregation(CONSISTENCY),
            Stage::Aggregation(UNMASK),
        ] {
            assert!(metrics.contains_key(&stage.metric_name()), "{} missing from {metrics:?}", stage.metric_name());
        }
    }

    /// `timeouts.straggler_secs` cuts a stage that counts heads short once
    /// `parties.min` have answered, and leaves alone a stage whose protocol
    /// counts its own quorum (the unmasking's reconstruction threshold).
    #[test]
    fn the_straggler_cut_applies_to_head_count_stages_only() {
        let mut spec = spec(3);
        spec.timeouts.straggler_secs = Some(2);
        let (mut r, fit) = Run::start_spec(spec);
        assert_eq!(r.s.next_deadline(), Some(10_000));
        // Each stage's deadline after each answer: cut 2 s after the third
        // (parties.min) in the head-count stages, never in the others.
        let mut stage = fit;
        for (name, cut) in [("fit", true), ("shares", true), ("masked input", true), ("consistency", false)] {
            let mut next = Vec::new();
            for (i, (p, t)) in stage.iter().enumerate() {
                next = tasks(if name == "fit" { r.fit(p, t) } else { r.step(p, t) });
                let expected = if cut && i >= 2 { 2_000 } else { 10_000 };
                if i < 4 {
                    assert_eq!(r.s.next_deadline(), Some(expected), "{name}: after {} answers", i + 1);
                }
            }
            stage = next;
        }
        let unmask = stage;
        assert!(unmask.iter().all(|(_, t)| t.stage == Stage::Aggregation(UNMASK)), "{unmask:?}");
        for (p, t) in &unmask[..3] {
            assert!(tasks(r.step(p, t)).is_empty());
        }
        assert_eq!(r.s.next_deadline(), Some(10_000), "the protocol's quorum: the stage waits to its deadline");
        let mut eval = Vec::new();
        for (p, t) in &unmask[3..] {
            eval = tasks(r.step(p, t));
        }
        assert!(eval.iter().all(|(_, t)| t.stage == Stage::Evaluate), "{eval:?}");
    }

    /// The cut fires in a SecAgg+ stage: a party that has not sent its
    /// masked input 2 s after three have is dropped, and the round goes on
    /// with the four (its masks are removed as a dropout's).
    #[test]
    fn a_secagg_straggler_is_cut_from_the_masked_input_stage() {
        let mut spec = spec(3);
        spec.timeouts.straggler_secs = Some(2);
        let (mut r, fit) = Run::start_spec(spec);
        let masked = r.through_fit_and_shares(&fit);
        for (p, t) in masked.iter().filter(|(p, _)| p != "e") {
            assert!(tasks(r.step(p, t)).is_empty(), "waiting for e");
        }
        assert!(tasks(drive(&mut r.s, 1_999, Input::Tick, false)).is_empty());
        let consistency = tasks(drive(&mut r.s, 2_000, Input::Tick, false));
        assert_eq!(consistency.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert!(consistency.iter().all(|(_, t)| t.stage == Stage::Aggregation(CONSISTENCY)));
        assert_eq!(
            r.s.record().unwrap().dropped["e"],
            "secagg-masked-input: no answer within 2s of the first 3 answers"
        );
    }

    /// With standardisation on, setup's feature sums are a secure sum of
    /// their own: no party's row count or feature means reach the
    /// coordinator, and the model starts from the federation's statistics.
    #[test]
    fn setup_feature_statistics_are_summed_securely() {
        let mut spec = spec(3);
        spec.model.standardize = true;
        let (mut r, out) = Run::recruit(spec);
        let model = || {
            let t = |name: &str, v: f32| Tensor { name: name.into(), shape: vec![2], data: vec![v; 2] };
            Parameters::new(vec![t("input.mean", 0.0), t("input.std", 1.0), t("w", 0.0)]).unwrap()
        };
        let mut sums = Vec::new();
        for (p, t) in tasks(out) {
            // Nothing in the clear: the setup answer carries the architecture only.
            let result = ResultBody::Setup { params: model(), stats: FeatureStats::default() };
            sums = tasks(r.answer(&p, t.task_id, result));
        }
        assert_eq!(sums.len(), 5);
        assert!(sums.iter().all(|(_, t)| t.stage == Stage::Setup
            && matches!(t.task.body, TaskBody::SecureSum { of: SumOf::FeatureStats, .. })));
        let fit = task_pairs(r.through_steps(sums));
        assert!(fit.iter().all(|(_, t)| t.stage == Stage::Fit), "{fit:?}");
        let mut pooled = FeatureStats::default();
        for p in PARTIES {
            pooled.merge(&local_stats(p)).unwrap();
        }
        let (mean, std) = pooled.mean_std();
        let global = fit[0].1.params.as_ref().unwrap();
        for (name, want) in [("input.mean", &mean), ("input.std", &std)] {
            let got = &global.get(name).unwrap().data;
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((g - w).abs() < 1e-5, "{name}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn too_few_unmask_answers_fail_the_job_below_threshold() {
        let (mut r, fit) = Run::start(3);
        let masked = r.through_fit_and_shares(&fit);
        let mut consistency = Vec::new();
        for (p, t) in &masked {
            consistency = tasks(r.step(p, t));
        }
        let mut unmask = Vec::new();
        for (p, t) in &consistency {
            unmask = tasks(r.step(p, t));
        }
        // Only a answers; b, c, d, e vanish: no party's self-mask can be rebuilt.
        r.step("a", &unmask[0].1);
        let mut out = Vec::new();
        for p in ["b", "c", "d", "e"] {
            out = r.feed(Input::Disconnected(p.into()));
        }
        let err = out
            .iter()
            .find_map(
                |o| if let Output::Finished { state: JobState::Failed, error } = o { error.clone() } else { None },
            )
            .expect("the job fails");
        assert!(err.contains("below threshold"), "{err}");
        assert!(!out.iter().any(|o| matches!(o, Output::Checkpoint(_))), "no model from a partial sum");
    }

    #[test]
    fn a_party_revealing_a_wrong_share_is_named_and_excluded_and_the_sum_stays_exact() {
        let (mut r, fit) = Run::start(3);
        let mut next = Vec::new();
        for (p, t) in &fit {
            next = tasks(r.fit(p, t));
        }
        for _ in [SHARES, MASKED_INPUT, CONSISTENCY] {
            let mut following = Vec::new();
            for (p, t) in &next {
                following = tasks(r.step(p, t));
            }
            next = following;
        }
        assert!(next.iter().all(|(_, t)| t.stage == Stage::Aggregation(UNMASK)));
        let mut eval = Vec::new();
        for (p, t) in &next {
            let mut message = r.client_answer(p, t);
            if p == "b" {
                // b flips a bit of its share of a's self-mask seed.
                let mut answer: wire::UnmaskShares = prost::Message::decode(message.body.as_slice()).unwrap();
                let share = answer.self_mask.iter_mut().find(|s| s.owner == "a").unwrap();
                share.share[8] ^= 1;
                message = Envelope::encode(&answer);
            }
            let stage = t.stage.name().to_owned();
            eval = tasks(r.answer(p, t.task_id, ResultBody::Aggregation { stage, message }));
        }
        // a's other holders outvote the wrong share: the round completes exactly.
        assert!(eval.iter().all(|(_, t)| t.stage == Stage::Evaluate), "{eval:?}");
        let got: Vec<f32> = eval[0].1.params.as_ref().unwrap().flat_values().collect();
        for (g, w) in got.iter().zip(&expected(&PARTIES)) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
        let b = &r.s.parties()["b"];
        assert_eq!(b.state, PartyState::Failed);
        assert!(b.detail.as_deref().unwrap_or_default().contains("other than the one its dealer sent"), "{b:?}");
    }

    /// Under secure aggregation a fit answer carries no metric: one that
    /// sends its training loss in the clear is refused by name (its answer,
    /// metrics and update, is not kept) and the round goes on without it.
    #[test]
    fn training_metrics_in_the_clear_are_refused_by_name() {
        let (mut r, fit) = Run::start(3);
        let (e_task, e_fit) = fit.iter().find(|(p, _)| p == "e").map(|(_, t)| (t.task_id, t)).unwrap();
        let TaskBody::Fit { global, round_message, config } = &e_fit.task.body else { panic!() };
        let (n, l) = local("e");
        let update = LocalUpdate { global, fit: config, local: params(&l), num_examples: n, train_loss: Some(0.25) };
        let contribution = r.clients.get_mut("e").unwrap().contribute(e_fit.round, round_message, update).unwrap();
        let leaky = ResultBody::Fit { metrics: [("train_loss".to_string(), 0.25)].into(), contribution };
        r.answer("e", e_task, leaky);
        let e = r.s.parties()["e"].detail.clone().unwrap_or_default();
        assert!(e.contains("party e sent training metrics in the clear"), "{e}");
        let mut next = Vec::new();
        for (p, t) in fit.iter().filter(|(p, _)| p != "e") {
            next = tasks(r.fit(p, t));
        }
        assert_eq!(next.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_plaintext_update_or_forged_shares_drop_the_party_by_name() {
        let (mut r, fit) = Run::start(3);
        // d sends its parameters in the clear instead of keys.
        let bulk = Some(Bulk::Params(Arc::new(params(&[1.0, 1.0]))));
        let plain = ResultBody::Fit { metrics: Metrics::new(), contribution: Envelope { body: Vec::new(), bulk } };
        let d_task = fit.iter().find(|(p, _)| p == "d").unwrap().1.task_id;
        r.answer("d", d_task, plain);
        assert!(r.s.parties()["d"].detail.as_deref().unwrap().contains("plaintext update"));
        let mut next = Vec::new();
        for (p, t) in fit.iter().filter(|(p, _)| p != "d") {
            next = tasks(r.fit(p, t));
        }
        assert_eq!(next.len(), 4);
        // c forwards shares that claim to come from a.
        let (p, t) = &next[2];
        assert_eq!(p, "c");
        let honest = r.client_answer("c", t);
        let mut forged: wire::Shares = prost::Message::decode(honest.body.as_slice()).unwrap();
        forged.shares[0].from = "a".into();
        let stage = SHARES.as_str().to_owned();
        r.answer("c", t.task_id, ResultBody::Aggregation { stage, message: Envelope::encode(&forged) });
        assert!(r.s.parties()["c"].detail.as_deref().unwrap().contains("party c misbehaved"), "{:?}", r.s.parties());
    }
}

/// The session's own guarantees, beyond the ported behaviour.
mod guarantees {
    use super::plaintext::{H, spec, through_setup};
    use super::*;
    use confide_algorithms::{
        Capabilities, Error as AlgoError, FedAvg, FitInstruction, FitResult, RoundContext, Strategy,
    };

    fn checkpoints(out: &[Output]) -> Vec<&Checkpoint> {
        out.iter().filter_map(|o| if let Output::Checkpoint(c) = o { Some(c) } else { None }).collect()
    }

    #[test]
    fn a_failed_checkpoint_fails_the_job_with_its_cause_even_on_the_last_round() {
        let mut h = H::new(spec(&["a"], 1, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        let ev = h.tasks();
        h.fail_persist = true;
        h.eval("a", &ev[0].1, 1, 1.0);
        let out = h.take();
        assert_eq!(checkpoints(&out).len(), 1);
        let (state, err) = finished(&out).unwrap();
        assert_eq!(state, JobState::Failed, "the last round's checkpoint failed: the job did not succeed");
        let err = err.unwrap();
        assert!(err.contains("round 1: cannot save the checkpoint: disk full (test)"), "{err}");
        assert!(!err.contains("cancelled"), "{err}");
    }

    #[test]
    fn nothing_happens_until_a_checkpoint_is_acknowledged() {
        let mut s = session(spec(&["a"], 1, 2, ""), Start::Fresh { model: None }, &Plugins::default());
        s.handle(0, Input::connected("a"));
        s.handle(0, Input::Answer { party: "a".into(), accepted: true, reason: String::new() });
        let t = task_pairs(std::iter::from_fn(|| s.poll_output()).collect());
        let result = ResultBody::Setup { params: params(&[0.0]), stats: FeatureStats::default() };
        s.handle(0, Input::Result { party: "a".into(), task_id: t[0].1.task_id, result });
        let out: Vec<Output> = std::iter::from_fn(|| s.poll_output()).collect();
        assert!(matches!(out.as_slice(), [Output::Checkpoint(Checkpoint { round: 0, .. })]), "{out:?}");
        assert_eq!(s.next_deadline(), None, "waiting for the driver, not the clock");
        s.handle(1_000_000, Input::Tick);
        assert!(s.poll_output().is_none());
        s.handle(1_000_000, Input::Persisted { round: 7 });
        assert!(s.poll_output().is_none(), "an acknowledgement of another round is ignored");
        s.handle(1_000_000, Input::Persisted { round: 0 });
        assert!(matches!(s.poll_output(), Some(Output::Task { stage: Stage::Fit, .. })));
    }

    #[test]
    fn resuming_a_job_that_had_finished_its_rounds_runs_no_extra_round() {
        let parties = [("a".to_string(), PartyStatus { state: PartyState::Accepted, detail: None, last_round: 3 })];
        let start =
            Start::Resume { round: 3, model: Some(params(&[7.0])), state: State::new(), parties: parties.into() };
        let mut h = H::new(spec(&["a"], 1, 3, ""), start);
        h.connect_and_accept(&["a"]);
        let out = h.take();
        assert_eq!(finished(&out), Some((JobState::Succeeded, None)));
        assert!(!out.iter().any(|o| matches!(o, Output::Task { .. })), "{out:?}");
    }

    /// Runs `spec` with scripted plaintext parties for `rounds` rounds from
    /// `start`; returns the final model and every checkpoint's state.
    fn run_adam(start: Start, from: u32, to: u32) -> (Arc<Parameters>, Vec<(u32, State)>) {
        let text = "[strategy]\nname = \"fedadam\"\nserver_learning_rate = 0.5";
        let mut h = H::new(spec(&["a", "b"], 2, to, text), start);
        let mut fit = if from == 1 {
            through_setup(&mut h, &["a", "b"])
        } else {
            h.connect_and_accept(&["a", "b"]);
            h.tasks()
        };
        let mut states = Vec::new();
        let mut last = None;
        for round in from..=to {
            for (i, (p, t)) in fit.iter().enumerate() {
                assert_eq!((t.stage, t.round), (Stage::Fit, round));
                h.fit(p, t, 1 + i as u64, &[round as f32 * (i as f32 + 1.0)]);
            }
            for (p, t) in h.tasks() {
                h.eval(&p, &t, 1, 0.5);
            }
            let out = h.take();
            for c in checkpoints(&out) {
                states.push((c.round, c.state.clone()));
                last = c.model.clone();
            }
            fit = task_pairs(out);
        }
        (last.unwrap(), states)
    }

    #[test]
    fn fedadam_state_saved_with_a_checkpoint_resumes_to_the_same_model() {
        let (straight, states) = run_adam(Start::Fresh { model: None }, 1, 4);
        let (round, state) = states.iter().find(|(r, _)| *r == 2).cloned().unwrap();
        assert!(state.section("strategy").get("m").is_some(), "the moments are checkpointed: {state:?}");
        let (_, mid) = run_adam(Start::Fresh { model: None }, 1, 2);
        assert_eq!(mid.last().unwrap().1, state, "runs are deterministic");
        // The model after round 2 as the checkpoint saved it.
        let model_after_2 = {
            let (m, _) = run_adam(Start::Fresh { model: None }, 1, 2);
            (*m).clone()
        };
        let parties = [
            ("a".to_string(), PartyStatus { state: PartyState::Accepted, detail: None, last_round: 2 }),
            ("b".to_string(), PartyStatus { state: PartyState::Accepted, detail: None, last_round: 2 }),
        ];
        let start = Start::Resume { round, model: Some(model_after_2.clone()), state, parties: parties.clone().into() };
        let (resumed, _) = run_adam(start, 3, 4);
        assert_eq!(resumed, straight, "resumed with its moments, FedAdam ends where the uninterrupted run does");
        let start = Start::Resume { round, model: Some(model_after_2), state: State::new(), parties: parties.into() };
        let (forgetful, _) = run_adam(start, 3, 4);
        assert_ne!(forgetful, straight, "without the moments the run differs (so the test can fail)");
    }

    /// FedAvg that panics when it aggregates.
    struct Boom;
    impl Strategy for Boom {
        fn name(&self) -> &str {
            "boom"
        }
        fn aggregate_fit(&mut self, _: u32, _: &Parameters, _: &[FitResult]) -> Result<Parameters, AlgoError> {
            panic!("the plug-in has a bug")
        }
    }

    #[test]
    fn a_panicking_plug_in_strategy_fails_its_job_by_name() {
        let plugins = Plugins::new().strategy("boom", |_| Ok(Box::new(Boom)));
        let text = "[strategy]\nname = \"custom\"\ncustom = \"boom\"";
        let mut h = H::with(spec(&["a"], 1, 2, text), Start::Fresh { model: None }, &plugins);
        let fit = through_setup(&mut h, &["a"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        let (state, err) = finished(&h.take()).unwrap();
        let err = err.unwrap();
        assert_eq!(state, JobState::Failed);
        assert!(err.contains("strategy boom panicked") && err.contains("the plug-in has a bug"), "{err}");
    }

    /// Returns a model that is not finite.
    struct Blowup;
    impl Strategy for Blowup {
        fn name(&self) -> &str {
            "blowup"
        }
        fn aggregate_fit(&mut self, _: u32, g: &Parameters, _: &[FitResult]) -> Result<Parameters, AlgoError> {
            let mut out = g.clone();
            out.values_mut().for_each(|(_, v)| v.fill(f32::INFINITY));
            Ok(out)
        }
    }

    /// An aggregate that is not finite is never kept, checkpointed or sent
    /// to the parties: the job fails naming the strategy that made it.
    #[test]
    fn a_model_that_is_not_finite_fails_the_job_naming_the_strategy() {
        let plugins = Plugins::new().strategy("blowup", |_| Ok(Box::new(Blowup)));
        let text = "[strategy]\nname = \"custom\"\ncustom = \"blowup\"";
        let mut h = H::with(spec(&["a"], 1, 2, text), Start::Fresh { model: None }, &plugins);
        let fit = through_setup(&mut h, &["a"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        let out = h.take();
        assert!(!out.iter().any(|o| matches!(o, Output::Checkpoint(Checkpoint { round: 1, .. }))), "{out:?}");
        let (state, err) = finished(&out).unwrap();
        let err = err.unwrap();
        assert_eq!(state, JobState::Failed);
        assert!(err.contains("strategy blowup made a model that is not finite"), "{err}");
    }

    /// Asks only every other available party, each with its own learning rate.
    struct Halves;
    impl Strategy for Halves {
        fn name(&self) -> &str {
            "halves"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::ANY
        }
        fn configure_fit(
            &mut self,
            ctx: &RoundContext<'_>,
            base: &confide_algorithms::FitConfig,
        ) -> Vec<FitInstruction> {
            ctx.available
                .iter()
                .step_by(2)
                .enumerate()
                .map(|(i, p)| {
                    let mut config = base.clone();
                    config.train.learning_rate = 0.1 * (i + 1) as f64;
                    FitInstruction { party: p.clone(), config }
                })
                .collect()
        }
        fn aggregate_fit(&mut self, r: u32, g: &Parameters, res: &[FitResult]) -> Result<Parameters, AlgoError> {
            FedAvg.aggregate_fit(r, g, res)
        }
    }

    #[test]
    fn a_strategy_selects_and_configures_parties_per_round() {
        let plugins = Plugins::new().strategy("halves", |_| Ok(Box::new(Halves)));
        let text = "[strategy]\nname = \"custom\"\ncustom = \"halves\"";
        let mut h = H::with(spec(&["a", "b", "c"], 2, 1, text), Start::Fresh { model: None }, &plugins);
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        let asked: Vec<(&str, f64)> = fit
            .iter()
            .map(|(p, t)| {
                let TaskBody::Fit { config, .. } = &t.task.body else { panic!() };
                (p.as_str(), config.train.learning_rate)
            })
            .collect();
        assert_eq!(asked, [("a", 0.1), ("c", 0.2)]);
        assert!(!Arc::ptr_eq(&fit[0].1.task, &fit[1].1.task), "two configurations, two tasks");
    }

    /// Asks every available party for one more local epoch than the spec.
    struct MoreEpochs;
    impl Strategy for MoreEpochs {
        fn name(&self) -> &str {
            "more-epochs"
        }
        fn configure_fit(
            &mut self,
            ctx: &RoundContext<'_>,
            base: &confide_algorithms::FitConfig,
        ) -> Vec<FitInstruction> {
            let mut config = base.clone();
            config.train.local_epochs += 1;
            ctx.available.iter().map(|p| FitInstruction { party: p.clone(), config: config.clone() }).collect()
        }
        fn aggregate_fit(&mut self, r: u32, g: &Parameters, res: &[FitResult]) -> Result<Parameters, AlgoError> {
            FedAvg.aggregate_fit(r, g, res)
        }
    }

    /// Under party-level DP a strategy may not change how long the parties
    /// train (they refuse other epochs or batch sizes than the spec's):
    /// the job fails at the round's start, naming the strategy, before the
    /// round is spent; without DP the same strategy runs.
    #[test]
    fn a_strategy_that_changes_the_epochs_fails_a_party_level_dp_job_by_name() {
        let plugins = Plugins::new().strategy("more-epochs", |_| Ok(Box::new(MoreEpochs)));
        let strategy = "[strategy]\nname = \"custom\"\ncustom = \"more-epochs\"\n";
        let dp = "[dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 1.0\n";
        let mut h =
            H::with(spec(&["a", "b"], 2, 1, &format!("{strategy}{dp}")), Start::Fresh { model: None }, &plugins);
        h.connect_and_accept(&["a", "b"]);
        let t = h.tasks();
        h.setup(&t, &[0.0]);
        let out = h.take();
        assert!(task_pairs(out.clone()).iter().all(|(_, t)| t.stage != Stage::Fit), "{out:?}");
        let (state, err) = finished(&out).unwrap();
        let err = err.unwrap();
        assert_eq!(state, JobState::Failed);
        assert!(err.contains("more-epochs") && err.contains("party-level DP"), "{err}");
        let mut h = H::with(spec(&["a", "b"], 2, 1, strategy), Start::Fresh { model: None }, &plugins);
        let fit = through_setup(&mut h, &["a", "b"]);
        assert!(fit.iter().all(|(_, t)| t.stage == Stage::Fit) && fit.len() == 2, "{fit:?}");
    }

    /// A custom strategy that declares no secure-sum support.
    struct Plain;
    impl Strategy for Plain {
        fn name(&self) -> &str {
            "plain-only"
        }
        fn aggregate_fit(&mut self, r: u32, g: &Parameters, res: &[FitResult]) -> Result<Parameters, AlgoError> {
            FedAvg.aggregate_fit(r, g, res)
        }
    }

    #[test]
    fn a_strategy_that_cannot_use_a_weighted_sum_is_refused_before_the_job_runs() {
        let plugins = Plugins::new().strategy("plain-only", |_| Ok(Box::new(Plain)));
        let text = "[strategy]\nname = \"custom\"\ncustom = \"plain-only\"\n[aggregation]\nprotocol = \"secagg\"";
        let err = plugins.check(&spec(&["a", "b", "c"], 3, 1, text)).unwrap_err();
        assert!(err.starts_with("strategy.custom:") && err.contains("reveals only their weighted sum"), "{err}");
        plugins.check(&spec(&["a", "b"], 2, 1, "[strategy]\nname = \"custom\"\ncustom = \"plain-only\"")).unwrap();
        let unknown = plugins.check(&spec(&["a", "b"], 2, 1, "").clone().with_kind("nope")).unwrap_err();
        assert!(unknown.starts_with("kind: no job kind named \"nope\""), "{unknown}");
    }

    trait WithKind {
        fn with_kind(self, kind: &str) -> Self;
    }
    impl WithKind for JobSpec {
        fn with_kind(mut self, kind: &str) -> Self {
            self.kind = confide_proto::jobspec::JobKind::parse(kind);
            self
        }
    }
}

/// A checkpoint's central adaptive clip is range-checked on resume, as the
/// distributed path's is: a clip outside 2^±20 of the spec's first clip, a
/// clip that is not a number, or a clip for a spec without adaptive
/// clipping (a corrupt or edited checkpoint) fails the resume, naming it;
/// a clip in range resumes.
#[test]
fn a_checkpoints_central_adaptive_clip_is_range_checked_on_resume() {
    let adaptive = "[dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 1.0\nadaptive_clip_quantile = 0.5\n";
    let resume = |dp: &str, clip: f64| {
        let text = format!(
            "name = \"t\"\nkind = \"train\"\nrounds = 4\n{dp}[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
             [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n"
        );
        let spec = JobSpec::parse(&text, "test", &Limits::default()).unwrap();
        let mut saved = State::new();
        match spec.dp.as_ref().unwrap().accountant(&spec.training, 2) {
            confide_proto::dpspec::Accountant::Rdp(acc) => {
                saved.insert("orders", acc.orders().to_vec());
                saved.insert("rdp", acc.rdp().to_vec());
            }
            confide_proto::dpspec::Accountant::Pld(_) => unreachable!("the RDP accountant is the default"),
        }
        saved.insert("clip", vec![clip]);
        let mut state = State::new();
        state.insert_section("privacy", saved);
        let start = Start::Resume { round: 2, model: Some(params(&[0.0])), state, parties: BTreeMap::new() };
        let plugins =
            Plugins::new().peer_verifier(|| Ok(Box::new(confide_crypto::secagg::testing::InsecureTagVerifier)));
        jobs::session("job-t", Arc::new(spec), start, &plugins, Limits::default(), 0).err()
    };
    assert_eq!(resume(adaptive, 0.7), None, "a clip in range resumes");
    for clip in [1e30, 1e-30, f64::NAN] {
        let e = resume(adaptive, clip).expect("refused");
        assert!(e.contains("adaptive clip") && e.contains("stays within"), "{clip}: {e}");
    }
    let fixed = adaptive.replace("adaptive_clip_quantile = 0.5\n", "");
    let e = resume(&fixed, 0.7).expect("refused");
    assert!(e.contains("no adaptive clipping"), "{e}");
}
