//! The `confide-party` program, as a library function so that a researcher's
//! own party build (with its own [`crate::plugins::PartyPlugins`]: trainers,
//! protocols, job kinds) gets the same CLI.

use std::path::PathBuf;

use crate::config::PartyConfig;
use crate::local::{self, LocalTrainers};
use crate::node::PartyNode;
use crate::plugins::PartyPlugins;
use crate::trainers::BuiltinTrainers;
use clap::{Parser, Subcommand};
use confide_algorithms::data::{CsvOptions, DataFormat, DatasetSource};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;

/// Confide party node: dials out to the coordinator and trains next to private data.
#[derive(Parser, Debug)]
#[command(name = "confide-party", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to the coordinator and serve jobs until interrupted.
    Run {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make this party's private key (NAME.key, mode 0600) and a
    /// certificate signing request (NAME.csr) in DIR. Send only the request
    /// to whoever holds the federation CA (`confide certs sign`); the key
    /// never leaves this machine.
    Keygen {
        /// The party's name, as the federation enrolls it.
        #[arg(long)]
        name: String,
        /// Where to write the key and the request.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the privacy ledger: the ε and δ each data set has spent, job by
    /// job, against the policy's `max_epsilon` and `max_delta`.
    Budget {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print the ledger as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the pipelines whose batch marks this party keeps (at most 64:
    /// a train job of one more is refused), or forget finished pipelines'
    /// marks to make room. Forgetting needs the party stopped (its ledger's
    /// lock is taken); a pipeline forgotten and run again trains again on
    /// its batches, each job still charged in the ledger.
    Pipelines {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
        /// A finished pipeline's job id whose marks to forget (repeatable).
        #[arg(long)]
        forget: Vec<String>,
    },
    /// Check the config file and load every data set, then exit.
    Check {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Train a job's model on local rows only (no coordinator): a local-only
    /// baseline, or a central one on pooled rows. Same schedule as the job.
    TrainLocal {
        /// The job spec (its model, training and rounds are used).
        #[arg(long)]
        spec: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Held-out rows to report accuracy on.
        #[arg(long)]
        test: Option<PathBuf>,
        /// Where to write the trained model (safetensors): a regular file,
        /// mode 0600, written whole and renamed into place.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Party config whose [models] table names TorchScript files.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Answer a batch of rows with a service's deployed model, as this
    /// party serves it (the kept, verified deployment; no coordinator
    /// needed). Prints CSV: the predicted class, then each class's probability.
    Predict {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
        /// The service (one of `[serve] services`).
        #[arg(long)]
        service: String,
        /// CSV of feature rows (no label column), optionally gzip-compressed.
        #[arg(long)]
        data: PathBuf,
        /// The file starts with a header line.
        #[arg(long)]
        header: bool,
        /// Write the CSV here instead of standard output: a regular file,
        /// mode 0600, written whole and renamed into place (omit it to pipe).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Evaluate a model (e.g. from `confide job model`) on local rows.
    Evaluate {
        /// The job spec the model was trained with.
        #[arg(long)]
        spec: PathBuf,
        /// The model file (safetensors).
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Party config whose [models] table names TorchScript files.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Where local rows come from.
#[derive(clap::Args, Debug)]
struct DataArgs {
    /// CSV file(s), optionally gzip-compressed; several are concatenated.
    #[arg(long = "data", required = true)]
    files: Vec<PathBuf>,
    /// The files start with a header line.
    #[arg(long)]
    header: bool,
    /// Label column (negative counts from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    label_column: i64,
}

impl DataArgs {
    fn sources(&self, files: &[PathBuf]) -> Vec<DatasetSource> {
        files
            .iter()
            .map(|p| DatasetSource {
                path: p.clone(),
                format: DataFormat::Csv,
                csv: CsvOptions { header: self.header, label_column: self.label_column },
                only: None,
                all_held_out: false,
                features: None,
                drop_invalid_rows: None,
                label_classes: None,
                max_bytes: None,
            })
            .collect()
    }
}

/// Feature rows of a CSV file (no labels): the values, the row count and
/// the width. Errors name the file, line and column.
fn feature_rows(path: &std::path::Path, header: bool) -> Result<(Vec<f32>, usize, usize), String> {
    let text = confide_algorithms::data::Dataset::read_text(path).map_err(|e| e.to_string())?;
    let (mut values, mut rows, mut width) = (Vec::new(), 0usize, None);
    for (i, line) in text.lines().enumerate().skip(usize::from(header)) {
        if line.trim().is_empty() {
            continue;
        }
        let before = values.len();
        for (j, cell) in line.split(',').enumerate() {
            let v: f32 = cell.trim().parse().map_err(|_| {
                format!("{}:{}: column {}: {:?} is not a number", path.display(), i + 1, j + 1, cell.trim())
            })?;
            if !v.is_finite() {
                return Err(format!("{}:{}: column {}: {v} is not finite", path.display(), i + 1, j + 1));
            }
            values.push(v);
        }
        let w = values.len() - before;
        match width {
            None => width = Some(w),
            Some(expected) if expected != w => {
                return Err(format!("{}:{}: {w} values, but the first row has {expected}", path.display(), i + 1));
            }
            Some(_) => {}
        }
        rows += 1;
    }
    let width = width.ok_or_else(|| format!("{}: no rows", path.display()))?;
    Ok((values, rows, width))
}

async fn predict(
    config: &std::path::Path,
    plugins: &PartyPlugins,
    service: &str,
    data: &std::path::Path,
    header: bool,
    out: Option<&std::path::Path>,
) -> Result<(), String> {
    let cfg = PartyConfig::load_with(config, plugins).map_err(|e| e.to_string())?;
    if !cfg.serve.services.iter().any(|s| s == service) {
        return Err(format!("{}: serve.services does not list {service:?}", config.display()));
    }
    let node = PartyNode::with_plugins(cfg, PartyPlugins::default());
    let registry = node.open_serving().map_err(|e| e.to_string())?.ok_or("this party serves nothing")?;
    let served = registry.current(service).map_err(|e| e.to_string())?;
    let (rows, count, width) = feature_rows(data, header)?;
    if width != served.width {
        return Err(format!(
            "{}: {width} values per row, but service {service}'s model takes {}",
            data.display(),
            served.width
        ));
    }
    let per = registry.config().max_rows;
    let mut text = String::from("prediction");
    for c in 0..served.classes() {
        text.push_str(&format!(",p{c}"));
    }
    text.push('\n');
    for chunk in rows.chunks(per * width) {
        let n = chunk.len() / width;
        let p = registry.predict(service, chunk.to_vec(), n, width).await.map_err(|e| e.to_string())?;
        for row in p.probabilities.chunks(p.served.classes()) {
            let best = row.iter().enumerate().fold(0, |b, (c, &v)| if v > row[b] { c } else { b });
            text.push_str(&best.to_string());
            for v in row {
                text.push_str(&format!(",{v}"));
            }
            text.push('\n');
        }
    }
    let r = &served.deployment.record;
    eprintln!(
        "{count} rows answered by service {service}: deployment {} (job {} round {}, sha256 {})",
        r.sequence,
        r.job_id,
        r.round,
        &r.sha256[..16]
    );
    match out {
        // Answers about patients' rows: written whole and 0600, through a
        // temporary file of its own (no link followed).
        Some(path) => confide_proto::durable::write_file_mode(path, text.as_bytes(), 0o600),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// The trainers of this build: its own factory if it registered one (as its
/// `run` uses), else the built-in ones with `config`'s TorchScript files.
fn trainers_for(config: Option<&std::path::Path>, plugins: &PartyPlugins) -> Result<LocalTrainers, String> {
    let config = match config {
        Some(path) => Some(PartyConfig::load_with(path, plugins).map_err(|e| e.to_string())?),
        None => None,
    };
    if let Some(factory) = plugins.trainer_factory() {
        return Ok(LocalTrainers::Custom(factory.clone()));
    }
    Ok(LocalTrainers::Builtin(match config {
        Some(c) => BuiltinTrainers::for_config(&c),
        None => BuiltinTrainers::new(Default::default(), 1),
    }))
}

fn load_spec(path: &std::path::Path) -> Result<JobSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    JobSpec::parse(&text, &path.display().to_string(), &Limits::default()).map_err(|e| e.to_string())
}

fn print_metrics(what: &str, e: &local::Evaluation) {
    let mut line = format!("{what}: {} rows, loss {:.4}", e.examples, e.loss);
    for (k, v) in &e.metrics {
        line.push_str(&format!(", {k} {v:.4}"));
    }
    println!("{line}");
}

fn train_local(
    spec: &std::path::Path,
    data: &DataArgs,
    test: Option<&std::path::Path>,
    out: Option<&std::path::Path>,
    json: bool,
    config: Option<&std::path::Path>,
    plugins: &PartyPlugins,
) -> Result<(), String> {
    let spec = load_spec(spec)?;
    let trainers = trainers_for(config, plugins)?;
    let trainer = trainers.build(&spec, &data.sources(&data.files))?;
    if !json {
        println!(
            "training {} ({}) on local rows ({}) for {} rounds",
            spec.name,
            spec.model.kind().as_str(),
            data.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            spec.rounds
        );
    }
    let params = local::train_with(trainer, &spec, |round, m| {
        if !json {
            println!("  round {round}: train_loss {:.4}", m.get("train_loss").copied().unwrap_or(f64::NAN));
        }
    })?;
    if let Some(path) = out {
        local::write_model(path, &params, &spec)?;
        if !json {
            println!("model: {}", path.display());
        }
    }
    let eval = match test {
        Some(t) => Some(local::evaluate_with(trainers.build(&spec, &data.sources(&[t.to_path_buf()]))?, &params)?),
        None => None,
    };
    if json {
        let v = serde_json::json!({
            "rounds": spec.rounds,
            "model": out.map(|p| p.display().to_string()),
            "test": eval,
        });
        println!("{v}");
    } else if let Some(e) = &eval {
        print_metrics("test", e);
    }
    Ok(())
}

fn evaluate(
    spec: &std::path::Path,
    model: &std::path::Path,
    data: &DataArgs,
    json: bool,
    config: Option<&std::path::Path>,
    plugins: &PartyPlugins,
) -> Result<(), String> {
    let spec = load_spec(spec)?;
    let trainers = trainers_for(config, plugins)?;
    let params = local::read_model(model)?;
    let trainer = trainers.build(&spec, &data.sources(&data.files))?;
    let e = local::evaluate_with(trainer, &params).map_err(|e| format!("{}: {e}", model.display()))?;
    if json {
        println!("{}", serde_json::to_string(&e).map_err(|e| e.to_string())?);
    } else {
        print_metrics(&model.display().to_string(), &e);
    }
    Ok(())
}

/// The whole `confide-party` program: logging, argument parsing, exit code.
/// `plugins` adds a build's own trainers, protocols and job kinds (see
/// `examples/custom_trainer.rs`); [`PartyPlugins::default`] is the stock party.
pub fn main_with(plugins: PartyPlugins) -> ! {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONFIDE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(run(cli, plugins)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            2
        }
    };
    std::process::exit(code);
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli, plugins: PartyPlugins) -> i32 {
    match cli.command {
        Command::Run { config } => match PartyConfig::load_with(&config, &plugins) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    tracing::warn!("{w}");
                }
                // A ledger that is not there is a fresh one, which is right
                // only at a party's first start: say so where the operator
                // looks (a moved config or key moves the default path).
                let ledger = cfg.ledger_path();
                if !ledger.exists() {
                    tracing::warn!(
                        "privacy ledger {} does not exist: starting an empty one. If this party has run jobs \
                         before, its ledger is elsewhere (the default path follows the key file): stop the party \
                         and set `ledger` to it, or the spending it recorded is not counted",
                        ledger.display()
                    );
                }
                let node = std::sync::Arc::new(PartyNode::with_plugins(cfg, plugins));
                // An unreadable or locked ledger stops the party: it must not
                // forget what it spent. The node holds the ledger (and its
                // lock) from here on, with no gap after a check.
                if let Some(e) = node.ledger_error() {
                    eprintln!("error: {e}");
                    return 2;
                }
                if let Some(e) = node.watches_error() {
                    eprintln!("error: the pipelines' state: {e}");
                    return 2;
                }
                // A CA, certificate or key that cannot load stops the party
                // now, naming the file, instead of a retry loop that never
                // connects.
                if let Err(e) = confide_proto::net::check_client_identity(&node.config().client_identity()) {
                    eprintln!("error: {e}");
                    return 2;
                }
                // A bad [serve] table or a taken port stops the party at start.
                if let Err(e) = node.start_serving().await {
                    eprintln!("error: {e}");
                    return 2;
                }
                if let Err(e) = node.start_metrics().await {
                    eprintln!("error: {e}");
                    return 2;
                }
                tokio::select! {
                    _ = node.run() => 0,
                    _ = tokio::signal::ctrl_c() => 0,
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::Predict { config, service, data, header, out } => {
            match predict(&config, &plugins, &service, &data, header, out.as_deref()).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e}");
                    2
                }
            }
        }
        Command::Keygen { name, out } => match confide_crypto::pki::write_key_request(&out, &name) {
            Ok((key, csr)) => {
                println!("private key: {} (mode 0600; keep it here)", key.display());
                println!("certificate request: {} (send it for signing: confide certs sign --csr ...)", csr.display());
                // Read out of band to the administrator, who signs with
                // `--fingerprint`: the request signed is then this one.
                let print = std::fs::read_to_string(&csr)
                    .map_err(|e| e.to_string())
                    .and_then(|t| confide_crypto::pki::request_key_fingerprint(&t).map_err(|e| e.to_string()));
                match print {
                    Ok(p) => println!("key fingerprint: {p} (tell the administrator, out of band)"),
                    Err(e) => eprintln!("warning: the request's fingerprint: {e}"),
                }
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Budget { config, json } => report(budget(&config, json, &plugins)),
        Command::Pipelines { config, forget } => report(pipelines(&config, &forget, &plugins)),
        Command::Check { config } => match PartyConfig::load_with(&config, &plugins) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                let mut code = 0;
                for (name, src) in &cfg.datasets {
                    match src.load() {
                        // A declared width the rows do not have: a DP job,
                        // which reads only rows of that width, would drop
                        // every one (found by review).
                        Ok(ds) if src.features.is_some_and(|f| f != ds.num_features) => {
                            eprintln!(
                                "data set {name}: datasets.{name}.features = {} but the rows of {} have {} features \
                                 (label excluded); a DP job would leave out every row",
                                src.features.unwrap_or_default(),
                                src.path.display(),
                                ds.num_features
                            );
                            code = 1;
                        }
                        Ok(ds) => println!("data set {name}: {} rows, {} features", ds.len(), ds.num_features),
                        Err(e) => {
                            eprintln!("data set {name}: {e}");
                            code = 1;
                        }
                    }
                }
                if let Err(e) = crate::watch::Watches::of_config(&cfg) {
                    eprintln!("the pipelines' state: {e}");
                    code = 1;
                }
                // The ledger as `run` will read it (an unreadable one stops
                // the party there, so it fails the check here).
                let ledger = cfg.ledger_path();
                match crate::ledger::Ledger::read(&ledger) {
                    Ok(_) if !ledger.exists() => eprintln!(
                        "warning: privacy ledger {} does not exist: a first start begins an empty one (if this \
                         party has run jobs before, its ledger is elsewhere: set `ledger`)",
                        ledger.display()
                    ),
                    Ok(file) => {
                        println!("privacy ledger {}: {} data sets recorded", ledger.display(), file.datasets.len())
                    }
                    Err(e) => {
                        eprintln!("privacy ledger: {e}");
                        code = 1;
                    }
                }
                if let Err(e) = confide_proto::net::check_client_identity(&cfg.client_identity()) {
                    eprintln!("TLS identity: {e}");
                    code = 1;
                }
                code
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::TrainLocal { spec, data, test, out, json, config } => {
            report(train_local(&spec, &data, test.as_deref(), out.as_deref(), json, config.as_deref(), &plugins))
        }
        Command::Evaluate { spec, model, data, json, config } => {
            report(evaluate(&spec, &model, &data, json, config.as_deref(), &plugins))
        }
    }
}

fn pipelines(config: &std::path::Path, forget: &[String], plugins: &PartyPlugins) -> Result<(), String> {
    let cfg = PartyConfig::load_with(config, plugins).map_err(|e| e.to_string())?;
    // The ledger's lock, held until the end: a running party holds it, so
    // taking it shows that none runs on this state.
    let _stopped = if forget.is_empty() {
        None
    } else {
        Some(crate::ledger::Ledger::open(&cfg.ledger_path()).map_err(|e| {
            if e.contains("in use by another process") {
                format!("{e}: stop the party before forgetting pipelines (it would write its own marks back)")
            } else {
                e
            }
        })?)
    };
    let watches = crate::watch::Watches::of_config(&cfg)?;
    for id in forget {
        let gone = watches.forget(id)?;
        println!("forgot pipeline {id}: {} marked batches and rows", gone.marked);
    }
    let kept = watches.pipelines();
    println!(
        "pipelines state {}: {} of at most {} pipelines",
        cfg.pipelines_path().display(),
        kept.len(),
        crate::watch::MAX_PIPELINES
    );
    for p in kept {
        let latest = p.latest_iteration.map_or("none trained".to_string(), |i| format!("latest iteration {i}"));
        println!("  {}: {} marked batches and rows, {latest}", p.id, p.marked);
    }
    Ok(())
}

fn budget(config: &std::path::Path, json: bool, plugins: &PartyPlugins) -> Result<(), String> {
    let cfg = PartyConfig::load_with(config, plugins).map_err(|e| e.to_string())?;
    let ledger = crate::ledger::Ledger::read(&cfg.ledger_path())?;
    let view = BudgetView { cfg: &cfg, ledger: &ledger };
    if json {
        println!("{}", view.json());
        return Ok(());
    }
    let max = cfg.policy.max_epsilon;
    let exists = cfg.ledger_path().exists();
    let missing = if exists {
        ""
    } else {
        " (no such file: nothing recorded there; if this party has run jobs, its ledger is elsewhere)"
    };
    println!("privacy ledger {}{missing}", cfg.ledger_path().display());
    let limit = max.map_or("no limit (policy.max_epsilon unset)".to_string(), |m| format!("policy.max_epsilon = {m}"));
    let delta_limit = cfg.policy.max_delta.map_or(String::new(), |d| format!(", policy.max_delta = {d:e}"));
    println!("{limit}{delta_limit}; costs of separate jobs add up");
    for name in view.names() {
        let d = ledger.datasets.get(name).cloned().unwrap_or_default();
        let (spent, others) = (view.rows_spent(name), view.also(name));
        let remaining = max.map_or(String::new(), |m| format!(", {:.4} remaining", (m - spent).max(0.0)));
        let remaining_delta = cfg
            .policy
            .max_delta
            .map_or(String::new(), |m| format!(", δ {:e} remaining", (m - view.rows_delta(name)).max(0.0)));
        let remaining = format!("{remaining}{remaining_delta}");
        let rows = if others.is_empty() {
            String::new()
        } else {
            format!("; its rows, also as {}: ε = {spent:.4}", others.join(", "))
        };
        println!("data set {name}: ε = {:.4}, δ = {:e}{rows}{remaining}", d.epsilon(), d.delta());
        for (id, j) in &d.jobs {
            let ended = j.ended.as_ref().map_or(String::new(), |e| format!(" (settled: the job ended, {e})"));
            println!(
                "  job {id} ({}): ε = {:.4}, δ = {:e}, {}/{} rounds trained{ended}",
                j.name, j.epsilon, j.delta, j.rounds_started, j.rounds_reserved
            );
        }
    }
    Ok(())
}

/// The ledger as `confide-party budget` shows it: what the node charges
/// against is the rows' spending under every name that read a data set's
/// path (a configured name), else the entry's own.
struct BudgetView<'a> {
    cfg: &'a PartyConfig,
    ledger: &'a crate::ledger::LedgerFile,
}

impl BudgetView<'_> {
    /// The configured data sets, then those only the ledger names.
    fn names(&self) -> impl Iterator<Item = &String> {
        let only_in_ledger = self.ledger.datasets.keys().filter(|k| !self.cfg.datasets.contains_key(*k));
        self.cfg.datasets.keys().chain(only_in_ledger)
    }

    fn rows_path(&self, name: &str) -> Option<String> {
        self.cfg.datasets.get(name).map(|d| crate::config::resolved_path(&d.path).to_string_lossy().into_owned())
    }

    fn rows_spent(&self, name: &str) -> f64 {
        self.ledger.spent_by_rows(name, self.rows_path(name).as_deref(), None)
    }

    fn rows_delta(&self, name: &str) -> f64 {
        self.ledger.delta_by_rows(name, self.rows_path(name).as_deref(), None)
    }

    fn also(&self, name: &str) -> Vec<String> {
        self.ledger.other_names_of(name, self.rows_path(name).as_deref()).into_iter().map(str::to_owned).collect()
    }

    /// `budget --json`: ε that is not finite (a job without DP) as "inf".
    fn json(&self) -> serde_json::Value {
        let max = self.cfg.policy.max_epsilon;
        let finite_or_inf = |e: f64| if e.is_finite() { serde_json::json!(e) } else { serde_json::json!("inf") };
        let datasets: serde_json::Map<String, serde_json::Value> = self
            .names()
            .map(|name| {
                let d = self.ledger.datasets.get(name).cloned().unwrap_or_default();
                let (spent, spent_delta) = (self.rows_spent(name), self.rows_delta(name));
                let max_delta = self.cfg.policy.max_delta;
                let value = serde_json::json!({
                    "epsilon": finite_or_inf(d.epsilon()),
                    "delta": d.delta(),
                    "max_epsilon": max,
                    "max_delta": max_delta,
                    "rows_epsilon": finite_or_inf(spent),
                    "rows_delta": spent_delta,
                    "also_as": self.also(name),
                    "remaining": max.map(|m| (m - spent).max(0.0)),
                    "remaining_delta": max_delta.map(|m| (m - spent_delta).max(0.0)),
                    "paths": d.paths,
                    "jobs": d.jobs,
                });
                (name.clone(), value)
            })
            .collect();
        serde_json::json!({ "ledger": self.cfg.ledger_path(), "datasets": datasets })
    }
}

fn report(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forgetting a pipeline's marks is refused while a party holds the
    /// ledger (it would write its own marks back), and names an unknown id.
    #[test]
    fn pipelines_are_forgotten_only_while_the_party_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bc.csv"), "x,label\n1,0\n").unwrap();
        let path = dir.path().join("p.toml");
        let text = "coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                    ledger = \"ledger.json\"\n[datasets.bc]\npath = \"bc.csv\"\n";
        std::fs::write(&path, text).unwrap();
        let cfg = PartyConfig::load(&path).unwrap();
        let plugins = PartyPlugins::new();
        pipelines(&path, &[], &plugins).unwrap();
        let running = crate::ledger::Ledger::open(&cfg.ledger_path()).unwrap();
        let e = pipelines(&path, &["p1".into()], &plugins).unwrap_err();
        assert!(e.contains("stop the party"), "{e}");
        pipelines(&path, &[], &plugins).expect("listing needs no lock");
        drop(running);
        let e = pipelines(&path, &["p1".into()], &plugins).unwrap_err();
        assert!(e.contains("no pipeline p1"), "{e}");
        // The other way round: a party does not start on a ledger another
        // process holds (a `--forget` under way, or a second party).
        let held = crate::ledger::Ledger::open(&cfg.ledger_path()).unwrap();
        let cli = Cli::parse_from(["confide-party", "run", "--config", &path.to_string_lossy()]);
        let code =
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run(cli, plugins));
        assert_eq!(code, 2, "the party started beside the held ledger");
        drop(held);
    }

    /// `budget --json` writes a job without DP's ε = ∞ as "inf" (JSON has
    /// no infinity) in the entry's ε and the rows' ε, and counts the rows'
    /// spending under another name that read the same path, with nothing
    /// remaining.
    #[test]
    fn budget_json_writes_infinite_spending_as_inf_and_counts_the_rows_under_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let rows = dir.path().join("bc.csv");
        std::fs::write(&rows, "x,label\n1,0\n").unwrap();
        let path = dir.path().join("p.toml");
        let text = "coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                    ledger = \"ledger.json\"\n[datasets.bc]\npath = \"bc.csv\"\n[policy]\nmax_epsilon = 4.0\n\
                    max_delta = 1e-4\n";
        std::fs::write(&path, text).unwrap();
        let cfg = PartyConfig::load(&path).unwrap();
        let spec = |dp: &str| {
            let text = format!(
                "name = \"p\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"a\"]\nmin = 1\n\
                 dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n{dp}"
            );
            JobSpec::parse(&text, "p", &Limits::default()).unwrap()
        };
        let ledger = crate::ledger::Ledger::open(&cfg.ledger_path()).unwrap();
        let resolved = crate::config::resolved_path(&rows);
        // Spent under an old name, on the rows' path: a job without DP.
        drop(ledger.reserve_at("plain", &spec(""), "old", Some(&resolved), None).unwrap());
        drop(
            ledger
                .reserve_at(
                    "dp",
                    &spec("[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.05\n"),
                    "bc",
                    Some(&resolved),
                    None,
                )
                .unwrap(),
        );
        // And a DP job under the old name: its δ counts for the rows too.
        drop(
            ledger
                .reserve_at(
                    "dp-old",
                    &spec("[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.05\n"),
                    "old",
                    Some(&resolved),
                    None,
                )
                .unwrap(),
        );
        let file = crate::ledger::Ledger::read(&cfg.ledger_path()).unwrap();
        let out = BudgetView { cfg: &cfg, ledger: &file }.json();
        let bc = &out["datasets"]["bc"];
        assert!(bc["epsilon"].as_f64().is_some_and(|e| e.is_finite() && e > 0.0), "{bc}");
        assert_eq!(bc["rows_epsilon"], "inf", "{bc}");
        assert_eq!(bc["also_as"], serde_json::json!(["old"]));
        assert_eq!(bc["remaining"], 0.0);
        assert_eq!(out["datasets"]["old"]["epsilon"], "inf", "{out}");
        // δ: the two DP jobs' 1e-5 each (the job without DP has none), under both names.
        assert_eq!((bc["rows_delta"].as_f64(), bc["max_delta"].as_f64()), (Some(2e-5), Some(1e-4)), "{bc}");
        assert!((bc["remaining_delta"].as_f64().unwrap() - 8e-5).abs() < 1e-12, "{bc}");
    }
}
