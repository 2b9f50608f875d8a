//! The hospital's decision on a job offer: its [`Policy`] applied to the
//! spec, before anything is loaded or sent.

use std::collections::BTreeMap;

use confide_algorithms::data::DatasetSource;
use confide_proto::jobspec::JobSpec;

use crate::config::Policy;
use crate::plugins::PartyPlugins;

/// Accepts `spec` (and returns the data set it uses) or says why not; the
/// reason reaches the job's status.
pub fn consider<'a>(
    spec: &JobSpec,
    dataset: &str,
    policy: &Policy,
    plugins: &PartyPlugins,
    datasets: &'a BTreeMap<String, DatasetSource>,
) -> Result<&'a DatasetSource, String> {
    let kind = spec.kind.as_str();
    if !policy.job_kinds.iter().any(|k| k == kind) {
        return Err(format!("policy forbids job kind {kind:?} (accepted: {})", policy.job_kinds.join(", ")));
    }
    if plugins.kind(kind).is_none() {
        return Err(format!("this party cannot run job kind {kind:?} (known: {})", plugins.kind_names().join(", ")));
    }
    let protocol = spec.aggregation.protocol.as_str();
    if !policy.aggregation.iter().any(|m| m == protocol) {
        return Err(format!(
            "policy forbids aggregation protocol {protocol:?} (accepted: {})",
            policy.aggregation.join(", ")
        ));
    }
    let Some(aggregation) = plugins.protocols().get(protocol) else {
        return Err(format!("this party has no aggregation protocol {protocol:?}"));
    };
    if let Some(floor) = policy.min_corrupt_fraction
        && let Some(tolerated) = aggregation.tolerated_corrupt_fraction(&spec.aggregation.settings)
        && (tolerated.is_nan() || tolerated < floor)
    {
        return Err(format!(
            "policy requires tolerating at least {floor} of the parties corrupt; the job's {protocol} tolerates \
             {tolerated} (corrupt parties that collude with the coordinator and deviate from the protocol; its \
             masking and any distributed DP noise assume no more)"
        ));
    }
    // (Comparisons written to fail closed on a NaN fraction.)
    if let Some(floor) = policy.min_corrupt_fraction.filter(|f| *f > 0.0) {
        let names = spec.parties.names.len();
        match aggregation.tolerated_corrupt_fraction(&spec.aggregation.settings) {
            // A protocol that hides updates but states no tolerance: its
            // guarantee under collusion is unknown, so it fails closed (one
            // that reveals every update hides nothing to collude for).
            None if !matches!(aggregation.reveals(), confide_crypto::aggregation::Reveals::Updates) => {
                return Err(format!(
                    "policy requires tolerating at least {floor} of the parties corrupt; the job's {protocol} \
                     states no fraction of corrupt parties it tolerates"
                ));
            }
            // A floor above 0 asks for at least one colluder tolerated: a
            // fraction of a small federation can round down to none.
            Some(tolerated) if names > 0 && (tolerated.is_nan() || (tolerated * names as f64).floor() < 1.0) => {
                return Err(format!(
                    "policy requires tolerating at least {floor} of the parties corrupt; with the {names} parties \
                     the job names, its {protocol} corrupt_fraction {tolerated} tolerates no colluder"
                ));
            }
            _ => {}
        }
    }
    // Without named parties there is no federation to count colluders in:
    // secagg's rounds then count them within each round only.
    if policy.min_corrupt_fraction.is_some()
        && spec.parties.names.is_empty()
        && aggregation.tolerated_corrupt_fraction(&spec.aggregation.settings).is_some()
        && aggregation.counts_colluders_per_round_without_names()
    {
        return Err(format!(
            "policy requires tolerating a fraction of the parties corrupt; the job names no parties, so its \
             {protocol} rounds count colluders only within each round (a spec that names its parties is \
             accepted)"
        ));
    }
    // A job without differential privacy costs its data set ε = ∞. The
    // cost of one with it is checked against the data set's spending by the
    // ledger, which reserves it (crate::ledger).
    if spec.dp.is_none() && !outside_budget(spec, policy) {
        if policy.require_dp {
            return Err("policy requires differential privacy; this job has none".into());
        }
        if let Some(max) = policy.max_epsilon {
            return Err(format!(
                "policy limits each data set to ε = {max}; this job has no differential privacy, so it would cost ε = ∞"
            ));
        }
    }
    if spec.dp.as_ref().is_some_and(|d| d.level == confide_proto::dpspec::DpLevel::Party && d.distributed.is_none())
        && !policy.accept_central_dp
    {
        return Err("the job's party-level DP noise is added by the coordinator, which sees every update first \
                    (central DP); policy.accept_central_dp is not set"
            .into());
    }
    if let Some((stage, floor)) = answer_floor(spec, policy)
        && !confide_proto::dpspec::answer_floor_fits(floor, spec.timeouts.round_secs)
    {
        return Err(format!(
            "policy.min_answer_after_secs holds each {stage} answer {floor} s; the job's timeouts.round_secs = {} \
             leaves less than {} s for it to arrive",
            spec.timeouts.round_secs,
            confide_proto::dpspec::FIT_ANSWER_MARGIN_SECS
        ));
    }
    // Once the others answered (at the spec's own floor, the same for
    // all), a straggler cut gives this party `straggler_secs` more: a
    // longer floor of its own would have it dropped every round.
    if let (Some((stage, floor)), Some(straggler)) = (answer_floor(spec, policy), spec.timeouts.straggler_secs) {
        let shared = spec.dp.as_ref().and_then(|d| d.answer_fit_after_secs).filter(|_| stage == "fit").unwrap_or(0.0);
        if !confide_proto::dpspec::answer_floor_fits(floor - shared, straggler) {
            let theirs = if shared > 0.0 { format!(" (the spec holds theirs {shared} s)") } else { String::new() };
            return Err(format!(
                "policy.min_answer_after_secs holds each {stage} answer {floor} s; the job's \
                 timeouts.straggler_secs = {straggler} would drop it every round once the others answered{theirs}"
            ));
        }
    }
    // The offer's answer is held to the policy's floor too (`node`): the
    // coordinator must still be recruiting when it comes.
    if let Some(floor) = policy.min_answer_after_secs
        && !confide_proto::dpspec::answer_floor_fits(floor, spec.timeouts.recruit_secs)
    {
        return Err(format!(
            "policy.min_answer_after_secs holds the answer to this offer {floor} s; the job's \
             timeouts.recruit_secs = {} leaves less than {} s for it to arrive",
            spec.timeouts.recruit_secs,
            confide_proto::dpspec::FIT_ANSWER_MARGIN_SECS
        ));
    }
    if spec.min_parties() < policy.min_parties {
        return Err(format!(
            "policy requires jobs with at least {} parties; this one needs only {}",
            policy.min_parties,
            spec.min_parties()
        ));
    }
    if let Some(dp) = &spec.dp {
        let steps = dp.steps_per_round(&spec.training);
        if steps > policy.max_dp_steps_per_round {
            return Err(format!(
                "training.local_epochs / dp.sampling_rate ask {steps} DP-SGD steps a round; policy allows at most {} \
                 (policy.max_dp_steps_per_round)",
                policy.max_dp_steps_per_round
            ));
        }
    }
    let source = datasets.get(dataset).ok_or_else(|| format!("no data set named {dataset:?} at this party"))?;
    // A spec whose ranges disagree with the data set's declared width, or
    // a DP job on a data set whose width nothing declares, is refused
    // here, with the reason and before anything is reserved: it is about
    // the spec and the configuration, not the rows.
    let width = crate::trainers::dp_width(spec, source).map_err(|e| format!("data set {dataset:?}: {e}"))?;
    if spec.dp.is_some() && width.is_none() {
        return Err(format!("data set {dataset:?}: {}", crate::trainers::width_undeclared(spec)));
    }
    Ok(source)
}

