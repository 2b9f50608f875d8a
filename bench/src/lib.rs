//! Library side of `confide-bench`: the HTTP load generator that the
//! `serve` and `load` commands, the serving end-to-end tests and
//! `scripts/demo-lifecycle.sh` drive prediction endpoints with.

pub mod loadgen;

/// The distributed-DP mechanism both DDG encoding benchmarks time (the
/// criterion bench and `confide-bench dp`): one party's `dim` values among 10
/// parties, 7 honest, 32-bit words.
pub fn ddg_bench_mechanism(dim: usize) -> Result<confide_dp::ddg::Ddg, String> {
    confide_dp::ddg::Ddg::new(confide_dp::ddg::DdgConfig {
        clip: 1.0,
        noise_multiplier: 1.0,
        dim,
        bits: 32,
        max_parties: 10,
        honest_parties: 7,
        beta: (-0.5f64).exp(),
        k_stddevs: 4.0,
    })
    .map_err(|e| e.to_string())
}
