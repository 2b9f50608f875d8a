//! Local training with libtorch through `tch`: logistic regression, MLP and a
//! small CNN defined in Rust, or a TorchScript module the party holds as a
//! file.
//!
//! Parameters travel as named `f32` tensors in a fixed order: the frozen
//! input standardisation (`input.mean`, `input.std`, set from federated
//! statistics) first, then the trainable tensors sorted by name. A
//! [`TorchTrainer`] is `Send` but not `Sync` (nor are libtorch tensors), so
//! the party runs it on the job's dedicated worker thread.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use confide_algorithms::data::Dataset;
use confide_algorithms::trainer::{DpSgdPlan, INPUT_MEAN, INPUT_STD, classification_outcome, row_count};
use confide_algorithms::{
    Architecture, Error, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, ModelConfig, OptimizerKind,
    Parameters, Tensor as NamedTensor, TensorSpec, Trainer,
};
use confide_dp::dpsgd::{CHUNK_ROWS, CompensatedSum};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// libtorch keeps one global RNG: initialisation holds this lock so that a
/// seed gives the same initial model even with several jobs in the process.
static INIT_LOCK: Mutex<()> = Mutex::new(());
static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets libtorch's intra-op thread count, once per process (later calls are
/// ignored). One thread per job is fastest for the small models federated
/// parties train and keeps runs deterministic.
pub fn set_threads(threads: usize) {
    let n = *THREADS.get_or_init(|| threads.max(1));
    tch::set_num_threads(i32::try_from(n).unwrap_or(1));
}

fn torch_err(what: &str) -> impl Fn(tch::TchError) -> Error + '_ {
    move |e| Error::Training(format!("libtorch: {what}: {e}"))
}

enum Net {
    Builtin(nn::Sequential),
    Script(tch::TrainableCModule),
}

impl Net {
    fn forward(&self, xs: &Tensor) -> Result<Tensor, Error> {
        match self {
            Net::Builtin(seq) => Ok(seq.forward(xs)),
            Net::Script(m) => m.forward_ts(&[xs]).map_err(torch_err("TorchScript forward")),
        }
    }
}

/// A layer as DP-SGD's per-example gradients see it, with its
/// weight's and bias's names in the var store.
#[derive(Debug, Clone, PartialEq)]
enum DpLayer {
    /// `x·Wᵀ + b`, then the activation.
    Linear { weight: String, bias: String, activation: Activation },
    /// A 3×3 convolution (padding 1), then ReLU and 2×2 max-pooling.
    Conv { weight: String, bias: String },
    /// Flattens the feature maps before the output layer.
    Flatten,
    /// Views each row's values as a channels × height × width image (a
    /// TorchScript module that reshapes its input).
    Image { shape: [i64; 3] },
}

impl DpLayer {
    /// The layer applied to `a`: its output, and for a layer with weights
    /// its output before the activation, z, whose gradient DP-SGD takes
    /// per row. One definition for DP-SGD's forward pass and for checking
    /// a TorchScript module's reconstruction against its own forward.
    fn apply<'v>(
        &self,
        a: &Tensor,
        var: &dyn Fn(&str) -> Result<&'v Tensor, Error>,
    ) -> Result<(Tensor, Option<Tensor>), Error> {
        match self {
            DpLayer::Linear { weight, bias, activation } => {
                let z = a.f_linear(var(weight)?, Some(var(bias)?)).map_err(torch_err("linear"))?;
                Ok((activation.apply(&z), Some(z)))
            }
            DpLayer::Conv { weight, bias } => {
                let z = a
                    .f_conv2d(var(weight)?, Some(var(bias)?), [1, 1], [1, 1], [1, 1], 1)
                    .map_err(torch_err("conv2d"))?;
                Ok((z.relu().max_pool2d_default(2), Some(z)))
            }
            DpLayer::Flatten => Ok((a.flatten(1, -1), None)),
            DpLayer::Image { shape: [c, h, w] } => {
                Ok((a.f_view([-1, *c, *h, *w]).map_err(torch_err("image shape"))?, None))
            }
        }
    }
}

/// An element-wise activation after a linear layer (its per-example
/// weight gradient is still g ⊗ a, g the gradient at the layer's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Relu,
    Tanh,
    /// The output layer's logits.
    Identity,
}

impl Activation {
    fn apply(self, z: &Tensor) -> Tensor {
        match self {
            Activation::Relu => z.relu(),
            Activation::Tanh => z.tanh(),
            Activation::Identity => z.shallow_clone(),
        }
    }
}

fn linear(name: &str, activation: Activation) -> DpLayer {
    DpLayer::Linear { weight: format!("{name}.weight"), bias: format!("{name}.bias"), activation }
}

/// Most linear layers a TorchScript module may have for DP-SGD (each hidden
/// one's activation is found among three by trying them all).
const MAX_SCRIPT_LAYERS: usize = 6;

/// Most convolutions a TorchScript module may have for DP-SGD.
const MAX_SCRIPT_CONVOLUTIONS: usize = 6;

/// A weight and bias pair's names, and its inputs and outputs (features, or
/// channels for a convolution).
type Pair<'a> = (&'a str, &'a str, i64, i64);

/// The layers of a TorchScript module, when its forward is a chain DP-SGD
/// has per-example gradients for: optionally 3×3 convolutions (padding 1),
/// each followed by ReLU and 2×2 max-pooling, over each row viewed as an
/// image, then flattened; then linear layers with ReLU, tanh or no
/// activation between them (the built-in models' layers). The variables
/// must pair into weights and biases (by the names' common prefix) that
/// chain, convolutions by channels and linear layers by width, from
/// `features` inputs to `classes` outputs in exactly one way, and one
/// choice of image shape and activations must reproduce the module's
/// forward on `probe` rows. DP-SGD then trains through this
/// reconstruction: its privacy rests on the per-example gradients of what
/// it computes, whatever the module's own code does; the probe makes the
/// trained model the module's. Otherwise the reason.
fn script_layers(
    vars: &std::collections::BTreeMap<String, Tensor>,
    features: usize,
    classes: usize,
    probe: &Tensor,
    forward: &dyn Fn(&Tensor) -> Result<Tensor, Error>,
) -> Result<Vec<DpLayer>, String> {
    let mut pairs: std::collections::BTreeMap<&str, (Option<&str>, Option<&str>)> = Default::default();
    for name in vars.keys() {
        if let Some(prefix) = name.strip_suffix("weight") {
            pairs.entry(prefix).or_default().0 = Some(name);
        } else if let Some(prefix) = name.strip_suffix("bias") {
            pairs.entry(prefix).or_default().1 = Some(name);
        } else {
            return Err(format!("its parameter {name:?} is neither a layer's weight nor its bias"));
        }
    }
    let (mut linears, mut convolutions): (Vec<Pair>, Vec<Pair>) = Default::default();
    for (prefix, pair) in &pairs {
        let (Some(w), Some(b)) = *pair else {
            return Err(format!("its parameters {prefix}weight and {prefix}bias do not come in pairs"));
        };
        match (vars[w].size().as_slice(), vars[b].size().as_slice()) {
            (&[out, inp], &[bias]) if bias == out => linears.push((w, b, inp, out)),
            (&[out, inp, 3, 3], &[bias]) if bias == out => convolutions.push((w, b, inp, out)),
            (&[_, _, kh, kw], &[_]) if (kh, kw) != (3, 3) => {
                return Err(format!(
                    "{w} is a {kh}×{kw} convolution's; DP-SGD takes 3×3 ones (padding 1, each followed by ReLU \
                     and 2×2 max-pooling)"
                ));
            }
            (ws, bs) => return Err(format!("{w} {ws:?} and {b} {bs:?} are not a linear layer's or a convolution's")),
        }
    }
    if linears.is_empty() || linears.len() > MAX_SCRIPT_LAYERS {
        return Err(format!("it has {} linear layers; DP-SGD takes 1 to {MAX_SCRIPT_LAYERS}", linears.len()));
    }
    if convolutions.len() > MAX_SCRIPT_CONVOLUTIONS {
        return Err(format!(
            "it has {} convolutions; DP-SGD takes at most {MAX_SCRIPT_CONVOLUTIONS}",
            convolutions.len()
        ));
    }
    // The layers before the linear ones, for each image shape the row could
    // be viewed as, and the width they flatten to.
    let fronts = convolution_fronts(&convolutions, to_i64(features))?;
    let mut candidates = Vec::new();
    let mut why = String::new();
    for (front, width) in fronts {
        match chain_of(linears.clone(), width, "linear layers", "inputs") {
            Ok(chain) if chain.last().map(|l| l.3) == Some(to_i64(classes)) => candidates.push((front, chain)),
            // The squarest image's reason, the likeliest.
            Ok(_) | Err(_) if !why.is_empty() => {}
            Ok(chain) => {
                let end = chain.last().map_or(width, |l| l.3);
                why = format!("its linear layers end in {end} outputs, not the {classes} classes");
            }
            Err(e) => why = e,
        }
    }
    if candidates.is_empty() {
        return Err(why);
    }
    tch::no_grad(|| {
        let want = forward(probe).map_err(|e| e.to_string())?;
        let tolerance = 1e-5 * want.abs().max().double_value(&[]).max(1.0);
        let var = |n: &str| vars.get(n).ok_or_else(|| Error::Training(format!("tensor {n} vanished")));
        let choices = [Activation::Relu, Activation::Tanh, Activation::Identity];
        let run = |layers: &[DpLayer], x: &Tensor| {
            layers.iter().try_fold(x.shallow_clone(), |a, l| l.apply(&a, &var).ok().map(|(next, _)| next))
        };
        for (front, chain) in &candidates {
            // The convolutions once per image shape; the linear layers once
            // per choice of activations.
            let Some(flat) = run(front, probe) else { continue };
            let hidden = chain.len() - 1;
            for code in 0..3usize.pow(hidden as u32) {
                let linear = chain.iter().enumerate().map(|(k, (w, b, _, _))| DpLayer::Linear {
                    weight: (*w).to_owned(),
                    bias: (*b).to_owned(),
                    activation: if k < hidden {
                        choices[code / 3usize.pow(k as u32) % 3]
                    } else {
                        Activation::Identity
                    },
                });
                let linear: Vec<DpLayer> = linear.collect();
                if let Some(a) = run(&linear, &flat)
                    && a.size() == want.size()
                    && (a - &want).abs().max().double_value(&[]) <= tolerance
                {
                    return Ok(front.iter().cloned().chain(linear).collect());
                }
            }
        }
        Err("its forward is not a chain of its layers that DP-SGD takes (3×3 convolutions with padding 1, each \
             followed by ReLU and 2×2 max-pooling, then linear layers with ReLU, tanh or no activation between \
             them; checked on probe rows)"
            .to_owned())
    })
}

/// `pairs` in the one order that chains them from `width` (each one's
/// inputs the previous one's outputs), or why there is none.
fn chain_of<'a>(mut pairs: Vec<Pair<'a>>, mut width: i64, what: &str, unit: &str) -> Result<Vec<Pair<'a>>, String> {
    let first = width;
    let mut chain = Vec::with_capacity(pairs.len());
    while !pairs.is_empty() {
        let next: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].2 == width).collect();
        let [i] = next.as_slice() else {
            return Err(format!("its {what} do not chain from {first} {unit} in exactly one way"));
        };
        let l = pairs.remove(*i);
        width = l.3;
        chain.push(l);
    }
    Ok(chain)
}

/// A TorchScript module's layers before its linear ones, for each image
/// shape its convolutions could view a row of `features` values as (the
/// probe picks one): the view, the convolutions chained by channels, the
/// flattening; and the width that leaves. Without convolutions, nothing
/// and `features`.
fn convolution_fronts(convolutions: &[Pair], features: i64) -> Result<Vec<(Vec<DpLayer>, i64)>, String> {
    if convolutions.is_empty() {
        return Ok(vec![(Vec::new(), features)]);
    }
    // The image's channels: the first convolution's inputs, which must
    // divide the row's values.
    let mut starts: Vec<i64> = convolutions.iter().map(|c| c.2).filter(|&c| c > 0 && features % c == 0).collect();
    starts.sort_unstable();
    starts.dedup();
    let chains: Vec<(i64, Vec<Pair>)> = starts
        .into_iter()
        .filter_map(|c| chain_of(convolutions.to_vec(), c, "convolutions", "channels").ok().map(|chain| (c, chain)))
        .collect();
    let [(channels, chain)] = chains.as_slice() else {
        return Err(format!("its convolutions do not chain from an image of {features} values in exactly one way"));
    };
    let last = chain.last().map_or(*channels, |l| l.3);
    let pixels = features / channels;
    let mut fronts = Vec::new();
    // The squarest shapes first: the likeliest, so the probe finds the
    // module's sooner.
    let mut heights: Vec<i64> = (1..=pixels).filter(|h| pixels % h == 0).collect();
    heights.sort_by_key(|&h| (h - pixels / h).abs());
    for h in heights {
        let w = pixels / h;
        let mut layers = vec![DpLayer::Image { shape: [*channels, h, w] }];
        let (mut hh, mut ww) = (h, w);
        for (weight, bias, _, _) in chain {
            layers.push(DpLayer::Conv { weight: (*weight).to_owned(), bias: (*bias).to_owned() });
            (hh, ww) = (hh / 2, ww / 2);
        }
        if hh > 0 && ww > 0 {
            layers.push(DpLayer::Flatten);
            fronts.push((layers, last * hh * ww));
        }
    }
    if fronts.is_empty() {
        return Err(format!("its {} convolutions pool an image of {pixels} pixels away", chain.len()));
    }
    Ok(fronts)
}

