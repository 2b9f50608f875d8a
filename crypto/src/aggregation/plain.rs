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
        settings.keys().map(|k| Problem::setting(k, "protocol \"none\" takes no settings")).collect()
    }

    fn server(
        &self,
        _: &toml::Table,
        _: &JobFacts,
        _: Box<dyn super::PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, Error> {
        Ok(Box::new(PlainServer { expected: Vec::new(), updates: BTreeMap::new() }))
    }

    fn client(&self, _: &toml::Table, _: &JobFacts, _: PartyIdentity) -> Result<Box<dyn AggregationClient>, Error> {
        Ok(Box::new(PlainClient))
    }
}

struct PlainServer {
    expected: Vec<TensorSpec>,
    updates: BTreeMap<String, PartyUpdate>,
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

struct PlainClient;

impl AggregationClient for PlainClient {
    fn contribute(&mut self, _: u32, _: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, Error> {
        Ok(Envelope {
            body: prost::Message::encode_to_vec(&Contribution { num_examples: update.num_examples }),
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
        assert!(Plain.validate(&toml::toml! { bits = 3 }, &facts())[0].message.contains("no settings"));
    }
}
