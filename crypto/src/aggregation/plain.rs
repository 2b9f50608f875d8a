//! `none`: each party sends its trained model in the clear over mutual TLS.
//! The coordinator sees every update, so any strategy (including the robust
//! rules, which need individual updates) can run. One stage: fit.

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::strategy::check_update;
use confide_algorithms::{FitResult, Metrics, TensorSpec};

use super::{
    Aggregate, AggregationClient, AggregationProtocol, AggregationServer, Bulk, Envelope, JobFacts, LocalUpdate,
    PartyIdentity, PartyUpdate, Peer, Problem, Progress, Reveals, RoundInfo, StageName,
};
use crate::Error;

/// The plaintext protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

/// The default cap on the examples one update may claim: secure
/// aggregation's default. The coordinator weighs an update by the count its
/// party claims and cannot check it, so without a cap one party claiming
/// 10^18 examples would make the global model its own (found by review).
pub const DEFAULT_MAX_EXAMPLES: u64 = 100_000;

/// The largest cap a job may set: sums of it over any party count stay far
/// inside u64 and exact in f64.
pub const MAX_MAX_EXAMPLES: u64 = 1 << 40;

/// The cap on claimed examples that settings of protocol `none` set (the
/// default where they do not, or do not parse: they are validated when the
/// job is submitted). Plaintext evaluations are held to it too.
pub fn max_examples(settings: &toml::Table) -> u64 {
    PlainSettings::from_table(settings).map_or(DEFAULT_MAX_EXAMPLES, |s| s.max_examples)
}

/// `[aggregation]` settings of protocol `none`.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainSettings {
    /// The most examples an update weighs: an honest party with more
    /// weighs this much (as under `secagg`), and an update claiming more
    /// is refused naming its party.
    #[serde(default = "default_max_examples")]
    max_examples: u64,
}

fn default_max_examples() -> u64 {
    DEFAULT_MAX_EXAMPLES
}

impl PlainSettings {
    fn from_table(table: &toml::Table) -> Result<Self, Vec<Problem>> {
        let s: PlainSettings = super::parse_settings(table)?;
        if !(1..=MAX_MAX_EXAMPLES).contains(&s.max_examples) {
            return Err(vec![Problem::setting(
                "max_examples",
                format!("must be 1..={MAX_MAX_EXAMPLES} (got {})", s.max_examples),
            )]);
        }
        Ok(s)
    }

    fn load(table: &toml::Table) -> Result<Self, Error> {
        Self::from_table(table).map_err(|p| {
            let text: Vec<String> = p.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
            Error::InvalidInput(format!("aggregation settings: {}", text.join("; ")))
        })
    }
}

/// The fit contribution's body: the weight; the model follows as the bulk vector.
#[derive(Clone, PartialEq, prost::Message)]
struct Contribution {
    #[prost(uint64, tag = "1")]
    num_examples: u64,
}

impl AggregationProtocol for Plain {
    fn name(&self) -> &'static str {
        "none"
    }

    fn describe(&self) -> &'static str {
        "plaintext updates over mutual TLS; the coordinator sees each party's update"
    }

    fn stages(&self) -> &'static [StageName] {
        &[]
    }

    fn reveals(&self) -> Reveals {
        Reveals::Updates
    }

    fn validate(&self, settings: &toml::Table, _: &JobFacts) -> Vec<Problem> {
        PlainSettings::from_table(settings).err().unwrap_or_default()
    }

    fn server(
        &self,
        settings: &toml::Table,
        _: &JobFacts,
        _: Box<dyn super::PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, Error> {
        let max_examples = PlainSettings::load(settings)?.max_examples;
        Ok(Box::new(PlainServer { expected: Vec::new(), updates: BTreeMap::new(), max_examples }))
    }

    fn client(
        &self,
        settings: &toml::Table,
        _: &JobFacts,
        _: PartyIdentity,
    ) -> Result<Box<dyn AggregationClient>, Error> {
        Ok(Box::new(PlainClient { max_examples: PlainSettings::load(settings)?.max_examples }))
    }
}

struct PlainServer {
    expected: Vec<TensorSpec>,
    updates: BTreeMap<String, PartyUpdate>,
    max_examples: u64,
}

impl AggregationServer for PlainServer {
    fn begin_round(&mut self, round: &RoundInfo<'_>) -> Result<Vec<u8>, Error> {
        self.expected = round.global.spec();
        self.updates.clear();
        Ok(Vec::new())
    }

    fn on_message(&mut self, from: Peer<'_>, message: Envelope) -> Result<(), Error> {
        let party = from.name;
        let num_examples = message.decode::<Contribution>(party, "update")?.num_examples;
        let params = match message.bulk {
            Some(Bulk::Params(p)) => Arc::try_unwrap(p).unwrap_or_else(|shared| (*shared).clone()),
            _ => return Err(Error::BadUpdate { party: party.to_owned(), reason: "no model parameters".into() }),
        };
        if self.updates.contains_key(party) {
            return Err(Error::PeerMisbehaved { party: party.to_owned(), reason: "sent its update twice".into() });
        }
        if num_examples > self.max_examples {
            return Err(Error::BadUpdate {
                party: party.to_owned(),
                reason: format!(
                    "claims {num_examples} examples; an update weighs at most {} (aggregation.none.max_examples)",
                    self.max_examples
                ),
            });
        }
        // Checked as it arrives, so a bad party is dropped by name instead of
        // poisoning the aggregate.
        let result = FitResult { party: party.to_owned(), num_examples, params, metrics: Metrics::new() };
        check_update(&self.expected, &result).map_err(|e| match e {
            confide_algorithms::Error::PeerMisbehaved { party, reason } => Error::BadUpdate { party, reason },
            other => Error::BadUpdate { party: party.to_owned(), reason: other.to_string() },
        })?;
        self.updates
            .insert(party.to_owned(), PartyUpdate { party: party.to_owned(), num_examples, params: result.params });
        Ok(())
    }