/// A libtorch model over one party's rows.
pub struct TorchTrainer {
    /// The built-in model's layers, for DP-SGD (`None` for TorchScript,
    /// whose per-example gradients cannot be derived from its code).
    layers: Option<Vec<DpLayer>>,
    /// Why a TorchScript module has no per-example gradients here.
    dp_refusal: Option<String>,
    vs: nn::VarStore,
    net: Net,
    /// Trainable tensors' names, sorted: the wire order after the input statistics.
    names: Vec<String>,
    classes: usize,
    features: usize,
    /// Shape of one batch with a leading -1, e.g. `[-1, 30]` or `[-1, 1, 8, 8]`.
    input_shape: Vec<i64>,
    mean: Vec<f32>,
    std: Vec<f32>,
    train: Dataset,
    held_out: Dataset,
    salt: u64,
    /// DP-SGD noise drawn ahead for the next round.
    noise_reserve: Option<confide_dp::dpsgd::NoiseReserve>,
}

fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl TorchTrainer {
    /// Builds the model `model` describes over `train`'s features, initialised
    /// from `seed`. `script` is the TorchScript file for `kind = "torchscript"`.
    /// `salt` distinguishes parties' shuffling.
    pub fn new(
        model: &ModelConfig,
        script: Option<&Path>,
        train: Dataset,
        held_out: Dataset,
        seed: u64,
        salt: u64,
    ) -> Result<Self, Error> {
        let classes = model.classes;
        let d = train.num_features.max(held_out.num_features);
        // No training rows is for the caller to refuse: a DP job sets up
        // (and DP-SGD sends noise) whether or not any row is there.
        if d == 0 {
            return Err(Error::InvalidInput("the rows' width is unknown: no rows and none declared".into()));
        }
        for ds in [&train, &held_out] {
            if let Some(l) = ds.labels.iter().find(|&&l| l as usize >= classes) {
                return Err(Error::InvalidInput(format!("label {l} is outside the model's {classes} classes")));
            }
        }
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let mut input_shape = vec![-1, to_i64(d)];
        let net = {
            let _guard = INIT_LOCK.lock().map_err(|_| Error::Training("initialisation lock poisoned".into()))?;
            tch::manual_seed(i64::from_le_bytes(seed.to_le_bytes()));
            match &model.architecture {
                Architecture::LogisticRegression { .. } => Net::Builtin(nn::seq().add(nn::linear(
                    &root / "linear",
                    to_i64(d),
                    to_i64(classes),
                    Default::default(),
                ))),
                Architecture::Mlp { hidden } => {
                    let mut seq = nn::seq();
                    let mut width = d;
                    for (i, &h) in hidden.iter().enumerate() {
                        seq = seq
                            .add(nn::linear(&root / format!("fc{i}"), to_i64(width), to_i64(h), Default::default()))
                            .add_fn(|x| x.relu());
                        width = h;
                    }
                    Net::Builtin(seq.add(nn::linear(&root / "out", to_i64(width), to_i64(classes), Default::default())))
                }
                Architecture::Cnn { channels, image } => {
                    let [c, h, w] = *image;
                    if c * h * w != d {
                        return Err(Error::InvalidInput(format!(
                            "model.image {c}x{h}x{w} needs {} features per row; the data has {d}",
                            c * h * w
                        )));
                    }
                    input_shape = vec![-1, to_i64(c), to_i64(h), to_i64(w)];
                    let conv = nn::ConvConfig { padding: 1, ..Default::default() };
                    let (mut seq, mut ch, mut hh, mut ww) = (nn::seq(), c, h, w);
                    for (i, &out) in channels.iter().enumerate() {
                        seq = seq
                            .add(nn::conv2d(&root / format!("conv{i}"), to_i64(ch), to_i64(out), 3, conv))
                            .add_fn(|x| x.relu().max_pool2d_default(2));
                        (ch, hh, ww) = (out, hh / 2, ww / 2);
                    }
                    let flat = to_i64(ch * hh * ww);
                    Net::Builtin(seq.add_fn(|x| x.flatten(1, -1)).add(nn::linear(
                        &root / "out",
                        flat,
                        to_i64(classes),
                        Default::default(),
                    )))
                }
                Architecture::Torchscript { .. } => {
                    let path = script.ok_or_else(|| Error::InvalidInput("no TorchScript file given".into()))?;
                    let mut m = tch::TrainableCModule::load(path, root.clone()).map_err(|e| {
                        Error::InvalidInput(format!("{}: not a loadable TorchScript module: {e}", path.display()))
                    })?;
                    // A module saved in training mode (batch norm, dropout)
                    // would score each row with statistics of its batch.
                    m.set_eval();
                    Net::Script(m)
                }
                other => {
                    let kind = ModelConfig::new(classes, other.clone()).kind();
                    return Err(Error::InvalidInput(format!("model kind {} is not a libtorch model", kind.as_str())));
                }
            }
        };
        let layers = match &model.architecture {
            Architecture::LogisticRegression { .. } => Some(vec![linear("linear", Activation::Identity)]),
            Architecture::Mlp { hidden } => Some(
                (0..hidden.len())
                    .map(|i| linear(&format!("fc{i}"), Activation::Relu))
                    .chain([linear("out", Activation::Identity)])
                    .collect(),
            ),
            Architecture::Cnn { channels, .. } => Some(
                (0..channels.len())
                    .map(|i| DpLayer::Conv { weight: format!("conv{i}.weight"), bias: format!("conv{i}.bias") })
                    .chain([DpLayer::Flatten, linear("out", Activation::Identity)])
                    .collect(),
            ),
            _ => None,
        };
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        if names.is_empty() {
            return Err(Error::InvalidInput("the model has no trainable parameters".into()));
        }
        let mut t = TorchTrainer {
            layers,
            dp_refusal: None,
            vs,
            net,
            names,
            classes,
            features: d,
            input_shape,
            mean: vec![0.0; d],
            std: vec![1.0; d],
            train,
            held_out,
            salt,
            noise_reserve: None,
        };
        // Fail now, with the file's name, if a TorchScript module does not map
        // a batch of rows to `classes` logits (a row of zeros: no row of the
        // data's decides whether the job sets up).
        let probe = t.logits(&vec![0.0; d])?;
        if probe.size() != [1, to_i64(classes)] {
            return Err(Error::InvalidInput(format!(
                "the model maps one {d}-feature row to shape {:?}; expected [1, {classes}] logits",
                probe.size()
            )));
        }
        if let Net::Script(_) = &t.net {
            // Probe rows: synthetic, already standardised, of both signs and
            // several scales (deterministic). None of the data's: whether a
            // party accepts a DP job, and what it trains through, must not
            // depend on its rows, which no accountant covers here.
            let probe: Vec<f32> = (0..128 * d).map(|k| (0.37 * k as f32).sin() * (1 + k % 5) as f32).collect();
            let x = Tensor::from_slice(&probe).f_view(t.input_shape.as_slice()).map_err(torch_err("probe rows"))?;
            let vars: std::collections::BTreeMap<String, Tensor> = t.vs.variables().into_iter().collect();
            // A frozen parameter (saved with requires_grad false) has no
            // gradient for DP-SGD to read: refused before any round is on
            // record, naming it, rather than failing every round after.
            let frozen = vars.iter().find(|(_, v)| !v.requires_grad()).map(|(n, _)| n.clone());
            match frozen.map_or_else(
                || script_layers(&vars, d, classes, &x, &|x| t.net.forward(x)),
                |name| {
                    Err(format!(
                        "its parameter {name} is frozen (requires_grad is false); DP-SGD clips and noises every \
                     parameter, and a frozen one has no gradient"
                    ))
                },
            ) {
                Ok(layers) => t.layers = Some(layers),
                Err(why) => t.dp_refusal = Some(why),
            }
        }
        Ok(t)
    }

    /// The ordinary (non-DP) local epochs of a round: the summed loss and
    /// the rows it was summed over.
    fn epochs(
        &self,
        config: &FitConfig,
        opt: &mut nn::Optimizer,
        anchors: &[(Tensor, Tensor)],
    ) -> Result<(f64, usize), Error> {
        let tc = &config.train;
        let x_all = self.inputs(&self.train.features)?;
        let seed = tc.seed ^ self.salt ^ (u64::from(config.round) << 32);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for _ in 0..tc.local_epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(tc.batch_size) {
                let idx: Vec<i64> = batch.iter().map(|&i| to_i64(i)).collect();
                let xs = x_all.f_index_select(0, &Tensor::from_slice(&idx)).map_err(torch_err("batch"))?;
                let ys = Self::labels(&self.train, batch);
                let logits = self.net.forward(&xs)?;
                let loss = logits.cross_entropy_for_logits(&ys);
                loss_sum += loss.double_value(&[]) * batch.len() as f64;
                seen += batch.len();
                let total = if anchors.is_empty() {
                    loss
                } else {
                    let prox = anchors
                        .iter()
                        .map(|(w, w0)| (w - w0).square().sum(Kind::Float))
                        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, t| acc + t);
                    loss + prox * (tc.proximal_mu / 2.0)
                };
                opt.backward_step(&total);
            }
        }
        Ok((loss_sum, seen))
    }

    /// The round's optimiser over the model's variables.
    fn optimizer(&self, tc: &confide_algorithms::TrainConfig) -> Result<nn::Optimizer, Error> {
        match tc.optimizer {
            OptimizerKind::Adam => nn::Adam { wd: tc.l2, ..Default::default() }.build(&self.vs, tc.learning_rate),
            _ => nn::Sgd { momentum: tc.momentum, dampening: 0.0, wd: tc.l2, nesterov: false }
                .build(&self.vs, tc.learning_rate),
        }
        .map_err(torch_err("optimizer"))
    }

    /// Standardised rows as a batch tensor in the model's input shape.
    fn inputs(&self, rows: &[f32]) -> Result<Tensor, Error> {
        let mut x: Vec<f32> = rows.to_vec();
        for (i, v) in x.iter_mut().enumerate() {
            let j = i % self.features;
            *v = (*v - self.mean[j]) / self.std[j];
        }
        Tensor::from_slice(&x).f_view(self.input_shape.as_slice()).map_err(torch_err("input shape"))
    }

    fn logits(&self, rows: &[f32]) -> Result<Tensor, Error> {
        let x = self.inputs(rows)?;
        self.net.forward(&x)
    }

    fn variable(&self, name: &str) -> Result<Tensor, Error> {
        self.vs.variables().remove(name).ok_or_else(|| Error::Training(format!("variable {name} vanished")))
    }

    /// Names and shapes in wire order, without copying any values.
    fn spec(&self) -> Vec<TensorSpec> {
        let d = self.features;
        let mut spec = vec![
            TensorSpec { name: INPUT_MEAN.into(), shape: vec![d] },
            TensorSpec { name: INPUT_STD.into(), shape: vec![d] },
        ];
        let vars = self.vs.variables();
        for name in &self.names {
            let shape = vars.get(name).map(|t| t.size()).unwrap_or_default();
            spec.push(TensorSpec {
                name: name.clone(),
                shape: shape.into_iter().map(|v| usize::try_from(v).unwrap_or(0)).collect(),
            });
        }
        spec
    }

    fn labels(ds: &Dataset, idx: &[usize]) -> Tensor {
        let y: Vec<i64> = idx.iter().map(|&i| i64::from(ds.labels[i])).collect();
        Tensor::from_slice(&y)
    }

    /// Loss, accuracy and positive-class scores over a data set, without
    /// gradients. The accuracy is the exact count of rows correct over the
    /// rows (a DP evaluation rounds it back to the count, whose sensitivity
    /// is one row; an f32 mean is off by several rows past about 2^24).
    ///
    /// Every model scores one row a call: a row's prediction must not
    /// depend on the other rows, or one row added could change many rows'
    /// counts. A TorchScript module's code may compute over the batch (a
    /// batch norm in training mode, `x.mean(0)`); a built-in model's f32
    /// kernels may round a row's outputs differently with the batch's size,
    /// which a model chosen to put rows at the decision boundary could
    /// turn into flipped predictions.
    fn score(&self, ds: &Dataset) -> Result<(f64, f64, Vec<f64>), Error> {
        if ds.is_empty() {
            return Ok((0.0, 0.0, Vec::new()));
        }
        tch::no_grad(|| {
            let rows = (0..ds.len()).map(|i| self.logits(ds.row(i))).collect::<Result<Vec<_>, _>>()?;
            let logits = Tensor::f_cat(&rows, 0).map_err(torch_err("the rows' logits"))?;
            let idx: Vec<usize> = (0..ds.len()).collect();
            let y = Self::labels(ds, &idx);
            let loss = logits.cross_entropy_for_logits(&y).double_value(&[]);
            let correct = logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
            let acc = correct as f64 / ds.len() as f64;
            let probs = logits.softmax(-1, Kind::Float);
            let last = probs.select(1, to_i64(self.classes) - 1);
            let mut scores = vec![0f32; ds.len()];
            last.f_copy_data(&mut scores, ds.len()).map_err(torch_err("scores"))?;
            Ok((loss, acc, scores.into_iter().map(f64::from).collect()))
        })
    }
}

impl TorchTrainer {
    /// The clipped gradient sum of one DP-SGD step over rows `idx`, in
    /// `names` order and f64, with each row's gradient scaled by
    /// `clip(its L2 norm)`; also each row's norm.
    ///
    /// Per-example gradients from each row's own forward and backward pass
    /// ([`RowPass`]), which keeps each layer's input a and the gradient g at
    /// its output z; then per row: a linear layer's weight gradient is
    /// g ⊗ a, of squared norm ‖g‖²·‖a‖² without forming it (Goodfellow's
    /// trick), and a convolution's is g·unfold(a)ᵀ, formed row by row
    /// ([`ConvRows::row`]).
    #[cfg(test)]
    fn clipped_gradient_sum(&self, idx: &[usize], clip: &dyn Fn(f64) -> f64) -> Result<(Vec<f64>, Vec<f64>), Error> {
        let rows: Vec<f32> = idx.iter().flat_map(|&i| self.train.row(i).iter().copied()).collect();
        let xs = if idx.is_empty() { Tensor::zeros([0], (Kind::Float, Device::Cpu)) } else { self.inputs(&rows)? };
        let ys = Self::labels(&self.train, idx);
        self.clipped_gradient_sum_of(&xs, &ys, idx.len(), clip)
    }

