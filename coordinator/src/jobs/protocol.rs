//! The job's aggregation protocol as job machines use it: its server behind
//! the panic guard, its steps turned into tasks, its errors into job
//! failures naming the protocol. Training rounds, setup statistics and
//! evaluations all go through one [`ProtocolDriver`].

use confide_crypto::aggregation::sum::SumLayout;
use confide_crypto::aggregation::{
    Aggregate, AggregationServer, Envelope, Messages, Peer, Progress, Reveals, RoundInfo, SumRound,
};
use confide_proto::messages::{Stage, TaskBody};

use super::Setup;
use super::guard::guarded;
use crate::session::{Closed, Context};

/// The coordinator's side of the job's aggregation protocol.
pub(crate) struct ProtocolDriver {
    server: Box<dyn AggregationServer>,
    name: String,
    reveals: Reveals,
}

impl ProtocolDriver {
    /// The server of `setup`'s job's protocol.
    pub(crate) fn new(setup: &Setup<'_>) -> Result<Self, String> {
        let spec = setup.spec;
        let name = &spec.aggregation.protocol;
        let protocol = setup
            .plugins
            .protocols()
            .get(name)
            .ok_or_else(|| format!("aggregation.protocol: no protocol named {name:?} in this coordinator"))?;
        let facts = spec.facts(setup.job_id, setup.limits);
        let peers = setup.plugins.new_peer_verifier()?;
        let who = format!("protocol {name}");
        let server = guarded(&who, "server", || protocol.server(&spec.aggregation.settings, &facts, peers))?
            .map_err(|e| format!("aggregation.{name}: {e}"))?;
        let reveals = guarded(&who, "reveals", || protocol.reveals())?;
        Ok(ProtocolDriver { server, name: name.clone(), reveals })
    }

    /// What the protocol's server carries between rounds (checkpointed).
    pub(crate) fn state(&self) -> Result<confide_algorithms::State, String> {
        guarded(&self.who(), "state", || self.server.state())
    }

    /// Restores [`ProtocolDriver::state`] from a checkpoint.
    pub(crate) fn restore(&mut self, state: &confide_algorithms::State) -> Result<(), String> {
        let who = self.who();
        guarded(&who, "restore", || self.server.restore(state))?
            .map_err(|e| format!("aggregation.{}: restoring from the checkpoint: {e}", self.name))
    }

    /// The protocol's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether the protocol hides individual values: then statistics and
    /// evaluations are summed through it too, never asked for in the clear.
    pub(crate) fn hides_values(&self) -> bool {
        self.reveals != Reveals::Updates
    }

    fn who(&self) -> String {
        format!("protocol {}", self.name)
    }

    /// Starts a training round; the message the fit tasks carry.
    pub(crate) fn begin_round(&mut self, info: &RoundInfo<'_>) -> Result<Vec<u8>, String> {
        let who = self.who();
        match guarded(&who, "begin_round", || self.server.begin_round(info))? {
            Ok(m) => Ok(m),
            Err(e) => Err(format!("round {} aggregation ({}): {e}", info.round, self.name)),
        }
    }

    /// Starts a secure sum of `layout` over `parties`; the message its tasks carry.
    pub(crate) fn begin_sum(&mut self, round: u32, parties: &[String], layout: &SumLayout) -> Result<Vec<u8>, String> {
        let who = self.who();
        let info = SumRound { round, parties, layout };
        match guarded(&who, "begin_sum", || self.server.begin_sum(&info))? {
            Ok(m) => Ok(m),
            Err(e) => Err(format!("round {round} {} sum ({}): {e}", layout.purpose, self.name)),
        }
    }

    /// A party's contribution or step answer.
    pub(crate) fn on_message(&mut self, cx: &mut Context<'_>, party: &str, msg: Envelope) -> Result<(), String> {
        let certificate = cx.certificate(party).to_vec();
        let relay = cx.relay(party).map(str::to_owned);
        let peer = Peer { name: party, certificate: &certificate, relay: relay.as_deref() };
        match guarded(&self.who(), "on_message", || self.server.on_message(peer, msg))? {
            Ok(()) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The stage `closed` closed: sends the protocol's next step and returns
    /// `None`, or returns the round's result.
    pub(crate) fn advance(&mut self, cx: &mut Context<'_>, closed: &Closed) -> Result<Option<Aggregate>, String> {
        let round = closed.round;
        let progress = match guarded(&self.who(), "close_stage", || self.server.close_stage())? {
            Ok(p) => p,
            Err(e) => return Err(format!("round {round} aggregation ({}, {}): {e}", self.name, closed.stage)),
        };
        match progress {
            Progress::Step { stage, messages, quorum } => {
                let task = |message| TaskBody::Aggregation { stage: stage.as_str().to_owned(), message };
                let tasks = match messages {
                    Messages::Same { to, message } => vec![(to, task(message))],
                    Messages::PerParty(v) => v.into_iter().map(|(p, m)| (vec![p], task(m))).collect(),
                };
                cx.collect(Stage::Aggregation(stage), round, tasks, quorum);
                Ok(None)
            }
            Progress::Done(aggregate) => {
                let roles = guarded(&self.who(), "round_roles", || self.server.round_roles())?;
                if let Some(rec) = cx.record() {
                    rec.roles.extend(roles);
                }
                Ok(Some(aggregate))
            }
        }
    }
}

/// The result of a secure sum: its values, after excluding the parties
/// caught misbehaving while it was rebuilt.
pub(crate) fn sum_of(
    cx: &mut Context<'_>,
    round: u32,
    protocol: &str,
    aggregate: Aggregate,
) -> Result<(Vec<f64>, Vec<String>), String> {
    let Aggregate::Sum { sums, misbehaved, contributors } = aggregate else {
        return Err(format!("round {round}: protocol {protocol} answered a secure sum with another result"));
    };
    for (party, why) in misbehaved {
        cx.exclude(&party, &format!("round {round} {protocol}: {why}"));
    }
    Ok((sums, contributors))
}