/// Which answers of `spec`'s job this party holds, and how long, in
/// seconds: a DP training job's fit answers, for the longer of the spec's
/// `dp.answer_fit_after_secs` and the policy's `min_answer_after_secs`; a
/// DP evaluation's answers, for the policy's. None for a job without `[dp]`.
pub fn answer_floor(spec: &JobSpec, policy: &Policy) -> Option<(&'static str, f64)> {
    let dp = spec.dp.as_ref()?;
    match dp.release {
        confide_proto::dpspec::DpRelease::Training => {
            let longer = match (dp.answer_fit_after_secs, policy.min_answer_after_secs) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            longer.map(|t| ("fit", t))
        }
        confide_proto::dpspec::DpRelease::Evaluation => policy.min_answer_after_secs.map(|t| ("evaluate", t)),
    }
}

/// Whether `spec` is an evaluation `policy.evaluations_outside_budget`
/// lets run without `[dp]` and without a reservation: a pipeline's count
/// or gate (`spec.pipeline`), which evaluates the watched directory's
/// batches only. An evaluate job on a data set file is not one, whatever
/// the setting: a coordinator could otherwise query any data set's rows,
/// exactly, with models of its choice, outside every budget.
pub fn outside_budget(spec: &JobSpec, policy: &Policy) -> bool {
    policy.evaluations_outside_budget
        && spec.dp.is_none()
        && spec.kind == confide_proto::jobspec::JobKind::Evaluate
        && spec.pipeline.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_proto::Limits;

    fn spec(protocol: &str, min: usize) -> JobSpec {
        spec_of(protocol, min, 3)
    }

    /// A spec naming `named` parties.
    fn spec_of(protocol: &str, min: usize, named: usize) -> JobSpec {
        let names: Vec<String> = (0..named).map(|i| format!("\"p{i}\"")).collect();
        let text = format!(
            "name = \"p\"\nkind = \"train\"\n[parties]\nnames = [{}]\nmin = {min}\ndataset = \"d\"\n\
             [model]\nkind = \"logistic_regression\"\nclasses = 2\n[aggregation]\nprotocol = \"{protocol}\"\n",
            names.join(", ")
        );
        JobSpec::parse(&text, "t", &Limits::default()).unwrap()
    }

    /// `policy.evaluations_outside_budget` exempts a pipeline's counts and
    /// gates only: an evaluate job without `[dp]` on a data set file is
    /// still refused under `max_epsilon` (a coordinator would otherwise
    /// query those rows, exactly, as often as it liked), and a pipeline's
    /// is accepted without a reservation.
    #[test]
    fn only_a_pipelines_evaluations_run_outside_the_budget() {
        let plugins = PartyPlugins::default();
        let data = BTreeMap::from([("d".to_string(), DatasetSource::csv("d.csv".into()))]);
        let evaluate = |pipeline: &str| {
            let text = format!(
                "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"a\"]\nmin = 1\n\
                 dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n{pipeline}"
            );
            JobSpec::parse(&text, "t", &Limits::default()).unwrap()
        };
        let policy = Policy {
            aggregation: vec!["none".into()],
            min_parties: 1,
            max_epsilon: Some(4.0),
            evaluations_outside_budget: true,
            ..Policy::default()
        };
        let direct = evaluate("");
        assert!(!outside_budget(&direct, &policy));
        let e = consider(&direct, "d", &policy, &plugins, &data).unwrap_err();
        assert!(e.contains("ε = ∞"), "{e}");
        let gate = evaluate("[pipeline]\njob = \"p1\"\niteration = 1\nservice = \"triage\"\nrows = \"new\"\n");
        assert!(outside_budget(&gate, &policy));
        assert!(consider(&gate, "d", &policy, &plugins, &data).is_ok());
        let off = Policy { evaluations_outside_budget: false, ..policy };
        assert!(!outside_budget(&gate, &off));
        assert!(consider(&gate, "d", &off, &plugins, &data).is_err());
    }

    /// The policy's floor holds a DP training job's fit answers and a DP
    /// evaluation's answers, and must leave a second before the round's
    /// deadline.
    #[test]
    fn the_policys_answer_floor_holds_dp_answers_and_leaves_time_to_answer() {
        let job = |kind: &str, round_secs: u64| {
            let (from, sampled) =
                if kind == "evaluate" { ("from_job = \"j0\"\n", "") } else { ("", "sampling_rate = 0.1\n") };
            let text = format!(
                "name = \"e\"\nkind = \"{kind}\"\n{from}[parties]\nnames = [\"a\"]\nmin = 1\ndataset = \"d\"\n\
                 [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[dp]\n\
                 noise_multiplier = 2.0\n{sampled}[timeouts]\nround_secs = {round_secs}\n"
            );
            JobSpec::parse(&text, "t", &Limits::default()).unwrap()
        };
        let policy = |t: f64| Policy { min_answer_after_secs: Some(t), ..Policy::default() };
        let declared = DatasetSource { features: Some(1), ..DatasetSource::csv("d.csv".into()) };
        let (plugins, data) = (PartyPlugins::default(), BTreeMap::from([("d".into(), declared)]));
        assert_eq!(answer_floor(&job("train", 600), &policy(2.0)), Some(("fit", 2.0)));
        assert_eq!(answer_floor(&job("evaluate", 600), &policy(2.0)), Some(("evaluate", 2.0)));
        assert_eq!(answer_floor(&job("evaluate", 600), &Policy::default()), None);
        for kind in ["train", "evaluate"] {
            assert!(consider(&job(kind, 3), "d", &policy(2.0), &plugins, &data).is_ok());
            let e = consider(&job(kind, 3), "d", &policy(2.001), &plugins, &data).unwrap_err();
            assert!(e.contains("policy.min_answer_after_secs") && e.contains("round_secs = 3"), "{e}");
            assert!(e.contains(&format!("each {}", if kind == "train" { "fit" } else { "evaluate" })), "{e}");
        }
        // A straggler cut: the party's floor must fit in it past the
        // spec's own floor, which every party holds to.
        let cut = |kind: &str, spec_floor: Option<f64>, straggler: u64| {
            let mut j = job(kind, 600);
            j.timeouts.straggler_secs = Some(straggler);
            if let Some(d) = j.dp.as_mut() {
                d.answer_fit_after_secs = spec_floor;
            }
            j
        };
        for kind in ["train", "evaluate"] {
            assert!(consider(&cut(kind, None, 3), "d", &policy(2.0), &plugins, &data).is_ok());
            let e = consider(&cut(kind, None, 3), "d", &policy(2.5), &plugins, &data).unwrap_err();
            assert!(e.contains("timeouts.straggler_secs = 3") && e.contains("min_answer_after_secs"), "{e}");
        }
        assert!(consider(&cut("train", Some(5.0), 3), "d", &policy(7.0), &plugins, &data).is_ok());
        assert!(consider(&cut("train", Some(5.0), 3), "d", &policy(7.5), &plugins, &data).is_err());
    }

    fn cautious_floor() -> Policy {
        Policy { min_corrupt_fraction: Some(0.1), ..Policy::default() }
    }

    fn central_dp() -> JobSpec {
        let text = "name = \"p\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\nmin = 3\ndataset = \"d\"\n\
                    [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
                    [dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\n";
        JobSpec::parse(text, "t", &Limits::default()).unwrap()
    }

    /// A DP job whose one round asks more DP-SGD steps than the policy
    /// allows is refused naming the settings, however small its ε.
    #[test]
    fn a_round_of_more_dp_steps_than_the_policy_allows_is_refused() {
        let plugins = PartyPlugins::default();
        let mut d = DatasetSource::csv("d.csv".into());
        d.features = Some(1);
        let data = BTreeMap::from([("d".to_string(), d)]);
        let text = |q: f64| {
            format!(
                "name = \"p\"\nkind = \"train\"\n[parties]\nnames = [\"p0\", \"p1\", \"p2\"]\nmin = 3\n\
                 dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
                 [training]\nlocal_epochs = 1000\n[dp]\nnoise_multiplier = 1024.0\nsampling_rate = {q}\n"
            )
        };
        let policy = Policy { aggregation: vec!["none".into()], ..Policy::default() };
        let heavy = JobSpec::parse(&text(1e-4), "t", &Limits::default()).unwrap();
        let e = consider(&heavy, "d", &policy, &plugins, &data).err().unwrap();
        assert!(e.contains("10000000 DP-SGD steps") && e.contains("policy.max_dp_steps_per_round"), "{e}");
        let light = JobSpec::parse(&text(0.05), "t", &Limits::default()).unwrap();
        assert!(consider(&light, "d", &policy, &plugins, &data).is_ok());
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let plugins = PartyPlugins::default();
        let data = BTreeMap::from([("d".to_string(), DatasetSource::csv("d.csv".into()))]);
        let secagg_only = Policy { aggregation: vec!["secagg".into()], min_parties: 3, ..Policy::default() };
        assert!(consider(&spec("secagg", 3), "d", &secagg_only, &plugins, &data).is_ok());
        let cases = [
            (spec("none", 3), "d", secagg_only.clone(), "policy forbids aggregation protocol \"none\""),
            (
                spec("none", 2),
                "d",
                Policy { aggregation: vec!["none".into(), "secagg".into()], ..secagg_only.clone() },
                "at least 3 parties",
            ),
            (spec("secagg", 3), "x", secagg_only.clone(), "no data set named \"x\""),
            (
                spec("secagg", 3),
                "d",
                Policy { job_kinds: vec!["evaluate".into()], ..secagg_only.clone() },
                "policy forbids job kind \"train\"",
            ),
            (
                spec("secagg", 3),
                "d",
                Policy { require_dp: true, ..secagg_only.clone() },
                "requires differential privacy",
            ),
            (spec("secagg", 3), "d", Policy { max_epsilon: Some(4.0), ..secagg_only.clone() }, "ε = ∞"),
            (
                spec("secagg", 3),
                "d",
                Policy { min_corrupt_fraction: Some(0.1), ..secagg_only.clone() },
                "secagg tolerates 0.05",
            ),
            (
                central_dp(),
                "d",
                Policy { aggregation: vec!["none".into()], ..secagg_only.clone() },
                "policy.accept_central_dp",
            ),
        ];
        let trusting = Policy { aggregation: vec!["none".into()], accept_central_dp: true, ..secagg_only.clone() };
        // A DP job needs the data set's width declared (or the spec's ranges).
        let e = consider(&central_dp(), "d", &trusting, &plugins, &data).unwrap_err();
        assert!(e.contains("data set \"d\"") && e.contains("features = N"), "{e}");
        let mut declared = DatasetSource::csv("d.csv".into());
        declared.features = Some(4);
        let data = BTreeMap::from([("d".to_string(), declared)]);
        assert!(consider(&central_dp(), "d", &trusting, &plugins, &data).is_ok());
        // `he` tolerates no colluder that deviates (one can read the joint
        // key with the coordinator), whatever its corrupt_fraction says.
        let he_too = Policy { aggregation: vec!["he".into()], ..cautious_floor() };
        let mut he = spec_of("he", 3, 10);
        he.aggregation.settings.insert("corrupt_fraction".into(), toml::Value::Float(0.2));
        let e = consider(&he, "d", &he_too, &plugins, &data).unwrap_err();
        assert!(e.contains("he tolerates 0 ") && e.contains("deviate"), "{e}");
        // A spec that assumes at least the hospital's floor is accepted.
        let cautious = Policy { min_corrupt_fraction: Some(0.1), ..secagg_only.clone() };
        let mut wary = spec_of("secagg", 3, 10);
        wary.aggregation.settings.insert("corrupt_fraction".into(), toml::Value::Float(0.1));
        assert!(consider(&wary, "d", &cautious, &plugins, &data).is_ok());
        // Of three named parties, a tenth is none: refused.
        let mut few = spec("secagg", 3);
        few.aggregation.settings.insert("corrupt_fraction".into(), toml::Value::Float(0.1));
        let e = consider(&few, "d", &cautious, &plugins, &data).unwrap_err();
        assert!(e.contains("3 parties") && e.contains("tolerates no colluder"), "{e}");
        // The same without named parties: no federation to count colluders
        // in, so a hospital with a floor refuses it.
        wary.parties.names.clear();
        let e = consider(&wary, "d", &cautious, &plugins, &data).unwrap_err();
        assert!(e.contains("names no parties"), "{e}");
        // `he` counts colluders from the federation's limit even then (under
        // a floor of 0: above it, `he` is refused, below).
        let he_policy = Policy { aggregation: vec!["he".into()], min_corrupt_fraction: Some(0.0), ..cautious.clone() };
        let mut unnamed_he = spec("he", 3);
        unnamed_he.parties.names.clear();
        assert!(consider(&unnamed_he, "d", &he_policy, &plugins, &data).is_ok());
        for (spec, ds, policy, why) in cases {
            let e = consider(&spec, ds, &policy, &plugins, &data).unwrap_err();
            assert!(e.contains(why), "{e} (wanted {why})");
        }
        // A DP spec whose ranges disagree with the data set's declared
        // width is refused with the reason, before anything is reserved.
        let mut ranged = central_dp();
        ranged.dp.as_mut().expect("dp").feature_ranges = Some(vec![[0.0, 1.0]; 3]);
        let mut declared = DatasetSource::csv("d.csv".into());
        declared.features = Some(30);
        let data = BTreeMap::from([("d".to_string(), declared)]);
        let e = consider(&ranged, "d", &trusting, &plugins, &data).unwrap_err();
        assert!(e.contains("has 3 ranges") && e.contains("declares 30 features"), "{e}");
        ranged.dp.as_mut().expect("dp").feature_ranges = Some(vec![[0.0, 1.0]; 30]);
        assert!(consider(&ranged, "d", &trusting, &plugins, &data).is_ok());
    }
}
