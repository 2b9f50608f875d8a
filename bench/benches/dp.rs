//! Criterion benches of differential privacy: exact discrete Gaussian noise
//! and the RDP accountant (`confide-bench dp` prints the same as JSON, with
//! OpenDP's sampler timed in the same run).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use confide_dp::rdp::{DpEvent, RdpAccountant};
use confide_dp::sampler::DiscreteGaussian;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn noise(c: &mut Criterion) {
    let n = 1_000_000;
    let mut g = c.benchmark_group("dp_noise");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    for sigma in [1_000u32, 1_000_000] {
        let dg = DiscreteGaussian::with_sigma(sigma).expect("sigma");
        let mut out = vec![0i64; n];
        g.bench_function(format!("discrete_gaussian_1M_sigma_{sigma}"), |b| {
            b.iter(|| dg.fill(&mut out).expect("fill"))
        });
    }
    g.finish();
}

/// One party's distributed-DP encoding of a 1M-value update (rotation,
/// conditional rounding, noise added, words out): the part of the fit
/// stage that `secagg-dp` adds to a round (the noise itself is drawn ahead).
fn ddg_encode(c: &mut Criterion) {
    let dim = 1_000_000;
    let ddg = confide_bench::ddg_bench_mechanism(dim).expect("mechanism");
    let x: Vec<f32> = (0..dim).map(|i| ((i as f32) * 0.37).sin() * 1e-3).collect();
    let seed = [7u8; 32];
    let mut rng = confide_dp::sampler::os_seeded_rng().expect("rng");
    let mut g = c.benchmark_group("ddg");
    g.sample_size(10);
    g.throughput(Throughput::Elements(dim as u64));
    g.bench_function("encode_1M", |b| {
        b.iter_batched(
            || ddg.sample_noise().expect("noise"),
            |noise| ddg.encode(&x, noise, &seed, &mut rng).expect("encode"),
            criterion::BatchSize::PerIteration,
        )
    });
    // The coordinator's side, once per round on its critical path: the
    // modular sum back to Σ clip(Δᵢ) + noise.
    let words = ddg.encode(&x, ddg.sample_noise().expect("noise"), &seed, &mut rng).expect("encode");
    g.bench_function("decode_1M", |b| b.iter(|| ddg.decode(&words, &seed).expect("decode")));
    // The party's whole path: local − global over a model's tensors (a
    // 999 × 1000 layer and its bias), clipped, rotated, rounded, noised.
    let tensor = |name: &str, shape: Vec<usize>, f: &dyn Fn(usize) -> f32| {
        let len = shape.iter().product();
        confide_algorithms::Tensor { name: name.into(), shape, data: (0..len).map(f).collect() }
    };
    let model = |shift: f32| {
        confide_algorithms::Parameters::new(vec![
            tensor("w", vec![999, 1000], &|i| ((i as f32) * 0.37).sin() + shift * ((i as f32) * 0.11).cos()),
            tensor("b", vec![1000], &|i| shift * (i as f32) * 1e-3),
        ])
        .expect("model")
    };
    let (global, local) = (model(0.0), model(1e-3));
    let template = *ddg.config();
    let update = confide_crypto::aggregation::update::NoisyUpdate::new(&template, "bench", 1, &global).expect("update");
    g.bench_function("noisy_update_encode_1M", |b| {
        b.iter_batched(
            || update.sample_noise().expect("noise"),
            |noise| update.encode(&global, &local, noise).expect("encode"),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn accountant(c: &mut Criterion) {
    let event = DpEvent::PoissonSampledGaussian { sampling_rate: 0.01, noise_multiplier: 1.1 };
    c.bench_function("rdp_epsilon_1000_steps", |b| {
        b.iter(|| {
            let mut acc = RdpAccountant::new();
            acc.compose(&event, 1000).expect("compose");
            acc.epsilon(1e-5).expect("epsilon")
        })
    });
    let mut g = c.benchmark_group("pld");
    g.sample_size(10);
    g.bench_function("pld_epsilon_1000_steps", |b| {
        b.iter(|| {
            let mut acc = confide_dp::pld::PldAccountant::new(0);
            acc.compose(&event, 1000).expect("compose");
            acc.epsilon(1e-5).expect("epsilon")
        })
    });
    g.finish();
}

criterion_group!(benches, noise, ddg_encode, accountant);
criterion_main!(benches);
