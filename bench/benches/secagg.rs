//! Criterion benches of SecAgg+ stages at 10 parties × 1,000,000 values:
//! client masking (9 neighbours) and server unmasking with 0 and 2 dropouts.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use confide_crypto::secagg::protocol::{Client, Config, EncryptedShare, MaskedInput, Server};
use confide_crypto::secagg::testing::{InsecureTagSigner as Tag, InsecureTagVerifier as TagCheck};
use criterion::{Criterion, criterion_group, criterion_main};
use rand_core::OsRng;

const N: usize = 10;
const DIM: usize = 1_000_000;

fn config() -> Config {
    Config {
        job: "bench".into(),
        round: 1,
        parties: (0..N).map(|i| format!("p{i:02}")).collect(),
        threshold: 6,
        degree: N - 1,
        graph_seed: [1; 32],
        bits: 32,
        dim: DIM,
        binding: [0; 32],
        min_survivors: 3,
    }
}

/// Runs stages 0–1 and returns clients ready to mask, with the server and
/// the shares each client receives.
fn prepared() -> (Server, Vec<Client>, Vec<Vec<EncryptedShare>>) {
    let cfg = config();
    let mut server = Server::new(cfg.clone()).expect("server");
    let mut clients = Vec::new();
    for p in &cfg.parties {
        let (c, m) = Client::new(cfg.clone(), p, &Tag(p.clone()), &mut OsRng).expect("client");
        server.on_keys(m, &TagCheck).expect("keys");
        clients.push(c);
    }
    server.close_keys().expect("close");
    for (c, p) in clients.iter_mut().zip(&cfg.parties) {
        let s = c.on_keys(&server.keys_for(p).expect("k"), &TagCheck, &mut OsRng).expect("on_keys");
        server.on_shares(p, s).expect("shares");
    }
    server.close_shares().expect("close");
    let shares = cfg.parties.iter().map(|p| server.shares_for(p)).collect();
    (server, clients, shares)
}

fn client_masking(c: &mut Criterion) {
    let input = vec![7u32; DIM];
    let mut g = c.benchmark_group("secagg_client");
    g.sample_size(10);
    g.bench_function("mask_1M_9_neighbours", |b| {
        b.iter_batched(
            || (prepared(), input.clone()),
            |((_, mut clients, shares), input)| clients[0].on_shares(&shares[0], input).expect("mask"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn server_unmasking(c: &mut Criterion) {
    let input = vec![7u32; DIM];
    let mut g = c.benchmark_group("secagg_server");
    g.sample_size(10);
    for dropped in [0usize, 2] {
        let setup = || {
            let (mut server, mut clients, shares) = prepared();
            let masked: Vec<MaskedInput> =
                clients.iter_mut().zip(&shares).map(|(c, s)| c.on_shares(s, input.clone()).expect("mask")).collect();
            for m in masked.into_iter().skip(dropped) {
                server.on_masked(m).expect("masked");
            }
            confide_crypto::secagg::testing::consistency_and_unmask(&mut server, clients.iter_mut().skip(dropped))
                .expect("consistency and unmask");
            server
        };
        g.bench_function(format!("unmask_1M_{dropped}_dropped"), |b| {
            b.iter_batched(setup, |mut s| s.finish().expect("finish"), criterion::BatchSize::LargeInput)
        });
    }
    g.finish();
}

/// What binds a round to its model and configuration: hashed by every party
/// and the coordinator once per round.
fn training_digest(c: &mut Criterion) {
    use confide_algorithms::{FitConfig, Parameters, Tensor, TrainConfig};
    let data: Vec<f32> = (0..DIM).map(|i| i as f32 * 1e-6).collect();
    let global = Parameters::new(vec![Tensor { name: "w".into(), shape: vec![DIM], data }]).expect("params");
    let fit = FitConfig { round: 1, train: TrainConfig::default() };
    let mut g = c.benchmark_group("secagg_binding");
    g.sample_size(20);
    g.bench_function("training_digest_1M", |b| b.iter(|| confide_crypto::aggregation::training_digest(&global, &fit)));
    g.finish();
}

criterion_group!(benches, client_masking, server_unmasking, training_digest);
criterion_main!(benches);