    /// [`TorchTrainer::clipped_gradient_sum`] of `batch` standardised rows
    /// `xs` (in the model's input shape) with labels `ys`.
    fn clipped_gradient_sum_of(
        &self,
        xs: &Tensor,
        ys: &Tensor,
        batch_rows: usize,
        clip: &dyn Fn(f64) -> f64,
    ) -> Result<(Vec<f64>, Vec<f64>), Error> {
        let layers = self.layers.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "this TorchScript module has no per-example gradients Confide can derive: {}",
                self.dp_refusal.as_deref().unwrap_or("no layers")
            ))
        })?;
        let vars = self.vs.variables();
        let var = |n: &str| vars.get(n).ok_or_else(|| Error::Training(format!("tensor {n} vanished")));
        if batch_rows == 0 {
            let total: usize = self.names.iter().map(|n| var(n).map(|v| v.numel())).sum::<Result<_, _>>()?;
            return Ok((vec![0.0; total], Vec::new()));
        }
        // Each row's forward and backward pass in Rust, one row at a time
        // (`RowPass`), not libtorch's batched kernels: those round a row's
        // values differently with the batch's size and the row's place in
        // it, and a row's presence in the sample must not move the other
        // rows' contributions (a coordinator could put their ReLU or
        // max-pool decisions on a rounding edge).
        let pass = RowPass::new(layers, &var, &self.input_shape)?;
        // The rows and their labels, wiped when dropped.
        let x = zeroize::Zeroizing::new(tensor_values(xs)?);
        let y = zeroize::Zeroizing::new(tensor_i64_values(ys)?);
        let mut per_row = pass.run(&x, &y, batch_rows)?;
        // NaN and ±∞ (a hostile model can overflow f32 on chosen rows)
        // become 0 before anything is computed from them, so every row's
        // contribution is finite and its norm is computed from exactly what
        // is summed; no NaN can reach the sum or an error. (Products and
        // sums of finite f32 values cannot overflow f64.)
        for layer in &mut per_row {
            for v in layer.g.iter_mut().chain(layer.a.iter_mut()) {
                if !v.is_finite() {
                    *v = 0.0;
                }
            }
        }
        let rows = batch_rows;
        let mut norm2 = vec![0f64; rows];
        // Per layer: its tensors' names and the per-row factors to sum.
        enum PerRow {
            /// A linear layer: each row's output gradient g (rows × out)
            /// and input a (rows × in), read out once and summed in Rust:
            /// a handful of small libtorch calls per layer cost more than
            /// the arithmetic.
            Outer { g: zeroize::Zeroizing<Vec<f32>>, a: zeroize::Zeroizing<Vec<f32>>, out: usize, inp: usize },
            /// A convolution: each row's output gradient and input, read
            /// out once; each row's weight and bias gradients are formed in
            /// Rust ([`ConvRows`]), once for the norms and once more for the
            /// sum, in a scratch buffer kept in cache.
            /// Each row's weight and bias gradients as the norm pass formed
            /// them (when they fit [`STORED_CONV_GRADIENTS`]), so that the
            /// sum pass scales and adds them instead of forming them again.
            Conv(ConvRows, Option<zeroize::Zeroizing<Vec<f64>>>),
        }
        let mut per_layer: Vec<(&String, &String, PerRow)> = Vec::new();
        for RowGradients { layer, g, a, shape } in per_row {
            match (layer, shape) {
                (DpLayer::Linear { weight, bias, .. }, RowShape::Linear { out, inp }) => {
                    // ‖g ⊗ a‖² + ‖g‖² = ‖g‖²(‖a‖² + 1), f32 values exact in f64.
                    for (i, n2) in norm2.iter_mut().enumerate() {
                        let g2: f64 = g[i * out..(i + 1) * out].iter().map(|&v| f64::from(v).powi(2)).sum();
                        let a2: f64 = a[i * inp..(i + 1) * inp].iter().map(|&v| f64::from(v).powi(2)).sum();
                        *n2 += g2 * (a2 + 1.0);
                    }
                    per_layer.push((weight, bias, PerRow::Outer { g, a, out, inp }));
                }
                (DpLayer::Conv { weight, bias }, RowShape::Conv { out, ch, h, w }) => {
                    // [rows, channels, h, w] in, [rows, out, h, w] out (3×3,
                    // padding 1, stride 1: the same h and w).
                    let bad_shapes = || Error::Training(format!("convolution {weight}: {out} × {ch} × {h} × {w}"));
                    if [out, h, w, ch].contains(&0) {
                        return Err(bad_shapes());
                    }
                    let conv = ConvRows { g, a, out, ch, h, w };
                    if conv.g.len() != rows * conv.out * conv.positions()
                        || conv.a.len() != rows * conv.ch * conv.positions()
                    {
                        return Err(bad_shapes());
                    }
                    let mut scratch = ConvScratch::new(&conv);
                    let per_row = scratch.dw.len() + scratch.db.len();
                    let mut stored = (rows * per_row <= STORED_CONV_GRADIENTS)
                        .then(|| zeroize::Zeroizing::new(Vec::with_capacity(rows * per_row)));
                    for (i, n2) in norm2.iter_mut().enumerate() {
                        *n2 += conv.row(i, &mut scratch);
                        if let Some(stored) = stored.as_mut() {
                            stored.extend_from_slice(&scratch.dw);
                            stored.extend_from_slice(&scratch.db);
                        }
                    }
                    per_layer.push((weight, bias, PerRow::Conv(conv, stored)));
                }
                (layer, _) => {
                    return Err(Error::Training(format!("no per-row gradients for a {layer:?} layer")));
                }
            }
        }
        let norms: Vec<f64> = norm2.iter().map(|n| n.sqrt()).collect();
        let factors: Vec<f64> = norms.iter().map(|&n| clip(n)).collect();
        let mut sums: std::collections::BTreeMap<String, Vec<f64>> = std::collections::BTreeMap::new();
        for (weight_name, bias_name, per_row) in per_layer {
            let (weight, bias) = match per_row {
                PerRow::Outer { g, a, out, inp } => {
                    let (mut w, mut b) = (vec![0f64; out * inp], vec![0f64; out]);
                    for (i, &f) in factors.iter().enumerate() {
                        let (gi, ai) = (&g[i * out..(i + 1) * out], &a[i * inp..(i + 1) * inp]);
                        for (o, &gv) in gi.iter().enumerate() {
                            let fg = f * f64::from(gv);
                            b[o] += fg;
                            for (wv, &av) in w[o * inp..(o + 1) * inp].iter_mut().zip(ai) {
                                *wv += fg * f64::from(av);
                            }
                        }
                    }
                    (w, b)
                }
                PerRow::Conv(conv, stored) => {
                    // Each row's gradient as stored, or formed again by the
                    // same operations in the same order: either way the
                    // same values whose norm was taken.
                    let mut scratch = ConvScratch::new(&conv);
                    let (mut w, mut b) = (vec![0f64; scratch.dw.len()], vec![0f64; scratch.db.len()]);
                    let per_row = w.len() + b.len();
                    for (i, &f) in factors.iter().enumerate() {
                        let (dw, db) = match &stored {
                            Some(stored) => stored[i * per_row..(i + 1) * per_row].split_at(w.len()),
                            None => {
                                conv.row(i, &mut scratch);
                                (&scratch.dw[..], &scratch.db[..])
                            }
                        };
                        w.iter_mut().zip(dw).for_each(|(s, &d)| *s += f * d);
                        b.iter_mut().zip(db).for_each(|(s, &d)| *s += f * d);
                    }
                    // The weight's layout: the padding of each row dropped.
                    let k = conv.kernel_values();
                    let w = w.chunks_exact(scratch.stride).flat_map(|row| row[..k].iter().copied()).collect();
                    (w, b)
                }
            };
            sums.insert(weight_name.clone(), weight);
            sums.insert(bias_name.clone(), bias);
        }
        let mut flat = Vec::new();
        for n in &self.names {
            let t = sums.remove(n).ok_or_else(|| Error::Training(format!("no per-example gradient for {n}")))?;
            flat.extend_from_slice(&t);
        }
        Ok((flat, norms))
    }
}

/// One weighted layer's per-row quantities from [`RowPass::run`]: each
/// row's gradient `g` at the layer's output before its activation, and its
/// input `a`, the batch's rows one after another.
struct RowGradients<'l> {
    layer: &'l DpLayer,
    g: zeroize::Zeroizing<Vec<f32>>,
    a: zeroize::Zeroizing<Vec<f32>>,
    shape: RowShape,
}

/// A weighted layer's sizes per row.
#[derive(Debug, Clone, Copy)]
enum RowShape {
    Linear { out: usize, inp: usize },
    Conv { out: usize, ch: usize, h: usize, w: usize },
}

/// A row's values as a layer sees them: a vector, or an image.
#[derive(Debug, Clone, Copy)]
enum RowValues {
    Flat(usize),
    Image { c: usize, h: usize, w: usize },
}

impl RowValues {
    fn len(self) -> usize {
        match self {
            RowValues::Flat(n) => n,
            RowValues::Image { c, h, w } => c * h * w,
        }
    }
}

/// One step of a [`RowPass`], with its weights in f64 (the model's: public).
enum RowStep<'l> {
    /// `out × stride` weights (each output's `inp` weights padded with
    /// zeros to [`KERNEL_TILE`]s, as the row's input is), then the
    /// activation.
    Linear {
        layer: &'l DpLayer,
        w: Vec<f64>,
        b: Vec<f64>,
        inp: usize,
        out: usize,
        stride: usize,
        activation: Activation,
    },
    /// `out × stride` weights (each output channel's ch·9 kernel values,
    /// padded with zeros to [`KERNEL_TILE`]s, as a row's patches are), over
    /// `ch × h × w` images; then ReLU and 2×2 max-pooling.
    Conv { layer: &'l DpLayer, w: Vec<f64>, b: Vec<f64>, ch: usize, out: usize, h: usize, wd: usize, stride: usize },
    /// A flatten or a view as an image: the same values.
    Reshape,
}

/// DP-SGD's forward and backward pass through the [`DpLayer`] chain, one
/// row at a time, in Rust: each row's activations and gradients are a
/// function of that row and the model alone, bit for bit, whatever rows
/// share its batch and wherever it sits in it (libtorch's batched kernels
/// round a row's values differently with the batch's shape:
/// `a_rows_gradient_is_bit_for_bit_the_same_beside_any_other_rows`).
/// Sums over a layer's inputs are taken in f64 in a fixed order, in lanes
/// of [`KERNEL_TILE`]; activations are kept in f32, as libtorch keeps them.
struct RowPass<'l> {
    steps: Vec<RowStep<'l>>,
    /// Values per input row, and classes.
    input: usize,
    classes: usize,
}

