//! Criterion benches of the threshold-HE layer per block of N = 4096 values
//! (`confide-bench he` times whole 10^6-value updates and prints JSON).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use confide_crypto::he::{
    self, Aggregate, CommonPoly, Csprng, FloodingNoise, HeParams, KeyShare, LinearHash, PublicKey, SecretShare,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn he_block(c: &mut Criterion) {
    let n = 10;
    let params = HeParams::new(n, 6, 16, 26, 2).expect("params");
    let crp = CommonPoly::derive(b"criterion");
    let mut rng = Csprng::from_os();
    let dealings: Vec<_> = (0..n).map(|i| he::deal(&params, &crp, i, &mut rng).expect("deal")).collect();
    let pk =
        PublicKey::assemble(&crp, &dealings.iter().map(|d| d.public_share.clone()).collect::<Vec<_>>()).expect("pk");
    let mut keys: Vec<KeyShare> = (0..n)
        .map(|j| {
            let mine: Vec<SecretShare> = dealings.iter().map(|d| d.shares[j].clone()).collect();
            KeyShare::assemble(&params, j, &mine, 0).expect("key")
        })
        .collect();
    let values = vec![7u32; he::ring::N];
    let mut g = c.benchmark_group("he_block_4096");
    g.throughput(Throughput::Elements(he::ring::N as u64));
    g.bench_function("keygen_deal_10_parties", |b| b.iter(|| he::deal(&params, &crp, 0, &mut rng).expect("deal")));
    g.bench_function("precompute", |b| b.iter(|| pk.precompute(values.len(), &mut rng)));
    g.bench_function("encrypt_online", |b| {
        b.iter_batched(
            || pk.precompute(values.len(), &mut Csprng::from_os()),
            |m| m.encrypt(&params, &values),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut agg = Aggregate::new(he::ring::N);
    for _ in 0..n {
        let ct = pk.precompute(values.len(), &mut rng).encrypt(&params, &values).expect("ct");
        agg.add(&ct.c0, &ct.c1, 1, &params).expect("add");
    }
    let decryptors: Vec<usize> = (0..8).collect();
    // A fresh key share per iteration (untimed), so the flooding budget never runs out.
    let mine: Vec<SecretShare> = dealings.iter().map(|d| d.shares[0].clone()).collect();
    // The flood is drawn ahead in the protocol: timed on its own, and in
    // the batch's setup for the share.
    g.bench_function("flooding_noise", |b| b.iter(|| FloodingNoise::draw(&params, agg.c1.len(), &mut rng)));
    g.bench_function("decryption_share", |b| {
        b.iter_batched(
            || {
                let key = KeyShare::assemble(&params, 0, &mine, 0).expect("key");
                (key, FloodingNoise::draw(&params, agg.c1.len(), &mut Csprng::from_os()))
            },
            |(mut key, flood)| key.decryption_share_with(&params, &agg.c1, &decryptors, flood).expect("share"),
            criterion::BatchSize::SmallInput,
        )
    });
    let shares: Vec<_> = decryptors
        .iter()
        .map(|&j| Some(keys[j].decryption_share(&params, &agg.c1, &decryptors, &mut rng).expect("share")))
        .collect();
    g.bench_function("combine_8_shares", |b| {
        b.iter(|| he::combine(&params, &agg, &decryptors, &shares, values.len()).expect("combine"))
    });
    g.bench_function("linear_hash", |b| b.iter(|| LinearHash::new(b"t").hash(&[&agg.c0, &agg.c1])));
    g.finish();
}

criterion_group!(benches, he_block);
criterion_main!(benches);
