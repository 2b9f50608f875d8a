//! `confide-bench he`: the threshold-HE layer's steps at federation scale
//! (10 parties × 10^6 values by default), medians over repetitions, one JSON
//! object per party count. These are the per-step figures issue 12 sets
//! targets for; the whole round is `confide-bench round --privacy he`.
//! Randomness that does not depend on the data (encryption masks, flooding
//! noise) is timed apart from the online steps, as the protocol draws it
//! ahead.

use std::time::Instant;

use confide_crypto::he::{
    self, Aggregate, CommonPoly, Csprng, Decrypted, FloodingNoise, HeParams, KeyShare, LinearHash, PublicKey,
    SecretShare,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

/// One party count: keys, then `repeat` encrypt/add/decrypt rounds.
pub fn bench_he(parties: usize, values: usize, bits: u32, repeat: usize) -> Result<serde_json::Value, String> {
    let corrupt = parties / 10;
    let tau = he::params::threshold_for(parties, corrupt);
    let surplus = 2.min(parties - tau);
    let probe = HeParams::new(parties, tau, 1, 26, surplus).map_err(|e| e.to_string())?;
    let bits = bits.min(probe.max_bits());
    let params = HeParams::new(parties, tau, bits, 26, surplus).map_err(|e| e.to_string())?;
    let crp = CommonPoly::derive(b"confide-bench he");
    let mut rng = Csprng::from_os();

    let (dealings, keygen_s) =
        time(|| (0..parties).map(|i| he::deal(&params, &crp, i, &mut rng)).collect::<Result<Vec<_>, _>>());
    let dealings = dealings.map_err(|e| e.to_string())?;
    let pk = PublicKey::assemble(&crp, &dealings.iter().map(|d| d.public_share.clone()).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;
    let mut keys: Vec<KeyShare> = (0..parties)
        .map(|j| {
            let mine: Vec<SecretShare> = dealings.iter().map(|d| d.shares[j].clone()).collect();
            KeyShare::assemble(&params, j, &mine, 0)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    drop(dealings);

    let input: Vec<u32> = (0..values).map(|i| (i as u32).wrapping_mul(2654435761) & ((1 << bits) - 1)).collect();
    let decryptors: Vec<usize> = (0..(tau + surplus)).collect();
    let (mut precompute, mut encrypt, mut add, mut hash, mut share, mut flood, mut combine) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let slots = values.div_ceil(he::ring::N) * he::ring::N;
    for _ in 0..repeat {
        let mut agg = Aggregate::new(slots);
        for p in 0..parties {
            let (masks, t_pre) = time(|| pk.precompute(values, &mut rng));
            let (ct, t_enc) = time(|| masks.encrypt(&params, &input));
            let ct = ct.map_err(|e| e.to_string())?;
            let (r, t_add) = time(|| agg.add(&ct.c0, &ct.c1, 1, &params));
            r.map_err(|e| e.to_string())?;
            if p == 0 {
                precompute.push(t_pre);
                encrypt.push(t_enc);
            }
            add.push(t_add);
        }
        let (_, t_hash) = time(|| LinearHash::new(b"bench transcript").hash(&[&agg.c1]));
        hash.push(t_hash);
        let mut shares = Vec::new();
        for &j in &decryptors {
            // The flood does not depend on the aggregate: drawn ahead in the
            // protocol, so timed apart from the share.
            let (noise, t_flood) = time(|| FloodingNoise::draw(&params, agg.c1.len(), &mut rng));
            let (s, t) = time(|| keys[j].decryption_share_with(&params, &agg.c1, &decryptors, noise));
            shares.push(Some(s.map_err(|e| e.to_string())?));
            share.push(t);
            flood.push(t_flood);
        }
        let (out, t_comb) = time(|| he::combine(&params, &agg, &decryptors, &shares, values));
        let out: Decrypted = out.map_err(|e| e.to_string())?;
        let mask = (1u64 << bits) - 1;
        if out.values.iter().zip(&input).any(|(&o, &i)| o as u64 != (i as u64 * parties as u64) & mask) {
            return Err("he bench: wrong sum".into());
        }
        combine.push(t_comb);
    }
    // Each add above is one ciphertext; "add" is the server's total for all parties.
    let add_total = median(add) * parties as f64;
    let upload = params.ciphertext_bytes(values);
    let f32_bytes = 4 * values;
    let share_bytes = he::pack::packed_len(slots, params.switch_bits);
    let download_c1 = he::pack::packed_len(slots, 62);
    Ok(serde_json::json!({
        "bench": "he",
        "parties": parties,
        "values": values,
        "threshold": tau,
        "decryptors": decryptors.len(),
        "bits": bits,
        "switch_bits": params.switch_bits,
        "flood_sigma_log2": params.flood_sigma.log2(),
        "keygen_deal_s_per_party": keygen_s / parties as f64,
        "precompute_s_per_party": median(precompute),
        "encrypt_online_s_per_party": median(encrypt),
        "server_add_s_all_parties": add_total,
        "linear_hash_s": median(hash),
        "decryption_share_online_s_per_party": median(share),
        "flooding_noise_s_per_party": median(flood),
        "combine_s": median(combine),
        "upload_bytes_per_party": upload,
        "upload_vs_f32": upload as f64 / f32_bytes as f64,
        "decryptor_download_c1_bytes": download_c1,
        "decryption_share_bytes": share_bytes,
        "decryptor_total_bytes_vs_f32": (upload + download_c1 + share_bytes) as f64 / f32_bytes as f64,
    }))
}
