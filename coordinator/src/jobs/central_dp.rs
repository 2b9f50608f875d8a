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
use confide_algorithms::trainer::{INPUT_MEAN, INPUT_STD};
use confide_crypto::aggregation::PartyUpdate;
use confide_dp::dpsgd::{CompensatedSum, DpSgd, DpSgdConfig};

/// The noisy weighted delta sum and its total weight for
/// `Strategy::aggregate_secure_sum`: Σ clip(localᵢ − global) plus noise,
/// scaled so that the strategy's mean divides by `denominator`.
pub fn noisy_update_sum(
    global: &Parameters,
    updates: &[PartyUpdate],
    clip: f64,
    noise_multiplier: f64,
    denominator: usize,
) -> Result<(Vec<f64>, f64), String> {
    let dim = global.num_values();
    let mut dp = DpSgd::new(DpSgdConfig {
        max_grad_norm: clip,
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
    // The frozen input standardisation is not trained: it keeps its value
    // (dropping the noise on it is post-processing).
    let mut at = 0;
    for t in global.tensors() {
        let end = at + t.data.len();
        if t.name == INPUT_MEAN || t.name == INPUT_STD {
            sum[at..end].iter_mut().for_each(|v| *v = 0.0);
        }
        at = end;
    }
    // privatize divided by the denominator; the strategy divides the sum
    // by its total weight, so hand it back as a sum of that weight.
    let weight = denominator.max(1) as f64;
    sum.iter_mut().for_each(|v| *v *= weight);
    Ok((sum, weight))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;

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
        let (sum, weight) = noisy_update_sum(&global, &updates, 1.0, 1e-6, 2).unwrap();
        assert_eq!(weight, 2.0);
        assert!((sum[0] - 1.0).abs() < 1e-3, "{sum:?}");
        assert!((sum[1] - 0.1).abs() < 1e-3, "{sum:?}");
        let bad = [update("c", vec![0.0; 3])];
        assert!(noisy_update_sum(&global, &bad, 1.0, 1.0, 1).unwrap_err().contains("party c"));
    }

    /// The frozen input standardisation gets no noise.
    #[test]
    fn the_input_standardisation_is_left_alone() {
        let global = Parameters::new(vec![
            Tensor { name: INPUT_STD.into(), shape: vec![2], data: vec![1.0, 1.0] },
            Tensor { name: "w".into(), shape: vec![2], data: vec![0.0, 0.0] },
        ])
        .unwrap();
        let (sum, _) = noisy_update_sum(&global, &[], 1.0, 5.0, 1).unwrap();
        assert_eq!(&sum[..2], &[0.0, 0.0]);
        assert!(sum[2] != 0.0 || sum[3] != 0.0);
    }

    /// The noise in the sum has the calibrated standard deviation z·C
    /// (within 6 standard errors; fresh OS noise each run).
    #[test]
    fn the_noise_has_the_calibrated_variance() {
        let dim = 100_000;
        let global = params(vec![0.0; dim]);
        let (sum, _) = noisy_update_sum(&global, &[], 0.5, 2.0, 4).unwrap();
        let var = sum.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let want = (2.0f64 * 0.5).powi(2);
        assert!((var - want).abs() < 6.0 * want * (2.0 / dim as f64).sqrt(), "{var} vs {want}");
    }
}
