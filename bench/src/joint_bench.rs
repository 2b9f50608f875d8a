//! `confide-bench joint`: what hard-example mining buys on the UCI digits.
//! A small edge MLP and a cloud CNN are trained on the same 70% of the rows
//! (libtorch, one thread); on the other 30% each rule and threshold sends
//! the edge's hard examples to the cloud model, and the table reports the
//! fraction forwarded, the joint accuracy, its distance from cloud-only and
//! McNemar's exact test against cloud-only, beside edge-only and cloud-only.
//! (Latency through the federation is measured once forwarding runs over
//! the parties' streams.)

use confide_algorithms::data::{CsvOptions, Dataset};
use confide_algorithms::hard_examples::{HardExampleRule, mcnemar_exact};
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{FitConfig, ModelConfig, OptimizerKind, TrainConfig, Trainer};
use confide_party::trainers::BuiltinTrainers;

fn train(model: &ModelConfig, train: &Dataset, test: &Dataset, epochs: u32) -> Result<Box<dyn Trainer>, String> {
    let factory = BuiltinTrainers::new(Default::default(), 1);
    let mut t = factory.build_model(model, 7, train.clone(), test.clone(), "bench")?;
    let mut p = t.parameters().map_err(|e| e.to_string())?;
    apply_feature_stats(&mut p, &train.feature_stats()).map_err(|e| e.to_string())?;
    t.set_parameters(&p).map_err(|e| e.to_string())?;
    let tc = TrainConfig {
        local_epochs: epochs,
        batch_size: 32,
        learning_rate: 0.01,
        optimizer: OptimizerKind::Adam,
        ..TrainConfig::default()
    };
    t.fit(&FitConfig { round: 1, train: tc }).map_err(|e| e.to_string())?;
    Ok(t)
}

/// A rule at a threshold.
type RuleOf = fn(f64) -> HardExampleRule;

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

/// The table, one JSON object per line: edge-only, cloud-only, then each
/// rule at each threshold.
pub fn bench_joint(data: &std::path::Path, epochs: u32) -> Result<Vec<serde_json::Value>, String> {
    let ds = Dataset::load_csv(data, &CsvOptions { header: false, label_column: -1 }).map_err(|e| e.to_string())?;
    let (train_rows, test) = ds.split(0.3, 11);
    let classes = 10;
    let edge_model = ModelConfig::mlp(classes, vec![16]);
    let cloud_model = ModelConfig::cnn(classes, vec![16, 32], [1, 8, 8]);
    let edge = train(&edge_model, &train_rows, &test, epochs)?;
    let cloud = train(&cloud_model, &train_rows, &test, epochs)?;
    let pe = edge.predict(&test.features).map_err(|e| e.to_string())?;
    let pc = cloud.predict(&test.features).map_err(|e| e.to_string())?;
    let n = test.len();
    let right = |p: &[f32], i: usize| argmax(&p[i * classes..(i + 1) * classes]) == test.labels[i] as usize;
    let edge_right: Vec<bool> = (0..n).map(|i| right(&pe, i)).collect();
    let cloud_right: Vec<bool> = (0..n).map(|i| right(&pc, i)).collect();
    let acc = |r: &[bool]| r.iter().filter(|&&x| x).count() as f64 / n as f64;
    let (edge_acc, cloud_acc) = (acc(&edge_right), acc(&cloud_right));
    let only_edge = (0..n).filter(|&i| edge_right[i] && !cloud_right[i]).count() as u64;
    let only_cloud = (0..n).filter(|&i| !edge_right[i] && cloud_right[i]).count() as u64;
    let mut out = vec![
        serde_json::json!({ "bench": "joint", "mode": "edge-only", "rows": n, "forwarded": 0.0, "accuracy": edge_acc,
            "model": "mlp [16]", "points_below_cloud": (cloud_acc - edge_acc) * 100.0,
            "mcnemar_p_vs_cloud": mcnemar_exact(only_edge, only_cloud) }),
        serde_json::json!({ "bench": "joint", "mode": "cloud-only", "rows": n, "forwarded": 1.0, "accuracy": cloud_acc,
            "model": "cnn [16, 32]" }),
    ];
    let grid: [(RuleOf, &[f64]); 3] = [
        (|t| HardExampleRule::Confidence { threshold: t }, &[0.6, 0.8, 0.9, 0.95, 0.99]),
        (|t| HardExampleRule::Margin { threshold: t }, &[0.2, 0.4, 0.6, 0.8, 0.9]),
        (|t| HardExampleRule::Entropy { threshold: t }, &[0.05, 0.1, 0.2, 0.3, 0.5]),
    ];
    for (make, thresholds) in grid {
        for &t in thresholds {
            let rule = make(t);
            rule.validate()?;
            let hard: Vec<bool> = (0..n).map(|i| rule.is_hard(&pe[i * classes..(i + 1) * classes])).collect();
            let joint_right: Vec<bool> = (0..n).map(|i| if hard[i] { cloud_right[i] } else { edge_right[i] }).collect();
            let b = (0..n).filter(|&i| joint_right[i] && !cloud_right[i]).count() as u64;
            let c = (0..n).filter(|&i| !joint_right[i] && cloud_right[i]).count() as u64;
            let joint_acc = acc(&joint_right);
            out.push(serde_json::json!({
                "bench": "joint", "mode": "joint", "rule": rule.name(), "threshold": t, "rows": n,
                "forwarded": hard.iter().filter(|&&h| h).count() as f64 / n as f64,
                "accuracy": joint_acc,
                "points_below_cloud": (cloud_acc - joint_acc) * 100.0,
                "mcnemar_p_vs_cloud": mcnemar_exact(b, c),
            }));
        }
    }
    Ok(out)
}
