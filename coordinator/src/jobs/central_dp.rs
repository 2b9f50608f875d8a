//! Central party-level DP (DP-FedAvg, McMahan et al. 2018) for
//! `[dp] level = "party"` under `aggregation.protocol = "none"`: the
//! coordinator — trusted for this, which is why each party's policy must
//! opt in (`accept_central_dp`) — clips every party's update to the spec's
//! norm (again: the parties already did), sums them, and adds exact
//! discrete Gaussian noise on a lattice, as DP-SGD does for rows
//! (`confide_dp::dpsgd`). Neighbouring federations differ by one party's
//! whole update, so one round is the discrete Gaussian mechanism with
//! sensitivity `update_clip`; the noisy sum is divided by a public count
//! (the parties the spec names, or its minimum), never by how many answered.

use confide_algorithms::Parameters;
use confide_algorithms::trainer::is_input_standardisation;
use confide_crypto::aggregation::PartyUpdate;
use confide_dp::ddg::AdaptiveClip;
use confide_dp::dpsgd::{CompensatedSum, DpSgd, DpSgdConfig};

/// The noisy weighted delta sum and its total weight for
/// `Strategy::aggregate_secure_sum`: Σ clip(localᵢ − global) plus noise,
/// scaled so that the strategy's mean divides by `denominator`. Under
/// adaptive clipping (Andrew et al. 2021) each clipped update carries one
/// more value, (bᵢ − ½)·κ with bᵢ = 1 when it fitted the clip, the joint
/// vector is noised at the joint clip C′ (one release, the ε of a fixed
/// clip), and the noisy count of updates that fitted comes back third.
pub fn noisy_update_sum(
    global: &Parameters,
    updates: &[PartyUpdate],
    clip: f64,
    noise_multiplier: f64,
    denominator: usize,
    adaptive: Option<&AdaptiveClip>,
) -> Result<(Vec<f64>, f64, Option<f64>), String> {
    let values = global.num_values();
    let (joint, kappa) = match adaptive {
        None => (clip, None),
        Some(a) => {
            let (joint, kappa) =
                a.joint(clip, noise_multiplier).ok_or_else(|| format!("central DP: no joint clip for clip {clip}"))?;
            (joint, Some(kappa))
        }
    };
    let dim = values + usize::from(kappa.is_some());
    let mut dp = DpSgd::new(DpSgdConfig {
        max_grad_norm: joint,
        noise_multiplier,
        sampling_rate: 1.0,
        expected_batch_size: denominator.max(1) as f64,
        dim,
    })
    .map_err(|e| format!("central DP: {e}"))?;
    let mut total = CompensatedSum::new(dim);
    let global_values: Vec<f64> = global.tensors().iter().flat_map(|t| t.data.iter().map(|&v| f64::from(v))).collect();
    let mut delta = vec![0.0; dim];
    for u in updates {
        if u.params.spec() != global.spec() {
            return Err(format!("party {}'s update has another shape than the model", u.party));
        }
        for ((d, l), g) in
            delta.iter_mut().zip(u.params.tensors().iter().flat_map(|t| t.data.iter())).zip(&global_values)
        {
            *d = f64::from(*l) - g;
        }
        if let Some(kappa) = kappa {
            // Clip the update to C itself, then append whether it fitted.
            let norm = delta[..values].iter().map(|v| v * v).sum::<f64>().sqrt();
            let fits = norm <= clip;
            if norm.is_finite() && !fits {
                delta[..values].iter_mut().for_each(|v| *v *= clip / norm);
            }
            delta[values] = (f64::from(u8::from(fits)) - 0.5) * kappa;
        }
        let norm = delta.iter().map(|v| v * v).sum::<f64>().sqrt();
        // 0 for a non-finite update: it adds nothing.
        let f = dp.clip_factor(norm);
        if f > 0.0 {
            delta.iter_mut().for_each(|v| *v *= f);
            total.add(&delta);
        }
    }
    let mut sum = total.finish();
    dp.privatize(&mut sum).map_err(|e| format!("central DP: {e}"))?;
    // privatize divided by the denominator: the count's coordinate back to
    // counts (Σ (bᵢ − ½) = Σ bᵢ − m/2).
    let weight = denominator.max(1) as f64;
    let count = kappa.map(|k| sum[values] * weight / k + updates.len() as f64 / 2.0);
    sum.truncate(values);
    // The frozen input standardisation is not trained: it keeps its value
    // (dropping the noise on it is post-processing).
    let mut at = 0;
    for t in global.tensors() {
        let end = at + t.data.len();
        if is_input_standardisation(&t.name) {
            sum[at..end].iter_mut().for_each(|v| *v = 0.0);
        }
        at = end;
    }
    // The strategy divides the sum by its total weight, so hand it back as a
    // sum of that weight.
    sum.iter_mut().for_each(|v| *v *= weight);
    Ok((sum, weight, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;
    use confide_algorithms::trainer::INPUT_STD;

    fn params(v: Vec<f32>) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v }]).unwrap()
    }

    fn update(party: &str, v: Vec<f32>) -> PartyUpdate {
        PartyUpdate { party: party.into(), num_examples: 1, params: params(v) }
    }

    /// One party's enormous update moves the sum by at most the clip (plus
    /// noise, here tiny); the others' pass unchanged.
    #[test]
    fn each_partys_contribution_is_clipped() {
        let global = params(vec![0.0; 4]);
        let updates = [update("a", vec![1000.0, 0.0, 0.0, 0.0]), update("b", vec![0.0, 0.1, 0.0, 0.0])];
        let (sum, weight, count) = noisy_update_sum(&global, &updates, 1.0, 1e-6, 2, None).unwrap();
        assert_eq!(count, None);
        assert_eq!(weight, 2.0);
        assert!((sum[0] - 1.0).abs() < 1e-3, "{sum:?}");
        assert!((sum[1] - 0.1).abs() < 1e-3, "{sum:?}");
        let bad = [update("c", vec![0.0; 3])];
        assert!(noisy_update_sum(&global, &bad, 1.0, 1.0, 1, None).unwrap_err().contains("party c"));
    }

    /// Adaptive clipping: two of four updates fit a clip of 0.5; the noisy
    /// count says so, the updates are clipped to 0.5, the count is not in
    /// the sum.
    #[test]
    fn the_count_of_updates_within_the_clip_comes_back() {
        let global = params(vec![0.0; 4]);
        let a = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0.01 };
        let updates = [0.1f32, 0.4, 2.0, 9.0].map(|n| update("p", vec![n, 0.0, 0.0, 0.0]));
        let (sum, weight, count) = noisy_update_sum(&global, &updates, 0.5, 1e-4, 4, Some(&a)).unwrap();
        assert_eq!((sum.len(), weight), (4, 4.0));
        assert!((count.unwrap() - 2.0).abs() < 0.05, "{count:?}");
        assert!((sum[0] - (0.1 + 0.4 + 0.5 + 0.5)).abs() < 0.01, "{sum:?}");
        // The count's noise is the calibrated σ_b (2 here; at σ_b = 0.01
        // above an exact count would pass too): 2,000 releases.
        let wide = AdaptiveClip { count_stddev: 2.0, ..a };
        let counts: Vec<f64> = (0..2000)
            .map(|_| noisy_update_sum(&global, &updates, 0.5, 1.0, 4, Some(&wide)).unwrap().2.unwrap())
            .collect();
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
        assert!((mean - 2.0).abs() < 0.25, "{mean}");
        // (The sample variance's relative s.d. is 3.2%: ±20% is 6 of them,
        // and a σ_b off by √2 gives 2 or 8.)
        assert!((var / 4.0 - 1.0).abs() < 0.2, "the count's variance {var}, calibrated 4");
        // Adaptive clipping may take the clip down to the smallest stated
        // clip over 2^20: a round there still runs.
        let floor = confide_dp::MIN_ROUND_CLIP;
        let (sum, _, _) = noisy_update_sum(&global, &updates, floor, 1e-4, 4, Some(&a)).unwrap();
        assert!(sum.iter().all(|v| v.is_finite()), "{sum:?}");
    }

    /// The frozen input standardisation gets no noise.
    #[test]
    fn the_input_standardisation_is_left_alone() {
        let global = Parameters::new(vec![
            Tensor { name: INPUT_STD.into(), shape: vec![2], data: vec![1.0, 1.0] },
            Tensor { name: "w".into(), shape: vec![2], data: vec![0.0, 0.0] },
        ])
        .unwrap();
        let (sum, ..) = noisy_update_sum(&global, &[], 1.0, 5.0, 1, None).unwrap();
        assert_eq!(&sum[..2], &[0.0, 0.0]);
        assert!(sum[2] != 0.0 || sum[3] != 0.0);
    }

    /// The noise in the sum has the calibrated standard deviation z·C
    /// (within 6 standard errors; fresh OS noise each run).
    #[test]
    fn the_noise_has_the_calibrated_variance() {
        let dim = 100_000;
        let global = params(vec![0.0; dim]);
        let (sum, ..) = noisy_update_sum(&global, &[], 0.5, 2.0, 4, None).unwrap();
        let var = sum.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let want = (2.0f64 * 0.5).powi(2);
        assert!((var - want).abs() < 6.0 * want * (2.0 / dim as f64).sqrt(), "{var} vs {want}");
    }
}
