//! Criterion benches of the coordinator's hot paths: aggregation of party
//! updates and the chunked tensor transfer.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use confide_algorithms::{FedAvg, FitResult, Metrics, Parameters, Strategy, Tensor};
use confide_proto::Limits;
use confide_proto::transfer::{self, Incoming};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn params(n: usize, seed: f32) -> Parameters {
    let data = (0..n).map(|i| seed + (i % 97) as f32 * 1e-3).collect();
    Parameters::new(vec![Tensor { name: "w".into(), shape: vec![n], data }]).expect("params")
}

fn fedavg(c: &mut Criterion) {
    let n = 1_000_000;
    let global = params(n, 0.0);
    let results: Vec<FitResult> = (0..10)
        .map(|i| FitResult {
            party: format!("p{i}"),
            num_examples: 100 + i,
            params: params(n, i as f32),
            metrics: Metrics::new(),
        })
        .collect();
    let mut g = c.benchmark_group("fedavg");
    g.throughput(Throughput::Elements((n * results.len()) as u64));
    g.sample_size(10);
    g.bench_function("10_parties_x_1M", |b| b.iter(|| FedAvg.aggregate_fit(1, &global, &results).expect("agg")));
    g.finish();
}

fn transfer_round_trip(c: &mut Criterion) {
    let p = transfer::Bulk::Params(std::sync::Arc::new(params(1_000_000, 1.0)));
    let limits = Limits::default();
    let mut g = c.benchmark_group("transfer");
    g.throughput(Throughput::Bytes(4_000_000));
    g.sample_size(20);
    g.bench_function("encode_chunk_reassemble_1M", |b| {
        b.iter(|| {
            let e = transfer::encode(1, &p);
            let mut inc = Incoming::start(&e.header, &limits).expect("start");
            for chunk in transfer::chunks(1, &e.bytes, limits.chunk_bytes) {
                inc.push(&chunk).expect("push");
            }
            inc.finish().expect("finish")
        })
    });
    g.finish();
}

criterion_group!(benches, fedavg, transfer_round_trip);
criterion_main!(benches);