    fn close_stage(&mut self) -> Result<Progress, Error> {
        // BTreeMap order: sums happen in party-name order, reproducibly.
        Ok(Progress::Done(Aggregate::Updates(std::mem::take(&mut self.updates).into_values().collect())))
    }
}

struct PlainClient {
    max_examples: u64,
}

impl AggregationClient for PlainClient {
    fn contribute(&mut self, _: u32, _: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, Error> {
        // A party with more examples than the cap weighs the cap.
        let num_examples = update.num_examples.min(self.max_examples);
        Ok(Envelope {
            body: prost::Message::encode_to_vec(&Contribution { num_examples }),
            bulk: Some(Bulk::Params(Arc::new(update.local))),
        })
    }

    fn on_step(&mut self, _: u32, stage: StageName, _: Envelope) -> Result<Envelope, Error> {
        Err(Error::PeerMisbehaved {
            party: "coordinator".into(),
            reason: format!("sent a {stage} step, which protocol \"none\" does not have"),
        })
    }

    fn abandon(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::{FitConfig, Parameters, Tensor, TrainConfig};

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    fn facts() -> JobFacts {
        JobFacts::new("j", vec!["a".into(), "b".into(), "c".into()], 100, 2, 1000)
    }

    fn contribution(n: u64, v: &[f32]) -> Envelope {
        let global = params(&[0.0; 2]);
        let identity = crate::secagg::testing::identity("x");
        let mut client = Plain.client(&toml::Table::new(), &facts(), identity).unwrap();
        let fit = FitConfig { round: 1, train: TrainConfig::default() };
        client
            .contribute(
                1,
                &[],
                LocalUpdate { global: &global, fit: &fit, local: params(v), num_examples: n, train_loss: None },
            )
            .unwrap()
    }

    #[test]
    fn collects_checked_updates_in_party_order() {
        let peers = Box::new(crate::secagg::testing::InsecureTagVerifier);
        let mut server = Plain.server(&toml::Table::new(), &facts(), peers).unwrap();
        let global = params(&[0.0, 0.0]);
        let parties = ["a".to_string(), "b".to_string(), "c".to_string()];
        let msg = server.begin_round(&RoundInfo { round: 1, parties: &parties, global: &global, fit: None }).unwrap();
        assert!(msg.is_empty());
        let peer = |name| Peer { name, certificate: &[], relay: None };
        server.on_message(peer("c"), contribution(3, &[1.0, 2.0])).unwrap();
        server.on_message(peer("a"), contribution(1, &[3.0, 4.0])).unwrap();
        let err = server.on_message(peer("b"), contribution(1, &[f32::NAN, 0.0])).unwrap_err().to_string();
        assert!(err.contains("party b sent a bad update") && err.contains("NaN"), "{err}");
        let err = server.on_message(peer("a"), contribution(1, &[3.0, 4.0])).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        assert!(server.on_message(peer("b"), Envelope::body(vec![0xff, 0xff])).is_err(), "malformed body");
        let Progress::Done(Aggregate::Updates(u)) = server.close_stage().unwrap() else { panic!() };
        assert_eq!(u.iter().map(|u| (u.party.as_str(), u.num_examples)).collect::<Vec<_>>(), [("a", 1), ("c", 3)]);
        let unknown = Plain.validate(&toml::toml! { bits = 3 }, &facts());
        assert!(unknown[0].message.contains("unknown field"), "{unknown:?}");
        for bad in [0i64, (MAX_MAX_EXAMPLES + 1) as i64] {
            let p = Plain.validate(&toml::toml! { max_examples = bad }, &facts());
            assert_eq!(p[0].field, "max_examples", "{bad}: {p:?}");
        }
        assert!(Plain.validate(&toml::toml! { max_examples = 1000 }, &facts()).is_empty());
    }

    /// The coordinator cannot check a claimed example count, so it caps
    /// it: an update claiming more than `max_examples` is refused naming
    /// its party (before, 10^18 examples made the global model that
    /// party's, and a sum near 2^64 wrapped), and an honest party with more
    /// rows than the cap weighs the cap.
    #[test]
    fn an_update_claiming_more_examples_than_the_cap_is_refused() {
        let peers = Box::new(crate::secagg::testing::InsecureTagVerifier);
        let mut server = Plain.server(&toml::Table::new(), &facts(), peers).unwrap();
        let global = params(&[0.0, 0.0]);
        let parties = ["a".to_string(), "b".to_string()];
        server.begin_round(&RoundInfo { round: 1, parties: &parties, global: &global, fit: None }).unwrap();
        let peer = |name| Peer { name, certificate: &[], relay: None };
        let forged = Envelope {
            body: prost::Message::encode_to_vec(&Contribution { num_examples: 1 << 60 }),
            bulk: Some(Bulk::Params(Arc::new(params(&[1e6, 1e6])))),
        };
        let err = server.on_message(peer("b"), forged).unwrap_err().to_string();
        assert!(err.contains("party b") && err.contains("aggregation.none.max_examples"), "{err}");
        // An honest party with a million rows: clamped by its own client.
        server.on_message(peer("a"), contribution(1_000_000, &[1.0, 1.0])).unwrap();
        let Progress::Done(Aggregate::Updates(u)) = server.close_stage().unwrap() else { panic!() };
        assert_eq!(
            u.iter().map(|u| (u.party.as_str(), u.num_examples)).collect::<Vec<_>>(),
            [("a", DEFAULT_MAX_EXAMPLES)]
        );
    }
}