/// `a · b` over whole [`KERNEL_TILE`]s, in lanes: the same order for every
/// row.
#[inline(always)]
fn lane_dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0f64; KERNEL_TILE];
    for (x, y) in a.chunks_exact(KERNEL_TILE).zip(b.chunks_exact(KERNEL_TILE)) {
        for j in 0..KERNEL_TILE {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum()
}

impl<'l> RowPass<'l> {
    fn new<'v>(
        layers: &'l [DpLayer],
        var: &dyn Fn(&str) -> Result<&'v Tensor, Error>,
        input_shape: &[i64],
    ) -> Result<Self, Error> {
        let dims: Vec<usize> = input_shape.iter().skip(1).map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        let mut shape = match dims.as_slice() {
            [n] => RowValues::Flat(*n),
            &[c, h, w] => RowValues::Image { c, h, w },
            _ => return Err(Error::Training(format!("DP-SGD: an input shape of {input_shape:?}"))),
        };
        let input = shape.len();
        let mut steps = Vec::with_capacity(layers.len());
        for layer in layers {
            let bad = |why: String| Error::Training(format!("DP-SGD: layer {layer:?}: {why}"));
            let values = |name: &str| -> Result<Vec<f64>, Error> {
                Ok(tensor_values(var(name)?)?.into_iter().map(f64::from).collect())
            };
            match layer {
                DpLayer::Linear { weight, bias, activation } => {
                    let RowValues::Flat(inp) = shape else {
                        return Err(bad(format!("a linear layer over {shape:?}")));
                    };
                    let (w, b) = (values(weight)?, values(bias)?);
                    let out = b.len();
                    if out == 0 || w.len() != out * inp {
                        return Err(bad(format!("{} weights and {out} biases for {inp} inputs", w.len())));
                    }
                    let stride = inp.next_multiple_of(KERNEL_TILE);
                    let mut padded = vec![0.0; out * stride];
                    for (to, from) in padded.chunks_exact_mut(stride).zip(w.chunks_exact(inp)) {
                        to[..inp].copy_from_slice(from);
                    }
                    steps.push(RowStep::Linear { layer, w: padded, b, inp, out, stride, activation: *activation });
                    shape = RowValues::Flat(out);
                }
                DpLayer::Conv { weight, bias } => {
                    let RowValues::Image { c: ch, h, w: wd } = shape else {
                        return Err(bad(format!("a convolution over {shape:?}")));
                    };
                    let (w, b) = (values(weight)?, values(bias)?);
                    let out = b.len();
                    if out == 0 || w.len() != out * ch * 9 || h < 2 || wd < 2 {
                        return Err(bad(format!("{} weights and {out} biases over {ch} × {h} × {wd}", w.len())));
                    }
                    let stride = (ch * 9).next_multiple_of(KERNEL_TILE);
                    let mut padded = vec![0.0; out * stride];
                    for (to, from) in padded.chunks_exact_mut(stride).zip(w.chunks_exact(ch * 9)) {
                        to[..ch * 9].copy_from_slice(from);
                    }
                    steps.push(RowStep::Conv { layer, w: padded, b, ch, out, h, wd, stride });
                    shape = RowValues::Image { c: out, h: h / 2, w: wd / 2 };
                }
                DpLayer::Flatten => {
                    steps.push(RowStep::Reshape);
                    shape = RowValues::Flat(shape.len());
                }
                DpLayer::Image { shape: [c, h, w] } => {
                    let dim = |v: i64| usize::try_from(v).unwrap_or(0);
                    let (c, h, w) = (dim(*c), dim(*h), dim(*w));
                    // Each row one image: never a view that runs across rows.
                    if shape.len() != c * h * w || c * h * w == 0 {
                        return Err(bad(format!("{} values per row viewed as {c} × {h} × {w}", shape.len())));
                    }
                    steps.push(RowStep::Reshape);
                    shape = RowValues::Image { c, h, w };
                }
            }
        }
        let RowValues::Flat(classes) = shape else {
            return Err(Error::Training(format!("DP-SGD: the last layer gives {shape:?}, not logits")));
        };
        if !steps.iter().any(|s| !matches!(s, RowStep::Reshape)) {
            return Err(Error::Training("DP-SGD: a model without weights".into()));
        }
        Ok(RowPass { steps, input, classes })
    }

    /// Every weighted layer's `g` and `a` for `rows` rows `x` (standardised,
    /// row after row) with labels `y`.
    fn run(&self, x: &[f32], y: &[i64], rows: usize) -> Result<Vec<RowGradients<'l>>, Error> {
        if x.len() != rows * self.input || y.len() != rows {
            return Err(Error::Training(format!(
                "DP-SGD: {} input values and {} labels for {rows} rows of {}",
                x.len(),
                y.len(),
                self.input
            )));
        }
        if y.iter().any(|&l| usize::try_from(l).map_or(true, |l| l >= self.classes)) {
            // (Which label, not said: it is a row's.)
            return Err(Error::Training(format!("DP-SGD: a label outside the model's {} classes", self.classes)));
        }
        let mut out: Vec<RowGradients<'l>> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                RowStep::Linear { layer, inp, out, .. } => Some(RowGradients {
                    layer,
                    g: zeroize::Zeroizing::new(vec![0.0; rows * out]),
                    a: zeroize::Zeroizing::new(vec![0.0; rows * inp]),
                    shape: RowShape::Linear { out: *out, inp: *inp },
                }),
                RowStep::Conv { layer, ch, out, h, wd, .. } => Some(RowGradients {
                    layer,
                    g: zeroize::Zeroizing::new(vec![0.0; rows * out * h * wd]),
                    a: zeroize::Zeroizing::new(vec![0.0; rows * ch * h * wd]),
                    shape: RowShape::Conv { out: *out, ch: *ch, h: *h, w: *wd },
                }),
                RowStep::Reshape => None,
            })
            .collect();
        struct Rows<'a, 'l>(&'a RowPass<'l>, &'a [f32], &'a [i64], &'a mut [RowGradients<'l>]);
        impl pulp::WithSimd for Rows<'_, '_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) {
                let Rows(pass, x, y, out) = self;
                let mut scratch = RowScratch::for_pass(pass);
                let planned = if cfg!(debug_assertions) { scratch.capacities() } else { Vec::new() };
                for (r, (row, &label)) in x.chunks_exact(pass.input.max(1)).zip(y).enumerate() {
                    pass.row(r, row, label as usize, out, &mut scratch);
                }
                debug_assert_eq!(scratch.capacities(), planned, "a row buffer grew: an unwiped copy was freed");
            }
        }
        pulp::Arch::new().dispatch(Rows(self, x, y, &mut out));
        Ok(out)
    }

    /// Row `r`'s pass: its values `x`, its label; writes its `g` and `a`
    /// into each weighted layer's place in `out`.
    #[inline(always)]
    fn row(&self, r: usize, x: &[f32], label: usize, out: &mut [RowGradients<'l>], s: &mut RowScratch) {
        let n = self.steps.len();
        s.acts[0].clear();
        s.acts[0].extend_from_slice(x);
        for (k, step) in self.steps.iter().enumerate() {
            let (before, after) = s.acts.split_at_mut(k + 1);
            let (a, next, z) = (&before[k], &mut after[0], &mut s.zs[k]);
            next.clear();
            z.clear();
            match step {
                RowStep::Linear { w, b, stride, activation, .. } => {
                    s.wide.clear();
                    s.wide.extend(a.iter().map(|&v| f64::from(v)));
                    s.wide.resize(*stride, 0.0);
                    for (wo, bo) in w.chunks_exact(*stride).zip(b) {
                        z.push((bo + lane_dot(wo, &s.wide)) as f32);
                    }
                    next.extend(z.iter().map(|&v| match activation {
                        Activation::Relu => relu(v),
                        Activation::Tanh => v.tanh(),
                        Activation::Identity => v,
                    }));
                }
                RowStep::Conv { w, b, ch, h, wd, stride, .. } => {
                    let (l, (h, wd)) = (h * wd, (*h, *wd));
                    patches_of(a, *ch, h, wd, *stride, &mut s.patches);
                    // z[o,p] = b[o] + W[o]·patch[p], on tiles of 4 channels
                    // sharing each patch tile's loads.
                    z.resize(b.len() * l, 0.0);
                    for (p, patch) in s.patches.chunks_exact(*stride).enumerate() {
                        let mut o = 0;
                        while o < b.len() {
                            let rows = CHANNEL_TILE.min(b.len() - o);
                            let mut acc = [[0.0f64; KERNEL_TILE]; CHANNEL_TILE];
                            for kb in (0..*stride).step_by(KERNEL_TILE) {
                                let u = &patch[kb..kb + KERNEL_TILE];
                                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                                    let wv = &w[(o + r) * stride + kb..(o + r) * stride + kb + KERNEL_TILE];
                                    for j in 0..KERNEL_TILE {
                                        acc[j] += u[j] * wv[j];
                                    }
                                }
                            }
                            for (r, acc) in acc.iter().enumerate().take(rows) {
                                z[(o + r) * l + p] = (b[o + r] + acc.iter().sum::<f64>()) as f32;
                            }
                            o += rows;
                        }
                    }
                    // ReLU, then 2×2 max-pooling (floor): the pooled maps.
                    let (ph, pw) = (h / 2, wd / 2);
                    for plane in z.chunks_exact(l) {
                        for py in 0..ph {
                            for px in 0..pw {
                                let at = pool_argmax(plane, wd, py, px);
                                next.push(relu(plane[at]));
                            }
                        }
                    }
                }
                RowStep::Reshape => next.extend_from_slice(a),
            }
        }
        // The loss's gradient at the logits: softmax − one-hot (the summed
        // cross-entropy's gradient at a row is the row's own).
        let logits = &s.acts[n];
        let top = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        s.grad.clear();
        s.grad.extend(logits.iter().map(|&v| (f64::from(v) - top).exp()));
        let total: f64 = s.grad.iter().sum();
        for (c, g) in s.grad.iter_mut().enumerate() {
            *g = *g / total - f64::from(u8::from(c == label));
        }
        let first = self.steps.iter().position(|s| !matches!(s, RowStep::Reshape)).unwrap_or(0);
        let mut slot = out.len();
        for k in (first..n).rev() {
            let (a, z, act) = (&s.acts[k], &s.zs[k], &s.acts[k + 1]);
            match &self.steps[k] {
                RowStep::Reshape => continue,
                RowStep::Linear { w, inp, out: width, stride, activation, .. } => {
                    // The gradient at z, through the activation.
                    for ((g, &zv), &yv) in s.grad.iter_mut().zip(z.iter()).zip(act.iter()) {
                        *g *= match activation {
                            Activation::Relu => f64::from(u8::from(zv > 0.0)),
                            Activation::Tanh => 1.0 - f64::from(yv) * f64::from(yv),
                            Activation::Identity => 1.0,
                        };
                    }
                    slot -= 1;
                    let o = &mut out[slot];
                    o.g[r * width..(r + 1) * width].iter_mut().zip(s.grad.iter()).for_each(|(t, &g)| *t = g as f32);
                    o.a[r * inp..(r + 1) * inp].copy_from_slice(a);
                    if k > first {
                        // The gradient at the layer's input: Wᵀ·g.
                        s.back.clear();
                        s.back.resize(*inp, 0.0);
                        for (wo, &g) in w.chunks_exact(*stride).zip(s.grad.iter()) {
                            for (b, &wv) in s.back.iter_mut().zip(&wo[..*inp]) {
                                *b += wv * g;
                            }
                        }
                        std::mem::swap(&mut s.grad, &mut s.back);
                    }
                }
                RowStep::Conv { w, ch, out: width, h, wd, stride, .. } => {
                    let (l, (h, wd)) = (h * wd, (*h, *wd));
                    let (ph, pw) = (h / 2, wd / 2);
                    // Each pooled value's gradient to the place it was taken
                    // from, where ReLU passed it.
                    s.back.clear();
                    s.back.resize(width * l, 0.0);
                    for (c, plane) in z.chunks_exact(l).enumerate() {
                        for py in 0..ph {
                            for px in 0..pw {
                                let at = pool_argmax(plane, wd, py, px);
                                if plane[at] > 0.0 {
                                    s.back[c * l + at] = s.grad[(c * ph + py) * pw + px];
                                }
                            }
                        }
                    }
                    std::mem::swap(&mut s.grad, &mut s.back);
                    slot -= 1;
                    let o = &mut out[slot];
                    o.g[r * width * l..(r + 1) * width * l]
                        .iter_mut()
                        .zip(s.grad.iter())
                        .for_each(|(t, &g)| *t = g as f32);
                    o.a[r * ch * l..(r + 1) * ch * l].copy_from_slice(a);
                    if k > first {
                        // The gradient at the layer's input: each position's
                        // patch gradient Σ_o g[o,p]·W[o], added back where
                        // the patch was taken from.
                        s.back.clear();
                        s.back.resize(ch * l, 0.0);
                        s.tile.clear();
                        s.tile.resize(*stride, 0.0);
                        for y in 0..h {
                            for x in 0..wd {
                                let p = y * wd + x;
                                s.tile.iter_mut().for_each(|t| *t = 0.0);
                                for (wo, go) in w.chunks_exact(*stride).zip(s.grad.chunks_exact(l)) {
                                    let g = go[p];
                                    // Pooling passes one place in four, ReLU
                                    // fewer: most are zeros.
                                    if g == 0.0 {
                                        continue;
                                    }
                                    for (t, &wv) in s.tile.iter_mut().zip(wo) {
                                        *t += g * wv;
                                    }
                                }
                                for c in 0..*ch {
                                    for ky in 0..3 {
                                        let yy = (y + ky).wrapping_sub(1);
                                        for kx in 0..3 {
                                            let xx = (x + kx).wrapping_sub(1);
                                            if yy < h && xx < wd {
                                                s.back[c * l + yy * wd + xx] += s.tile[c * 9 + ky * 3 + kx];
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        std::mem::swap(&mut s.grad, &mut s.back);
                    }
                }
            }
        }
    }
}

/// A row's buffers in [`RowPass::row`], reused from row to row and wiped
/// when dropped: they hold the row's values and gradients. Each is made as
/// long as the longest quantity it will hold up front
/// ([`RowScratch::for_pass`]), so none grows by reallocating, which would
/// free an unwiped copy ([`RowPass::run`] checks this in debug builds).
struct RowScratch {
    acts: Vec<zeroize::Zeroizing<Vec<f32>>>,
    zs: Vec<zeroize::Zeroizing<Vec<f32>>>,
    patches: zeroize::Zeroizing<Vec<f64>>,
    wide: zeroize::Zeroizing<Vec<f64>>,
    tile: zeroize::Zeroizing<Vec<f64>>,
    grad: zeroize::Zeroizing<Vec<f64>>,
    back: zeroize::Zeroizing<Vec<f64>>,
}

impl RowScratch {
    /// Buffers for `pass`, each sized for what [`RowPass::row`] puts in it:
    /// `acts[k]` the input of step k (`acts[n]` the logits), `zs[k]` step
    /// k's pre-activations, `wide` a linear layer's padded input, `patches`
    /// and `tile` a convolution's, and `grad` and `back` (swapped as the
    /// gradient goes back) any gradient along the way.
    fn for_pass(pass: &RowPass<'_>) -> Self {
        let (mut act, mut acts, mut zs) = (pass.input, vec![pass.input], Vec::new());
        let (mut patches, mut wide, mut tile, mut grad) = (0, 0, 0, pass.classes);
        for step in &pass.steps {
            let z = match step {
                RowStep::Linear { inp, out, stride, .. } => {
                    wide = wide.max(*stride);
                    grad = grad.max(*inp).max(*out);
                    act = *out;
                    *out
                }
                RowStep::Conv { ch, out, h, wd, stride, .. } => {
                    let l = h * wd;
                    patches = patches.max(l * stride);
                    tile = tile.max(*stride);
                    grad = grad.max(out * l).max(ch * l);
                    act = out * (h / 2) * (wd / 2);
                    out * l
                }
                RowStep::Reshape => 0,
            };
            zs.push(z);
            acts.push(act);
        }
        let f32s = |n: usize| zeroize::Zeroizing::new(Vec::with_capacity(n));
        let f64s = |n: usize| zeroize::Zeroizing::new(Vec::with_capacity(n));
        RowScratch {
            acts: acts.into_iter().map(f32s).collect(),
            zs: zs.into_iter().map(f32s).collect(),
            patches: f64s(patches),
            wide: f64s(wide),
            tile: f64s(tile),
            grad: f64s(grad),
            back: f64s(grad),
        }
    }

    /// Every buffer's capacity, to check that none grew.
    fn capacities(&self) -> Vec<usize> {
        let f64s = [&self.patches, &self.wide, &self.tile, &self.grad, &self.back].map(|v| v.capacity());
        self.acts.iter().chain(&self.zs).map(|v| v.capacity()).chain(f64s).collect()
    }
}

/// libtorch's ReLU on a value (NaN stays NaN).
#[inline(always)]
fn relu(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// The place in `plane` (`w` wide) of the largest ReLU'd value of pooling
/// window (py, px): the first in scan order among equals, as libtorch's
/// max-pooling takes it.
#[inline(always)]
fn pool_argmax(plane: &[f32], w: usize, py: usize, px: usize) -> usize {
    let mut best = (2 * py) * w + 2 * px;
    for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
        let at = (2 * py + dy) * w + 2 * px + dx;
        if relu(plane[at]) > relu(plane[best]) || (relu(plane[at]).is_nan() && !relu(plane[best]).is_nan()) {
            best = at;
        }
    }
    best
}

/// A row's patches (im2col, transposed): `patches[(y,x)][(c,ky,kx)] =
/// a[c][y+ky−1][x+kx−1]`, or 0 outside the image, each position's padded to
/// `stride` values with zeros.
#[inline(always)]
fn patches_of(a: &[f32], ch: usize, h: usize, w: usize, stride: usize, patches: &mut Vec<f64>) {
    let l = h * w;
    patches.clear();
    patches.resize(l * stride, 0.0);
    for y in 0..h {
        for x in 0..w {
            let patch = &mut patches[(y * w + x) * stride..(y * w + x) * stride + ch * 9];
            for (c, plane) in a.chunks_exact(l).take(ch).enumerate() {
                for ky in 0..3 {
                    let yy = (y + ky).wrapping_sub(1);
                    for kx in 0..3 {
                        let xx = (x + kx).wrapping_sub(1);
                        patch[c * 9 + ky * 3 + kx] = if yy < h && xx < w { f64::from(plane[yy * w + xx]) } else { 0.0 };
                    }
                }
            }
        }
    }
}

fn tensor_i64_values(t: &Tensor) -> Result<Vec<i64>, Error> {
    let t = t.f_to_kind(Kind::Int64).map_err(torch_err("dtype"))?.f_contiguous().map_err(torch_err("layout"))?;
    let n = t.numel();
    let mut out = vec![0i64; n];
    t.f_copy_data(&mut out, n).map_err(torch_err("read tensor"))?;
    Ok(out)
}

/// A convolution layer's per-row quantities for DP-SGD (3×3 kernel,
/// padding 1, stride 1): each row's gradient at the layer's output `g`
/// (rows × out × h·w) and its input `a` (rows × ch × h·w), from
/// [`RowPass`] (non-finite values zeroed, wiped when dropped).
struct ConvRows {
    g: zeroize::Zeroizing<Vec<f32>>,
    a: zeroize::Zeroizing<Vec<f32>>,
    out: usize,
    ch: usize,
    h: usize,
    w: usize,
}

/// One row's patches and gradients, reused from row to row and wiped when
/// dropped: they are per-example gradients. The patches take h·w·ch·9
/// values per row (36 KiB for the digits CNN's second layer, in cache;
/// larger images take more, still one row's worth rather than the whole
/// batch's unfolded input that libtorch's unfold made).
/// Rows of `patches` and `dw` are [`ConvScratch::stride`] values long, the
/// kernel's ch·9 values padded with zeros to a multiple of [`KERNEL_TILE`],
/// so the product below runs on whole tiles.
struct ConvScratch {
    stride: usize,
    /// The row's input patches, h·w × stride (im2col, transposed).
    patches: zeroize::Zeroizing<Vec<f64>>,
    /// The row's weight gradient, out × stride.
    dw: zeroize::Zeroizing<Vec<f64>>,
    /// The row's bias gradient, out.
    db: zeroize::Zeroizing<Vec<f64>>,
}

/// Most values of a convolution's per-row gradients kept from the norm pass
/// for the sum pass (4 MiB of f64): a batch's worth for the models DP-SGD
/// is used with here, in the L2 cache or near it; larger layers or batches
/// form each row's gradient again instead.
const STORED_CONV_GRADIENTS: usize = 1 << 19;

/// Kernel values per tile of the per-row product (one AVX-512 register of
/// f64, two AVX2 ones).
const KERNEL_TILE: usize = 8;

/// Output channels per tile of the per-row product.
const CHANNEL_TILE: usize = 4;

impl ConvScratch {
    fn new(c: &ConvRows) -> Self {
        let stride = c.kernel_values().next_multiple_of(KERNEL_TILE);
        ConvScratch {
            stride,
            // The padding stays zero: rows are written up to ch·9 only.
            patches: zeroize::Zeroizing::new(vec![0.0; c.positions() * stride]),
            dw: zeroize::Zeroizing::new(vec![0.0; c.out * stride]),
            db: zeroize::Zeroizing::new(vec![0.0; c.out]),
        }
    }
}

impl ConvRows {
    /// Output (and input) positions per channel.
    fn positions(&self) -> usize {
        self.h * self.w
    }

    /// Weights per output channel: ch·3·3.
    fn kernel_values(&self) -> usize {
        self.ch * 9
    }

    /// Row `i`'s weight gradient dW[o][c,ky,kx] = Σ_{y,x} g[o,y,x]·a[c,y+ky−1,x+kx−1]
    /// (zero outside the image) and bias gradient Σ_{y,x} g[o,y,x] into
    /// `s`, in f64 from the f32 values (each product exact); returns their
    /// squared norm. The same row gives the same bits every time.
    ///
    /// Formed here rather than by libtorch ops (unfold, a batched product,
    /// f64 copies, squares, sums): a dozen small ops per layer and several
    /// megabytes of fresh tensors per step cost more than the arithmetic.
    /// The product dW = G·P (G the row's out × h·w output gradient, P its
    /// h·w × ch·9 patches) runs on tiles of 4 channels × 8 kernel values
    /// held in registers, compiled for AVX2/AVX-512 (detected at run time
    /// by `pulp`).
    fn row(&self, i: usize, s: &mut ConvScratch) -> f64 {
        struct Row<'a>(&'a ConvRows, usize, &'a mut ConvScratch);
        impl pulp::WithSimd for Row<'_> {
            type Output = f64;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
                self.0.row_inline(self.1, self.2)
            }
        }
        pulp::Arch::new().dispatch(Row(self, i, s))
    }

    #[inline(always)]
    fn row_inline(&self, i: usize, s: &mut ConvScratch) -> f64 {
        let (l, k, stride, (h, w)) = (self.positions(), self.kernel_values(), s.stride, (self.h, self.w));
        let a = &self.a[i * self.ch * l..(i + 1) * self.ch * l];
        let g = &self.g[i * self.out * l..(i + 1) * self.out * l];
        // patches[(y,x)][(c,ky,kx)] = a[c][y+ky−1][x+kx−1], or 0 outside.
        for y in 0..h {
            for x in 0..w {
                let patch = &mut s.patches[(y * w + x) * stride..(y * w + x) * stride + k];
                for (c, plane) in a.chunks_exact(l).enumerate() {
                    for ky in 0..3 {
                        let yy = (y + ky).wrapping_sub(1);
                        for kx in 0..3 {
                            let xx = (x + kx).wrapping_sub(1);
                            patch[c * 9 + ky * 3 + kx] =
                                if yy < h && xx < w { f64::from(plane[yy * w + xx]) } else { 0.0 };
                        }
                    }
                }
            }
        }
        let patches = &s.patches[..];
        let mut o = 0;
        while o < self.out {
            let rows = CHANNEL_TILE.min(self.out - o);
            for kb in (0..stride).step_by(KERNEL_TILE) {
                let mut acc = [[0.0f64; KERNEL_TILE]; CHANNEL_TILE];
                for p in 0..l {
                    let mut u = [0.0f64; KERNEL_TILE];
                    u.copy_from_slice(&patches[p * stride + kb..p * stride + kb + KERNEL_TILE]);
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let gv = f64::from(g[(o + r) * l + p]);
                        for j in 0..KERNEL_TILE {
                            acc[j] += gv * u[j];
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    s.dw[(o + r) * stride + kb..(o + r) * stride + kb + KERNEL_TILE].copy_from_slice(acc);
                }
            }
            o += rows;
        }
        let mut lanes = [0.0f64; KERNEL_TILE];
        for tile in s.dw.chunks_exact(KERNEL_TILE) {
            for j in 0..KERNEL_TILE {
                lanes[j] += tile[j] * tile[j];
            }
        }
        for (db, go) in s.db.iter_mut().zip(g.chunks_exact(l)) {
            *db = go.iter().map(|&v| f64::from(v)).sum();
        }
        lanes.iter().sum::<f64>() + s.db.iter().map(|d| d * d).sum::<f64>()
    }
}

fn tensor_values(t: &Tensor) -> Result<Vec<f32>, Error> {
    let t = t.f_to_kind(Kind::Float).map_err(torch_err("dtype"))?.f_contiguous().map_err(torch_err("layout"))?;
    let n = t.numel();
    let mut out = vec![0f32; n];
    t.f_copy_data(&mut out, n).map_err(torch_err("read tensor"))?;
    Ok(out)
}

impl Trainer for TorchTrainer {
    fn parameters(&self) -> Result<Parameters, Error> {
        let vars = self.vs.variables();
        let tensors = self
            .spec()
            .into_iter()
            .map(|s| {
                let data = match s.name.as_str() {
                    INPUT_MEAN => self.mean.clone(),
                    INPUT_STD => self.std.clone(),
                    name => {
                        let t = vars.get(name).ok_or_else(|| Error::Training(format!("tensor {name} vanished")))?;
                        tensor_values(t)?
                    }
                };
                Ok(NamedTensor { name: s.name, shape: s.shape, data })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Parameters::new(tensors)
    }

    fn set_parameters(&mut self, params: &Parameters) -> Result<(), Error> {
        params.check_matches(&self.spec()).map_err(Error::InvalidInput)?;
        if let Some(s) = params.get(INPUT_STD).and_then(|t| t.data.iter().find(|v| v.is_nan() || **v <= 0.0)) {
            return Err(Error::InvalidInput(format!("{INPUT_STD} holds {s}; it must be positive")));
        }
        let mut vars = self.vs.variables();
        tch::no_grad(|| -> Result<(), Error> {
            for t in params.tensors() {
                match t.name.as_str() {
                    INPUT_MEAN => self.mean.copy_from_slice(&t.data),
                    INPUT_STD => self.std.copy_from_slice(&t.data),
                    name => {
                        let var = vars.get_mut(name).ok_or_else(|| Error::InvalidInput(format!("no tensor {name}")))?;
                        let src = Tensor::from_slice(&t.data).f_view(var.size().as_slice()).map_err(torch_err(name))?;
                        var.f_copy_(&src).map_err(torch_err(name))?;
                    }
                }
            }
            Ok(())
        })
    }

    fn feature_stats(&self) -> FeatureStats {
        self.train.feature_stats()
    }

    fn fit(&mut self, config: &FitConfig) -> Result<FitOutcome, Error> {
        let tc = &config.train;
        let mut opt = self.optimizer(tc)?;
        // FedProx anchors: detached copies of the parameters this round starts from.
        let anchors: Vec<(Tensor, Tensor)> = if tc.proximal_mu > 0.0 {
            self.names
                .iter()
                .map(|n| self.variable(n).map(|v| (v.shallow_clone(), v.detach().copy())))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        // Training mode for the epochs only, and back to eval mode however
        // they end: a module left in training mode would score later rows
        // with its batch's statistics (batch norm) or at random (dropout).
        if let Net::Script(m) = &mut self.net {
            m.set_train();
        }
        let trained = self.epochs(config, &mut opt, &anchors);
        if let Net::Script(m) = &mut self.net {
            m.set_eval();
        }
        let (loss_sum, seen) = trained?;
        let train_loss = loss_sum / seen.max(1) as f64;
        if !train_loss.is_finite() {
            return Err(Error::Training(format!("the training loss diverged ({train_loss}); lower the learning rate")));
        }
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), train_loss);
        Ok(FitOutcome { num_examples: self.train.len() as u64, metrics })
    }

    fn supports_dp_sgd(&self) -> bool {
        self.layers.is_some()
    }

    fn dp_sgd_support(&self) -> Result<(), String> {
        match (&self.layers, &self.dp_refusal) {
            (Some(_), _) => Ok(()),
            (None, Some(why)) => Err(format!("a TorchScript module needs per-example gradients, but {why}")),
            (None, None) => Err("it cannot compute per-example gradients".into()),
        }
    }

    fn fit_private(&mut self, config: &FitConfig, plan: &DpSgdPlan) -> Result<FitOutcome, Error> {
        let tc = &config.train;
        let vars = self.vs.variables();
        let sizes: Vec<Vec<i64>> =
            self.names.iter().map(|n| vars.get(n).map(|v| v.size()).unwrap_or_default()).collect();
        let dim: usize = sizes.iter().map(|s| s.iter().product::<i64>().max(0) as usize).sum();
        let mut dp = plan.mechanism(dim, self.noise_reserve.take())?;
        let mut opt = self.optimizer(tc)?;
        let params: Vec<(Tensor, Tensor)> = self
            .names
            .iter()
            .map(|n| self.variable(n).map(|v| (v.shallow_clone(), v.detach().copy())))
            .collect::<Result<_, _>>()?;
        // Gradients are set, not computed, each step: give every variable a
        // gradient tensor once (a backward pass of Σ 0·w).
        let zero = params
            .iter()
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, (w, _)| acc + (w * 0.0).sum(Kind::Float));
        zero.backward();
        let x_all = self.inputs(&self.train.features)?;
        for _ in 0..plan.steps_per_round {
            let sample = dp.poisson_sample(self.train.len()).map_err(|e| Error::InvalidInput(format!("dp: {e}")))?;
            let mut total = CompensatedSum::new(dim);
            for chunk in sample.chunks(CHUNK_ROWS) {
                let idx: Vec<i64> = chunk.iter().map(|&i| to_i64(i)).collect();
                let xs = x_all.f_index_select(0, &Tensor::from_slice(&idx)).map_err(torch_err("batch"))?;
                let ys = Self::labels(&self.train, chunk);
                let (part, _) = self.clipped_gradient_sum_of(&xs, &ys, chunk.len(), &|n| dp.clip_factor(n))?;
                total.add(&part);
            }
            let mut sum = total.finish();
            dp.privatize(&mut sum).map_err(|e| Error::InvalidInput(format!("dp: {e}")))?;
            // The noisy gradient (plus the proximal term's) becomes each
            // variable's gradient; the optimiser's update, momentum, Adam
            // moments and weight decay are post-processing.
            let noisy = Tensor::from_slice(&sum).to_kind(Kind::Float);
            let mut at = 0i64;
            tch::no_grad(|| -> Result<(), Error> {
                for ((w, w0), size) in params.iter().zip(&sizes) {
                    let len = size.iter().product::<i64>().max(0);
                    let g = noisy.narrow(0, at, len).view(size.as_slice());
                    at += len;
                    let mut grad = w.grad();
                    grad.f_copy_(&g).map_err(torch_err("gradient"))?;
                    if tc.proximal_mu > 0.0 {
                        let _ = grad.f_add_(&((w - w0) * tc.proximal_mu)).map_err(torch_err("proximal term"))?;
                    }
                }
                Ok(())
            })?;
            opt.step();
        }
        self.noise_reserve = plan.reserve_after(config.round, dp);
        for (w, _) in &params {
            let finite = w.isfinite().all().int64_value(&[]) != 0;
            if !finite {
                return Err(Error::Training(
                    "DP-SGD diverged (NaN or infinite weights); lower the learning rate".into(),
                ));
            }
        }
        Ok(FitOutcome { num_examples: self.train.len() as u64, metrics: Metrics::new() })
    }

    fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
        let ds = if self.held_out.is_empty() { &self.train } else { &self.held_out };
        let (loss, accuracy, scores) = self.score(ds)?;
        Ok(classification_outcome(self.classes, &ds.labels, loss, accuracy, &scores))
    }

    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, Error> {
        row_count(features, self.features)?;
        if features.is_empty() {
            return Ok(Vec::new());
        }
        tch::no_grad(|| tensor_values(&self.logits(features)?.softmax(-1, Kind::Float)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::TrainConfig;
    use confide_algorithms::data::CsvOptions;
    use confide_algorithms::trainer::apply_feature_stats;

    /// A round may train on a thread of its own (secure aggregation trains
    /// while the keys are exchanged): a thread started after the count was
    /// set takes the process's count, not libtorch's default of one a core.
    #[test]
    fn a_new_thread_trains_with_the_processs_thread_count() {
        set_threads(1);
        let n = *THREADS.get().unwrap();
        let on_new_thread = std::thread::spawn(tch::get_num_threads).join().unwrap();
        assert_eq!(on_new_thread, i32::try_from(n).unwrap());
    }

    fn data(file: &str) -> Dataset {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data").join(file);
        Dataset::load_csv(&path, &CsvOptions { header: file.ends_with("breast_cancer.csv"), label_column: -1 }).unwrap()
    }

    fn standardised(model: &ModelConfig, train: Dataset, test: Dataset, script: Option<&Path>) -> TorchTrainer {
        let mut t = TorchTrainer::new(model, script, train.clone(), test, 7, 1).unwrap();
        let mut p = t.parameters().unwrap();
        apply_feature_stats(&mut p, &train.feature_stats()).unwrap();
        t.set_parameters(&p).unwrap();
        t
    }

    fn fit(t: &mut TorchTrainer, round: u32, train: TrainConfig) -> FitOutcome {
        t.fit(&FitConfig { round, train }).unwrap()
    }

    #[test]
    fn parameters_round_trip_exactly_for_every_builtin_model() {
        let bc = data("breast_cancer.csv");
        let digits = data("digits.csv.gz");
        let cases = [
            (
                ModelConfig::new(2, Architecture::LogisticRegression { engine: confide_algorithms::Engine::Torch }),
                bc.clone(),
            ),
            (ModelConfig::mlp(2, vec![8, 4]), bc),
            (ModelConfig::cnn(10, vec![4], [1, 8, 8]), digits),
        ];
        for (model, ds) in cases {
            let mut t = TorchTrainer::new(&model, None, ds, Dataset::default(), 3, 0).unwrap();
            let before = t.parameters().unwrap();
            assert_eq!(
                &before.spec()[..2].iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                &[INPUT_MEAN, INPUT_STD]
            );
            // Arbitrary bit patterns survive: every value is distinct and not a round number.
            let flat: Vec<f32> = (0..before.num_values()).map(|i| 0.5 + (i as f32) * 1.000_123e-3).collect();
            let p = Parameters::from_flat(&before.spec(), &flat).unwrap();
            t.set_parameters(&p).unwrap();
            assert_eq!(t.parameters().unwrap(), p, "{:?}", model.kind());
            // Names and shapes are checked.
            let mut wrong = p.spec();
            wrong[2].shape.push(1);
            assert!(t.set_parameters(&Parameters::from_flat(&wrong, &flat).unwrap()).is_err());
        }
    }

    #[test]
    fn one_sgd_step_lowers_the_loss_by_lr_times_the_squared_gradient() {
        let ds = data("breast_cancer.csv");
        let model = ModelConfig::mlp(2, vec![8]);
        let mut t = standardised(&model, ds.clone(), ds.clone(), None);
        // ‖∇L‖² at the start, from autograd over the full batch.
        let x = t.inputs(&ds.features).unwrap();
        let idx: Vec<usize> = (0..ds.len()).collect();
        let loss = t.net.forward(&x).unwrap().cross_entropy_for_logits(&TorchTrainer::labels(&ds, &idx));
        let vars: Vec<Tensor> = t.names.iter().map(|n| t.variable(n).unwrap()).collect();
        let grads = Tensor::run_backward(&[&loss], &vars, false, false);
        let g2: f64 = grads.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum();
        let before = t.evaluate().unwrap().loss;
        let lr = 1e-3;
        let train = TrainConfig { batch_size: ds.len(), learning_rate: lr, ..TrainConfig::default() };
        fit(&mut t, 1, train);
        let after = t.evaluate().unwrap().loss;
        let (drop, predicted) = (before - after, lr * g2);
        assert!(drop > 0.0, "loss went from {before} to {after}");
        assert!((drop - predicted).abs() < 0.05 * predicted, "loss fell by {drop}; first order predicts {predicted}");
    }

    #[test]
    fn proximal_term_changes_the_second_step_as_the_formula_says() {
        // Two identical rows, batch 1 (see the pure-Rust trainer's test): the
        // second SGD step differs by exactly −lr·μ·(w₁ − w₀).
        let row: Vec<f32> = data("breast_cancer.csv").row(0).to_vec();
        let (lr, mu) = (0.1, 0.5);
        let model = ModelConfig::mlp(2, vec![4]);
        let run = |rows: usize, mu: f64| {
            let ds = Dataset { features: row.repeat(rows), labels: vec![1; rows], num_features: row.len() };
            let mut t = TorchTrainer::new(&model, None, ds, Dataset::default(), 5, 0).unwrap();
            let start = t.parameters().unwrap();
            fit(&mut t, 1, TrainConfig { batch_size: 1, learning_rate: lr, proximal_mu: mu, ..TrainConfig::default() });
            (start.flat_values().collect::<Vec<f32>>(), t.parameters().unwrap().flat_values().collect::<Vec<f32>>())
        };
        let (w0, w1) = run(1, mu);
        let (_, plain) = run(2, 0.0);
        let (_, prox) = run(2, mu);
        assert_ne!(plain, prox);
        for i in 0..w0.len() {
            let expected = -lr * mu * f64::from(w1[i] - w0[i]);
            let got = f64::from(prox[i] - plain[i]);
            // f32 parameters: compare relative to the magnitudes involved.
            let tol = 4.0 * f64::from(f32::EPSILON) * (1.0 + f64::from(plain[i].abs().max(prox[i].abs())));
            assert!((got - expected).abs() < tol, "value {i}: {got} vs {expected}");
        }
    }

    #[test]
    fn training_is_deterministic_with_a_seed_and_learns_breast_cancer() {
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let model = ModelConfig::mlp(2, vec![64, 32]);
        let cfg = TrainConfig {
            local_epochs: 5,
            learning_rate: 0.01,
            optimizer: OptimizerKind::Adam,
            ..TrainConfig::default()
        };
        let run = || {
            let mut t = standardised(&model, train.clone(), test.clone(), None);
            fit(&mut t, 1, cfg.clone());
            (t.parameters().unwrap(), t.evaluate().unwrap())
        };
        let (p1, e1) = run();
        let (p2, _) = run();
        assert_eq!(p1, p2);
        assert!(e1.metrics["accuracy"] > 0.94, "{e1:?}");
        assert!(e1.metrics["auc"] > 0.98, "{e1:?}");
    }

    /// One row's gradient through the ordinary (nn::Sequential) forward
    /// and a backward pass of its own, flattened in `names` order.
    fn one_at_a_time(t: &TorchTrainer, i: usize) -> Vec<f64> {
        let x = t.inputs(t.train.row(i)).unwrap();
        let y = TorchTrainer::labels(&t.train, &[i]);
        let loss = t.net.forward(&x).unwrap().cross_entropy_for_logits(&y);
        let vars: Vec<Tensor> = t.names.iter().map(|n| t.variable(n).unwrap()).collect();
        let grads = Tensor::run_backward(&[&loss], &vars, false, false);
        grads.iter().flat_map(|g| tensor_values(g).unwrap().into_iter().map(f64::from)).collect()
    }

    /// The models DP-SGD trains, with their data and TorchScript files: the
    /// libtorch logistic regression, an MLP of `hidden` widths, a CNN of
    /// each of `channels` on the 8×8 digits, one 3-and-5-channel CNN on
    /// each of the `images` shapes, and the two example TorchScript modules
    /// (the breast-cancer tanh MLP, the digits CNN of
    /// `examples/models/make_digits_cnn.py`).
    fn dp_sgd_models(
        hidden: &[usize],
        channels: &[&[usize]],
        images: &[[usize; 3]],
    ) -> Vec<(ModelConfig, Dataset, Option<std::path::PathBuf>)> {
        let (bc, digits) = (data("breast_cancer.csv"), data("digits.csv.gz"));
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
        let torch = confide_algorithms::Engine::Torch;
        let mut cases = vec![
            (ModelConfig::new(2, Architecture::LogisticRegression { engine: torch }), bc.clone(), None),
            (ModelConfig::mlp(2, hidden.to_vec()), bc.clone(), None),
        ];
        for c in channels {
            cases.push((ModelConfig::cnn(10, c.to_vec(), [1, 8, 8]), digits.clone(), None));
        }
        for &image in images {
            cases.push((ModelConfig::cnn(10, vec![3, 5], image), digits.clone(), None));
        }
        let script = |file: &str| Architecture::Torchscript { file: file.into() };
        cases.push((ModelConfig::new(2, script("bc")), bc, Some(models.join("breast_cancer_mlp.pt"))));
        cases.push((ModelConfig::new(10, script("cnn")), digits, Some(models.join("digits_cnn.pt"))));
        cases
    }

    /// DP-SGD's per-example gradients (linear layers by the outer
    /// product trick, convolutions formed row by row in tiles) equal
    /// one backward pass per row, in norm and in the clipped sum, for the
    /// logistic regression, the MLP, the CNN and two TorchScript modules (a
    /// tanh MLP and the digits CNN: their one-at-a-time gradients come from
    /// the module's own forward, so the reconstruction DP-SGD trains
    /// through is checked against the module's code).
    #[test]
    fn per_example_gradients_equal_one_at_a_time_gradients() {
        let cases = dp_sgd_models(
            &[16, 8],
            &[
                &[4, 8],
                // Channel counts that leave partial tiles (3 and 5
                // channels), a non-square image, and several input channels.
                &[3, 5],
            ],
            &[[1, 4, 16], [4, 4, 4]],
        );
        for (model, ds, script) in cases {
            let t = standardised(&model, ds, Dataset::default(), script.as_deref());
            assert!(t.supports_dp_sgd());
            let idx = [3usize, 17, 40, 41, 99];
            let grads: Vec<Vec<f64>> = idx.iter().map(|&i| one_at_a_time(&t, i)).collect();
            let norm_of = |g: &[f64]| g.iter().map(|v| v * v).sum::<f64>().sqrt();
            // The clip in the wider of the gaps after the second and third
            // smallest norms, so that it binds for at least two rows and not
            // for at least two others, none of them within 1% of it (a sum
            // that ignored the clip, or clipped every row, would be caught).
            let mut sorted: Vec<f64> = grads.iter().map(|g| norm_of(g)).collect();
            sorted.sort_by(f64::total_cmp);
            let k = if sorted[2] / sorted[1] >= sorted[3] / sorted[2] { 1 } else { 2 };
            let bound = (sorted[k] * sorted[k + 1]).sqrt();
            assert!(sorted.iter().all(|n| (n / bound - 1.0).abs() > 0.01), "{:?}: {sorted:?}", model.kind());
            let clip = |n: f64| if n > bound { bound / n } else { 1.0 };
            let (sum, norms) = t.clipped_gradient_sum(&idx, &clip).unwrap();
            let mut expected = vec![0.0; sum.len()];
            for (k, (&i, g)) in idx.iter().zip(&grads).enumerate() {
                let norm = norm_of(g);
                // The reference is libtorch's f32 backward: a row the model
                // is sure of has a gradient at the logits of 1 − p, which
                // f32 holds only to about 10⁻⁷ (the row pass takes it in
                // f64), so small norms are compared to 10⁻⁶.
                assert!(
                    (norm - norms[k]).abs() <= 1e-4 * norm.max(1e-2),
                    "{:?} row {i}: {norm} vs {}",
                    model.kind(),
                    norms[k]
                );
                for (e, v) in expected.iter_mut().zip(g.iter()) {
                    *e += clip(norm) * v;
                }
            }
            let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (j, (a, b)) in sum.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{:?} value {j}: {a} vs {b}", model.kind());
            }
            let (empty, none) = t.clipped_gradient_sum(&[], &clip).unwrap();
            assert!(empty.len() == sum.len() && empty.iter().all(|v| *v == 0.0) && none.is_empty());
        }
    }

    /// The sensitivity argument of DP-SGD needs each row's clipped gradient
    /// to be a function of that row alone: were a row's pre-activations to
    /// round differently beside other rows (another kernel for another
    /// batch shape), a coordinator could choose weights that put many rows'
    /// ReLU or max-pool decisions on a rounding edge, and a row's presence
    /// would then move the others' contributions. For every model DP-SGD
    /// trains, each row's norm and clipped contribution, taken alone, are
    /// bit for bit what they are at any place in batches of 2 to 300 rows
    /// (the other rows' factors set to 0, so the sum is that row's alone).
    #[test]
    fn a_rows_gradient_is_bit_for_bit_the_same_beside_any_other_rows() {
        for (model, ds, script) in dp_sgd_models(&[32, 16], &[&[16, 32]], &[]) {
            let t = standardised(&model, ds, Dataset::default(), script.as_deref());
            let rows = t.train.len();
            for target in [0usize, 17, rows - 1] {
                let alone = t.clipped_gradient_sum(&[target], &|_| 1.0).unwrap();
                // The norm the clip is given is the norm of the gradient the
                // sum takes (to f64 rounding: the clip's slack is 2·10⁻⁵ of
                // it), and a clipped contribution is within the bound.
                let what = format!("{:?}, row {target}", model.kind());
                let own = alone.0.iter().map(|v| v * v).sum::<f64>().sqrt();
                assert!((own - alone.1[0]).abs() <= 1e-9 * own.max(1e-30), "{what}: {own} vs {}", alone.1[0]);
                let bound = alone.1[0] / 2.0;
                let clip = |n: f64| if n > bound { bound / n } else { 1.0 };
                let clipped = t.clipped_gradient_sum(&[target], &clip).unwrap().0;
                let norm = clipped.iter().map(|v| v * v).sum::<f64>().sqrt();
                assert!(norm <= bound * (1.0 + 1e-9) && norm >= bound * (1.0 - 1e-9), "{what}: {norm} vs {bound}");
                for (size, at) in [(2usize, 0usize), (2, 1), (7, 3), (16, 15), (33, 8), (64, 0), (300, 151)] {
                    // Other rows around the target, from a stride that
                    // differs per batch so the neighbours differ too.
                    let mut batch: Vec<usize> = (1..size).map(|k| (target + k * (size + 5)) % rows).collect();
                    batch.insert(at, target);
                    let seen = std::cell::Cell::new(0usize);
                    let only_target = |_: f64| {
                        let k = seen.get();
                        seen.set(k + 1);
                        if k == at { 1.0 } else { 0.0 }
                    };
                    let (sum, norms) = t.clipped_gradient_sum(&batch, &only_target).unwrap();
                    let what = format!("{:?}, row {target} at {at} of {size}", model.kind());
                    assert_eq!(norms[at].to_bits(), alone.1[0].to_bits(), "{what}: norm");
                    assert_eq!(sum.len(), alone.0.len());
                    for (j, (a, b)) in sum.iter().zip(&alone.0).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{what}: value {j}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// A TorchScript module with a frozen parameter, or with every one
    /// frozen, is refused for DP-SGD naming the parameter (it has no
    /// gradient: each round would fail after being charged, and a module
    /// with none trainable made libtorch's backward panic).
    #[test]
    fn a_torchscript_module_with_a_frozen_parameter_is_refused_for_dp_sgd() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/breast_cancer_mlp.pt");
        let dir = tempfile::tempdir().unwrap();
        for freeze_all in [false, true] {
            let m = tch::CModule::load(&script).unwrap();
            let mut frozen = Vec::new();
            for (name, p) in m.named_parameters().unwrap() {
                if freeze_all || name == "hidden.bias" {
                    let _ = p.set_requires_grad(false);
                    frozen.push(name.replace('.', "_"));
                }
            }
            let path = dir.path().join(format!("frozen-{freeze_all}.pt"));
            m.save(&path).unwrap();
            let model = ModelConfig::new(2, Architecture::Torchscript { file: "frozen".into() });
            let t = standardised(&model, data("breast_cancer.csv"), Dataset::default(), Some(path.as_path()));
            let why = t.dp_sgd_support().unwrap_err();
            assert!(why.contains("frozen") && frozen.iter().any(|n| why.contains(n.as_str())), "{freeze_all}: {why}");
            assert!(!t.supports_dp_sgd());
        }
    }

    /// DP-SGD at z = 1 and q = 0.05 for `steps` steps over `rows` rows, with
    /// SGD at learning rate 0.1 and momentum 0.9: the training tests' setting.
    fn dp_sgd_setup(rows: usize, steps: u64) -> (DpSgdPlan, FitConfig) {
        let plan = DpSgdPlan {
            max_grad_norm: 1.0,
            noise_multiplier: 1.0,
            sampling_rate: 0.05,
            expected_batch_size: (0.05 * rows as f64) as usize,
            steps_per_round: steps,
            rounds: 10,
        };
        let cfg =
            FitConfig { round: 1, train: TrainConfig { learning_rate: 0.1, momentum: 0.9, ..TrainConfig::default() } };
        (plan, cfg)
    }

    /// DP-SGD trains the MLP, and the TorchScript tanh MLP, on the
    /// breast-cancer rows to a useful model (z = 1, q = 0.05, 60 steps) and
    /// reports no training loss.
    #[test]
    fn dp_sgd_trains_the_mlp_and_a_torchscript_mlp() {
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let mut t = standardised(&ModelConfig::mlp(2, vec![16]), train.clone(), test, None);
        let (plan, cfg) = dp_sgd_setup(train.len(), 60);
        let out = t.fit_private(&cfg, &plan).unwrap();
        assert!(out.metrics.is_empty());
        let e = t.evaluate().unwrap();
        assert!(e.metrics["accuracy"] > 0.9, "{e:?}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/breast_cancer_mlp.pt");
        let (_, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let model = ModelConfig::new(2, Architecture::Torchscript { file: "m".into() });
        let mut ts = standardised(&model, train, test, Some(&script));
        assert!(ts.supports_dp_sgd());
        assert_eq!(
            ts.layers.as_ref().map(|l| l.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(" ")),
            Some(
                "Linear { weight: \"hidden_weight\", bias: \"hidden_bias\", activation: Tanh } \
                 Linear { weight: \"out_weight\", bias: \"out_bias\", activation: Identity }"
                    .into()
            )
        );
        assert!(ts.fit_private(&cfg, &plan).unwrap().metrics.is_empty());
        let e = ts.evaluate().unwrap();
        assert!(e.metrics["accuracy"] > 0.9, "{e:?}");
    }

    /// A TorchScript module's code may compute over its batch
    /// (`party/tests/fixtures/batch_mean_mlp.pt` subtracts the batch's mean
    /// row first; `scripts/make_test_modules.py`): the trainer
    /// scores it one row a call, so one row added to the held-out set
    /// changes the count of rows correct by at most one, as a DP
    /// evaluation's sensitivity assumes. Scored in one batch, the outlier
    /// row would move every row's input.
    #[test]
    fn a_torchscript_module_is_scored_one_row_a_call() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/batch_mean_mlp.pt");
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let model = ModelConfig::new(2, Architecture::Torchscript { file: "m".into() });
        let mut outlier = test.clone();
        outlier.features.extend(std::iter::repeat_n(1e4, outlier.num_features));
        outlier.labels.push(0);
        let correct = |held_out: Dataset| {
            let mut t = standardised(&model, train.clone(), held_out, Some(&script));
            let e = t.evaluate().unwrap();
            (e.metrics["accuracy"] * e.num_examples as f64).round() as i64
        };
        let (without, with) = (correct(test), correct(outlier));
        assert!((with - without).abs() <= 1, "{without} rows correct, {with} with one row more");
    }

    /// A TorchScript module saved in training mode (dropout after its
    /// hidden layer, `party/tests/fixtures/dropout_mlp.pt`) is loaded in
    /// eval mode: its predictions, and an evaluation's count, are the same
    /// every time (in training mode each would be random).
    #[test]
    fn a_torchscript_module_is_loaded_in_eval_mode() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dropout_mlp.pt");
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let model = ModelConfig::new(2, Architecture::Torchscript { file: "m".into() });
        let mut t = standardised(&model, train, test.clone(), Some(&script));
        let first = t.predict(&test.features).unwrap();
        assert_eq!(t.predict(&test.features).unwrap(), first);
        let e = t.evaluate().unwrap();
        assert_eq!(t.evaluate().unwrap().metrics["accuracy"], e.metrics["accuracy"]);
    }

    /// The update a DP-SGD step of the libtorch trainer releases carries the
    /// calibrated noise: one full-batch SGD step (q = 1, so the clipped sum
    /// is the same in every run) at z = 4 departs from the same step at next
    /// to no noise by lr·N(0, (z·C)²)/B per value, over the MLP's 530
    /// values. A trainer that skipped the noise, or scaled it wrongly, fails.
    #[test]
    fn a_dp_sgd_step_releases_the_calibrated_noise() {
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let rows = train.len();
        let mut t = standardised(&ModelConfig::mlp(2, vec![16]), train, test, None);
        let start = t.parameters().unwrap();
        let cfg = FitConfig { round: 1, train: TrainConfig { learning_rate: 1.0, ..TrainConfig::default() } };
        let mut step = |z: f64| -> Vec<f64> {
            t.set_parameters(&start).unwrap();
            let plan = DpSgdPlan {
                max_grad_norm: 1.0,
                noise_multiplier: z,
                sampling_rate: 1.0,
                expected_batch_size: rows,
                steps_per_round: 1,
                rounds: 10,
            };
            t.fit_private(&cfg, &plan).unwrap();
            let p = t.parameters().unwrap();
            // The trainable values (the frozen standardisation is not trained).
            p.tensors()
                .iter()
                .filter(|x| x.name != INPUT_MEAN && x.name != INPUT_STD)
                .flat_map(|x| x.data.iter().map(|&v| f64::from(v)))
                .collect()
        };
        let (quiet, noisy) = (step(1e-9), step(4.0));
        let sd = 4.0 / rows as f64;
        let normalised: Vec<f64> = quiet.iter().zip(&noisy).map(|(a, b)| (b - a) / sd).collect();
        assert_eq!(normalised.len(), 30 * 16 + 16 + 16 * 2 + 2);
        let variance = normalised.iter().map(|v| v * v).sum::<f64>() / normalised.len() as f64;
        // Outside 0.7..1.4 in under 1e-7 of runs for 530 N(0, 1) values.
        assert!((0.7..1.4).contains(&variance), "{variance}");
    }

    /// The noise is divided by the plan's expected batch size B, never by
    /// the sample's own size (which a row's presence changes, and which
    /// the release would then tell): with no rows at all, every Poisson
    /// sample is empty, and a step at q = 0.05, B = 8 still moves each value
    /// by lr·N(0, (z·C)²)/B. A trainer that divided by the sample's size
    /// (0), or skipped an empty sample, fails.
    #[test]
    fn an_empty_sample_still_takes_a_step_of_noise_over_the_expected_batch() {
        let bc = data("breast_cancer.csv");
        let mut t = standardised(&ModelConfig::mlp(2, vec![16]), bc.select(&[]), Dataset::default(), None);
        let start = t.parameters().unwrap();
        let cfg = FitConfig { round: 1, train: TrainConfig { learning_rate: 1.0, ..TrainConfig::default() } };
        let plan = DpSgdPlan {
            max_grad_norm: 1.0,
            noise_multiplier: 4.0,
            sampling_rate: 0.05,
            expected_batch_size: 8,
            steps_per_round: 1,
            rounds: 10,
        };
        t.fit_private(&cfg, &plan).unwrap();
        let moved: Vec<f64> = t
            .parameters()
            .unwrap()
            .tensors()
            .iter()
            .zip(start.tensors())
            .filter(|(x, _)| x.name != INPUT_MEAN && x.name != INPUT_STD)
            .flat_map(|(x, s)| x.data.iter().zip(&s.data).map(|(&a, &b)| f64::from(a) - f64::from(b)))
            .collect();
        assert_eq!(moved.len(), 30 * 16 + 16 + 16 * 2 + 2);
        let sd = 4.0 / 8.0;
        let variance = moved.iter().map(|v| (v / sd).powi(2)).sum::<f64>() / moved.len() as f64;
        assert!((0.7..1.4).contains(&variance), "{variance}");
        // Every value of every tensor, the biases too: the pooled variance
        // would pass with both bias tensors left un-noised (18 of 530
        // values), the review noted. A lattice draw of exactly 0 is ~1e-7.
        let unmoved: Vec<usize> = (0..moved.len()).filter(|&i| moved[i] == 0.0).collect();
        assert!(unmoved.is_empty(), "values that took no noise: {unmoved:?}");
    }

    /// A coordinator's model chosen so that the forward pass overflows
    /// (every trainable value 10^30: the logits are infinite, their
    /// gradients NaN) does not make DP-SGD fail, which would tell it
    /// something about the rows: non-finite gradients count as zero, and
    /// the step releases finite values (its noise alone moves them, by
    /// less than an f32 ulp at 10^30).
    #[test]
    fn a_model_whose_gradients_overflow_still_trains_privately_to_finite_values() {
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let rows = train.len();
        let mut t = standardised(&ModelConfig::mlp(2, vec![16]), train, test, None);
        let mut huge = t.parameters().unwrap();
        for (name, values) in huge.values_mut() {
            if name != INPUT_MEAN && name != INPUT_STD {
                values.iter_mut().for_each(|v| *v = 1e30);
            }
        }
        t.set_parameters(&huge).unwrap();
        let plan = DpSgdPlan {
            max_grad_norm: 1.0,
            noise_multiplier: 1.0,
            sampling_rate: 1.0,
            expected_batch_size: rows,
            steps_per_round: 2,
            rounds: 10,
        };
        let cfg = FitConfig { round: 1, train: TrainConfig { learning_rate: 1.0, ..TrainConfig::default() } };
        t.fit_private(&cfg, &plan).expect("DP-SGD over overflowing gradients");
        let after = t.parameters().unwrap();
        assert!(after.tensors().iter().all(|x| x.data.iter().all(|v| v.is_finite())));
    }

    /// A TorchScript module is trained with DP-SGD only when its variables
    /// chain as linear layers in one way and one choice of activations
    /// reproduces its forward; otherwise the reason is given.
    #[test]
    fn a_torchscript_module_that_is_not_a_linear_chain_is_refused_with_the_reason() {
        let t = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu)) * 0.1;
        let vars: std::collections::BTreeMap<String, Tensor> =
            [("a.weight", t(&[4, 3])), ("a.bias", t(&[4])), ("b.weight", t(&[2, 4])), ("b.bias", t(&[2]))]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect();
        let probe = Tensor::from_slice(&[0.5f32, -1.0, 2.0, -3.0, 0.25, 1.5]).view([2, 3]);
        let mlp = |act: fn(&Tensor) -> Tensor| {
            let vars =
                vars.iter().map(|(n, v)| (n.clone(), v.shallow_clone())).collect::<std::collections::BTreeMap<_, _>>();
            move |x: &Tensor| -> Result<Tensor, Error> {
                Ok(act(&x.linear(&vars["a.weight"], Some(&vars["a.bias"])))
                    .linear(&vars["b.weight"], Some(&vars["b.bias"])))
            }
        };
        let relu = script_layers(&vars, 3, 2, &probe, &mlp(|z| z.relu())).unwrap();
        assert_eq!(relu[0], linear("a", Activation::Relu));
        assert_eq!(relu[1], linear("b", Activation::Identity));
        // A sigmoid is none of the three.
        let why = script_layers(&vars, 3, 2, &probe, &mlp(|z| z.sigmoid())).unwrap_err();
        assert!(why.contains("not a chain"), "{why}");
        // Wrong outputs, an unpaired or non-linear parameter.
        assert!(script_layers(&vars, 3, 3, &probe, &mlp(|z| z.relu())).unwrap_err().contains("not the 3 classes"));
        let mut odd =
            vars.iter().map(|(n, v)| (n.clone(), v.shallow_clone())).collect::<std::collections::BTreeMap<_, _>>();
        odd.remove("b.bias");
        assert!(script_layers(&odd, 3, 2, &probe, &mlp(|z| z.relu())).unwrap_err().contains("pairs"));
        odd.insert("b.bias".into(), t(&[2]));
        odd.insert("scale".into(), t(&[1]));
        assert!(script_layers(&odd, 3, 2, &probe, &mlp(|z| z.relu())).unwrap_err().contains("\"scale\""));
        // Two layers that could each come first: ambiguous, refused.
        let square: std::collections::BTreeMap<String, Tensor> =
            [("a.weight", t(&[3, 3])), ("a.bias", t(&[3])), ("b.weight", t(&[3, 3])), ("b.bias", t(&[3]))]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect();
        let why = script_layers(&square, 3, 3, &probe, &|x| Ok(x.shallow_clone())).unwrap_err();
        assert!(why.contains("exactly one way"), "{why}");
    }

    /// DP-SGD trains the digits CNN brought as TorchScript
    /// (`examples/models/digits_cnn.pt`, shaped like the built-in CNN)
    /// through its reconstruction, to a useful model.
    #[test]
    fn dp_sgd_trains_a_torchscript_cnn_on_the_digits() {
        let (train, test) = data("digits.csv.gz").shuffle_split(0.25, 1);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/digits_cnn.pt");
        let model = ModelConfig::new(10, Architecture::Torchscript { file: "cnn".into() });
        let mut t = standardised(&model, train.clone(), test, Some(&script));
        assert!(t.supports_dp_sgd(), "{:?}", t.dp_refusal);
        assert_eq!(
            t.layers.as_ref().map(|l| l.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(" ")),
            Some(
                "Image { shape: [1, 8, 8] } Conv { weight: \"conv0_weight\", bias: \"conv0_bias\" } \
                 Conv { weight: \"conv1_weight\", bias: \"conv1_bias\" } Flatten \
                 Linear { weight: \"out_weight\", bias: \"out_bias\", activation: Identity }"
                    .into()
            )
        );
        let (plan, cfg) = dp_sgd_setup(train.len(), 200);
        assert!(t.fit_private(&cfg, &plan).unwrap().metrics.is_empty());
        let e = t.evaluate().unwrap();
        assert!(e.metrics["accuracy"] > 0.8, "{e:?}");
    }

    /// A TorchScript CNN is trained with DP-SGD when its convolutions are
    /// the built-in CNN's (3×3, padding 1, each followed by ReLU and 2×2
    /// max-pooling) over its rows viewed as an image: the image's shape is
    /// found by the probe; another pooling, activation, kernel or layout
    /// is refused with the reason.
    #[test]
    fn a_torchscript_cnn_is_reconstructed_or_refused_with_the_reason() {
        // Deterministic values, without libtorch's global generator (other
        // tests seed it for their models).
        let t = |shape: &[i64], seed: i64| {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|k| (0.61 * (k + 97 * seed) as f32).sin() * 0.3).collect();
            Tensor::from_slice(&v).view(shape)
        };
        // 2 channels of 4×8 in, 3 channels after the convolution, pooled
        // to 2×4, then 5 hidden values and 2 classes.
        let vars: std::collections::BTreeMap<String, Tensor> = [
            ("c.weight", t(&[3, 2, 3, 3], 1)),
            ("c.bias", t(&[3], 2)),
            ("h.weight", t(&[5, 24], 3)),
            ("h.bias", t(&[5], 4)),
            ("o.weight", t(&[2, 5], 5)),
            ("o.bias", t(&[2], 6)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        let probe = t(&[6, 64], 7);
        // The module's blocks: ours, or with another pooling or activation
        // (the same shapes, so only the probe can tell).
        let cnn = |block: fn(Tensor) -> Tensor| {
            let v =
                vars.iter().map(|(n, v)| (n.clone(), v.shallow_clone())).collect::<std::collections::BTreeMap<_, _>>();
            move |x: &Tensor| -> Result<Tensor, Error> {
                let z = x.view([-1, 2, 4, 8]).conv2d(&v["c.weight"], Some(&v["c.bias"]), [1, 1], [1, 1], [1, 1], 1);
                let hidden = block(z).flatten(1, -1).linear(&v["h.weight"], Some(&v["h.bias"])).tanh();
                Ok(hidden.linear(&v["o.weight"], Some(&v["o.bias"])))
            }
        };
        let layers = script_layers(&vars, 64, 2, &probe, &cnn(|z| z.relu().max_pool2d_default(2))).unwrap();
        assert_eq!(
            layers,
            [
                DpLayer::Image { shape: [2, 4, 8] },
                DpLayer::Conv { weight: "c.weight".into(), bias: "c.bias".into() },
                DpLayer::Flatten,
                linear("h", Activation::Tanh),
                linear("o", Activation::Identity),
            ]
        );
        for other in [|z: Tensor| z.relu().avg_pool2d_default(2), |z: Tensor| z.sigmoid().max_pool2d_default(2)] {
            let why = script_layers(&vars, 64, 2, &probe, &cnn(other)).unwrap_err();
            assert!(why.contains("not a chain"), "{why}");
        }
        // A module whose first linear layer takes what the convolution
        // leaves without pooling: no image shape chains.
        let mut unpooled =
            vars.iter().map(|(n, v)| (n.clone(), v.shallow_clone())).collect::<std::collections::BTreeMap<_, _>>();
        unpooled.insert("h.weight".into(), t(&[5, 96], 9));
        let why = script_layers(&unpooled, 64, 2, &probe, &|x| Ok(x.shallow_clone())).unwrap_err();
        assert!(why.contains("linear layers do not chain from 24 inputs"), "{why}");
        // A 5×5 kernel is named.
        let mut five =
            vars.iter().map(|(n, v)| (n.clone(), v.shallow_clone())).collect::<std::collections::BTreeMap<_, _>>();
        five.insert("c.weight".into(), t(&[3, 2, 5, 5], 8));
        let why = script_layers(&five, 64, 2, &probe, &|x| Ok(x.shallow_clone())).unwrap_err();
        assert!(why.contains("c.weight is a 5×5 convolution's"), "{why}");
        // More convolutions than DP-SGD takes.
        let seven: std::collections::BTreeMap<String, Tensor> = (0..7)
            .flat_map(|i| [(format!("c{i}.weight"), t(&[2, 2, 3, 3], i)), (format!("c{i}.bias"), t(&[2], i))])
            .chain([("o.weight".to_owned(), t(&[2, 2], 9)), ("o.bias".to_owned(), t(&[2], 9))])
            .collect();
        let why = script_layers(&seven, 64, 2, &probe, &|x| Ok(x.shallow_clone())).unwrap_err();
        assert!(why.contains("it has 7 convolutions; DP-SGD takes at most 6"), "{why}");
        // Input channels that do not divide the row's values.
        let why = script_layers(&vars, 63, 2, &probe, &|x| Ok(x.shallow_clone())).unwrap_err();
        assert!(why.contains("do not chain from an image of 63 values"), "{why}");
    }

    #[test]
    fn cnn_learns_the_digits() {
        let (train, test) = data("digits.csv.gz").shuffle_split(0.25, 1);
        let model = ModelConfig::cnn(10, vec![8, 16], [1, 8, 8]);
        let mut t = standardised(&model, train, test, None);
        let cfg = TrainConfig { local_epochs: 8, learning_rate: 0.05, momentum: 0.9, ..TrainConfig::default() };
        fit(&mut t, 1, cfg);
        let e = t.evaluate().unwrap();
        assert!(e.metrics["accuracy"] > 0.9, "{e:?}");
        let probs = t.predict(&t.held_out.features[..128]).unwrap();
        assert_eq!(probs.len(), 20);
        assert!((probs[..10].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // A shape that does not fit the data is refused with the reason.
        let bad = ModelConfig::cnn(10, vec![16, 32], [1, 4, 4]);
        let err = TorchTrainer::new(&bad, None, data("digits.csv.gz"), Dataset::default(), 0, 0).err().unwrap();
        assert!(err.to_string().contains("needs 16 features"), "{err}");
    }

    #[test]
    fn a_torchscript_model_loads_and_trains() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/breast_cancer_mlp.pt");
        let (train, test) = data("breast_cancer.csv").shuffle_split(0.25, 1);
        let model = ModelConfig::new(2, Architecture::Torchscript { file: "bc".into() });
        let mut t = standardised(&model, train, test, Some(&script));
        let names: Vec<String> = t.parameters().unwrap().spec().into_iter().map(|s| s.name).collect();
        assert_eq!(names, [INPUT_MEAN, INPUT_STD, "hidden_bias", "hidden_weight", "out_bias", "out_weight"]);
        let before = t.evaluate().unwrap();
        fit(&mut t, 1, TrainConfig { local_epochs: 3, learning_rate: 0.05, ..TrainConfig::default() });
        let after = t.evaluate().unwrap();
        assert!(after.loss < before.loss, "{before:?} -> {after:?}");
        assert!(after.metrics["accuracy"] > 0.93, "{after:?}");
        // A file that is not TorchScript, and a module of the wrong arity, are named.
        let err = TorchTrainer::new(
            &model,
            Some(Path::new("Cargo.toml")),
            data("breast_cancer.csv"),
            Dataset::default(),
            0,
            0,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("Cargo.toml"), "{err}");
        let ten = Dataset { features: vec![0.0; 20], labels: vec![0, 1], num_features: 10 };
        assert!(TorchTrainer::new(&model, Some(&script), ten, Dataset::default(), 0, 0).is_err());
    }
}
