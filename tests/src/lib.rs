//! A federation of real `confide` and `confide-party` processes on loopback,
//! for the end-to-end tests. Every process logs to a file in a temporary
//! directory; [`Federation::logs`] shows them when a test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use confide_algorithms::data::DatasetSource;
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{FeatureStats, FitConfig, Parameters, TrainConfig, Trainer};
use serde_json::Value;

pub mod webdriver;

/// Where cargo put the binaries (`target/debug` next to the test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory").to_path_buf();
    assert!(
        dir.join("confide").exists() && dir.join("confide-party").exists(),
        "{} lacks the confide binaries: run `cargo build --workspace --bins` first (make test does)",
        dir.display()
    );
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `GET http://ADDR/metrics`: the body, after checking the status and the
/// Prometheus text-format content type.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// A running federation.
pub struct Federation {
    /// Scratch directory (PKI, data, logs, coordinator data).
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    /// `127.0.0.1:PORT` once the coordinator has started.
    pub addr: String,
    coordinator: Option<Child>,
    parties: BTreeMap<String, Child>,
    /// Party names.
    pub names: Vec<String>,
    /// The coordinator program (default `confide`).
    pub coordinator_bin: PathBuf,
    /// The party program (default `confide-party`).
    pub party_bin: PathBuf,
    /// The PKI directory the coordinator serves from (default: the whole
    /// `pki` directory `confide certs init` wrote).
    pub coordinator_pki: Option<PathBuf>,
    relays: BTreeMap<String, Child>,
    /// The coordinator's `/metrics` address once it has started.
    pub metrics_addr: String,
    /// Extra environment for the coordinator's next start (fault injection).
    pub coordinator_env: Vec<(String, String)>,
}

impl Federation {
    /// A fresh PKI for `parties` and their shares of `input` (a labelled CSV;
    /// `header` skips its first line), split with `weights`.
    pub fn new(parties: &[&str], input: &Path, header: bool, weights: &str) -> Federation {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = bin_dir();
        let names: Vec<String> = parties.iter().map(|s| s.to_string()).collect();
        let (coordinator_bin, party_bin) = (bin.join("confide"), bin.join("confide-party"));
        let fed = Federation {
            dir,
            bin,
            addr: String::new(),
            coordinator: None,
            parties: BTreeMap::new(),
            names,
            coordinator_bin,
            party_bin,
            coordinator_pki: None,
            relays: BTreeMap::new(),
            metrics_addr: String::new(),
            coordinator_env: Vec::new(),
        };
        std::fs::create_dir_all(fed.path("logs")).expect("logs dir");
        fed.run_ok(&["certs", "init", "--dir", &fed.s("pki"), "--parties", &parties.join(",")]);
        let (input, out, joined) = (input.to_string_lossy().into_owned(), fed.s("data"), parties.join(","));
        let mut args = vec!["data", "split", "--input", &input];
        if header {
            args.push("--header");
        }
        args.extend(["--parties", &joined, "--weights", weights, "--seed", "3", "--out", &out]);
        fed.run_ok(&args);
        fed
    }

    /// Party `name`'s data file, as `confide data split` wrote it.
    pub fn party_data(&self, name: &str) -> DatasetSource {
        DatasetSource::csv(self.path(&format!("data/{name}.csv")))
    }

    /// One trainer per party over its data file, built by `build(data, party)`
    /// (as the party process would build it).
    pub fn trainers(&self, build: impl Fn(&DatasetSource, &str) -> Box<dyn Trainer>) -> Vec<Box<dyn Trainer>> {
        self.names.iter().map(|n| build(&self.party_data(n), n)).collect()
    }

    /// A path inside the scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// [`Self::path`] as a string.
    pub fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    /// Runs `confide ARGS` against this federation's coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("confide"))
            .args(args)
            .env("CONFIDE_COORDINATOR", format!("https://{}", self.addr))
            .env("CONFIDE_PKI", self.path("pki"))
            .env("CONFIDE_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run confide")
    }

    /// Runs `confide ARGS` and returns its stdout; panics with its stderr on failure.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "confide {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the coordinator (on the same port as before, after a restart).
    pub fn start_coordinator(&mut self) {
        let listen = if self.addr.is_empty() { "127.0.0.1:0".to_string() } else { self.addr.clone() };
        let out_path = self.path("logs/coordinator.out");
        let _ = std::fs::remove_file(&out_path);
        let child = Command::new(&self.coordinator_bin)
            .args([
                "coordinator",
                "serve",
                "--listen",
                &listen,
                "--data-dir",
                &self.s("coordinator"),
                "--pki",
                &self.coordinator_pki.clone().map_or_else(|| self.s("pki"), |p| p.to_string_lossy().into_owned()),
                // Tests run side by side: never the default port.
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env("CONFIDE_LOG", "info")
            .envs(self.coordinator_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("log file"))
            .stderr(append(&self.path("logs/coordinator.log")))
            .spawn()
            .expect("spawn coordinator");
        self.coordinator = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            let metrics = text.lines().find_map(|l| l.strip_prefix("metrics listening on "));
            if let (Some(addr), Some(m)) =
                (text.lines().find_map(|l| l.strip_prefix("coordinator listening on ")), metrics)
            {
                self.addr = addr.trim().to_string();
                self.metrics_addr = m.trim().to_string();
                return;
            }
            assert!(Instant::now() < deadline, "coordinator did not start\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `secs` for the coordinator to exit on its own (a fault
    /// injected); its exit status.
    pub fn wait_coordinator_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let child = self.coordinator.as_mut().expect("a coordinator running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.coordinator = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the coordinator did not exit\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the coordinator at once (SIGKILL).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Writes `NAME.toml` for a party (with `extra` appended) and returns its path.
    /// The data set declares its width (`features`, as a DP job needs)
    /// when its file is there to count it from.
    pub fn party_config(&self, name: &str, extra: &str) -> PathBuf {
        let path = self.path(&format!("{name}.toml"));
        let features = std::fs::read_to_string(self.path(&format!("data/{name}.csv")))
            .ok()
            .and_then(|text| text.lines().next().map(|l| l.split(',').count().saturating_sub(1)))
            .filter(|&n| n > 0)
            .map_or_else(String::new, |n| format!("features = {n}\n"));
        let text = format!(
            "coordinator = \"https://{}\"\nca = \"pki/ca.pem\"\ncert = \"pki/parties/{name}.pem\"\nkey = \"pki/parties/{name}.key\"\n\
             [datasets.data]\npath = \"data/{name}.csv\"\n{features}[reconnect]\ninitial_ms = 100\nmax_ms = 500\n{extra}",
            self.addr
        );
        std::fs::write(&path, text).expect("party config");
        path
    }

    /// Issues relay `name`'s certificate, starts `confide relay` towards the
    /// coordinator and returns the address parties dial it at.
    pub fn start_relay(&mut self, name: &str) -> String {
        let coordinator = format!("https://{}", self.addr);
        self.start_relay_to(name, &coordinator)
    }

    /// [`Federation::start_relay`] with `upstream` as the coordinator's URL
    /// (to test a relay pointed at a server that is not the coordinator).
    pub fn start_relay_to(&mut self, name: &str, upstream: &str) -> String {
        self.run_ok(&["certs", "relay", "--dir", &self.s("pki"), "--name", name]);
        let out_path = self.path(&format!("logs/relay-{name}.out"));
        let child = Command::new(&self.coordinator_bin)
            .args([
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--coordinator",
                upstream,
                "--ca",
                &self.s("pki/ca.pem"),
                "--cert",
                &self.s(&format!("pki/relays/{name}.pem")),
                "--key",
                &self.s(&format!("pki/relays/{name}.key")),
                "--hold-secs",
                "20",
            ])
            .env("CONFIDE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("log file"))
            .stderr(append(&self.path(&format!("logs/relay-{name}.log"))))
            .spawn()
            .expect("spawn relay");
        self.relays.insert(name.to_string(), child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.strip_prefix("relay listening on ")) {
                return addr.trim().to_string();
            }
            assert!(Instant::now() < deadline, "relay {name} did not start\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts one party process that dials relay `relay` (named in its
    /// config, as a party must to delegate to it) at `addr` instead of the
    /// coordinator.
    pub fn start_party_via(&mut self, name: &str, relay: &str, addr: &str, extra: &str) {
        let cfg = self.party_config(name, extra);
        let text = std::fs::read_to_string(&cfg).expect("party config");
        let text = text.replacen(
            &format!("coordinator = \"https://{}\"", self.addr),
            &format!("coordinator = \"https://{addr}\"\nrelay = \"{relay}\""),
            1,
        );
        std::fs::write(&cfg, text).expect("party config");
        self.start_party_with_config(name, &cfg);
    }

    /// Starts one party process.
    pub fn start_party(&mut self, name: &str, extra: &str) {
        let cfg = self.party_config(name, extra);
        self.start_party_with_config(name, &cfg);
    }

    /// Starts one party process with the config file `cfg`.
    pub fn start_party_with_config(&mut self, name: &str, cfg: &Path) {
        let child = Command::new(&self.party_bin)
            .args(["run", "--config", cfg.to_str().expect("utf-8")])
            .env("CONFIDE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append(&self.path(&format!("logs/{name}.log"))))
            .spawn()
            .expect("spawn party");
        self.parties.insert(name.to_string(), child);
    }

    /// The `/metrics` address party `name` logged (its config set
    /// `[metrics] listen`), waiting up to 20 s for it.
    pub fn party_metrics_addr(&self, name: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(self.path(&format!("logs/{name}.log"))).unwrap_or_default();
            if let Some(rest) = log.split("metrics at http://").nth(1)
                && let Some(addr) = rest.split("/metrics").next()
            {
                return addr.to_string();
            }
            assert!(Instant::now() < deadline, "party {name} did not serve metrics\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts every party.
    pub fn start_parties(&mut self) {
        for n in self.names.clone() {
            self.start_party(&n, "");
        }
    }

    /// Kills one party at once (SIGKILL).
    pub fn kill_party(&mut self, name: &str) {
        if let Some(mut c) = self.parties.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. "STOP", "CONT") to every party process.
    pub fn signal_parties(&self, signal: &str) {
        for c in self.parties.values() {
            let ok = Command::new("kill").args([&format!("-{signal}"), &c.id().to_string()]).status();
            assert!(ok.is_ok_and(|s| s.success()), "kill -{signal} failed");
        }
    }

    /// Writes a job spec and submits it; returns the job id.
    pub fn submit(&self, file: &str, spec: &str) -> String {
        let path = self.path(file);
        std::fs::write(&path, spec).expect("spec");
        self.run_ok(&["job", "submit", path.to_str().expect("utf-8")]).trim().to_string()
    }

    /// `confide job status ID --json`, parsed.
    pub fn status(&self, id: &str) -> Value {
        let text = self.run_ok(&["job", "status", id, "--json"]);
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Polls the status until `pred` holds; panics with the logs after `secs`.
    pub fn wait_for(&self, id: &str, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.status(id);
            if pred(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {st:#}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for the job to end and returns its final status.
    pub fn wait_done(&self, id: &str, secs: u64) -> Value {
        self.wait_for(id, secs, "the job to end", |s| {
            matches!(s["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
    }

    /// Downloads a job's model and returns the safetensors bytes.
    pub fn model(&self, id: &str) -> Vec<u8> {
        let out = self.path(&format!("{id}.safetensors"));
        self.run_ok(&["job", "model", id, "--out", out.to_str().expect("utf-8")]);
        std::fs::read(out).expect("model file")
    }

    /// Every log file, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(self.path("logs")) {
            let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                s.push_str(&format!("---- {} (last lines)\n", p.display()));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// The address party `party`'s prediction endpoint logged at start
    /// (`[serve] listen`, possibly port 0).
    pub fn party_endpoint(&self, party: &str) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(self.path(&format!("logs/{party}.log"))).unwrap_or_default();
            if let Some(addr) = log
                .lines()
                .filter(|l| l.contains("prediction endpoint listening"))
                .find_map(|l| l.split("bound=").nth(1).and_then(|a| a.split_whitespace().next()?.parse().ok()))
            {
                return addr;
            }
            assert!(Instant::now() < deadline, "no prediction endpoint at {party}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `confide-bench load`: `clients` keep-alive clients sending
    /// party `party`'s rows, one per request, to `service` at `addr` for
    /// `seconds`.
    pub fn start_load(&self, addr: &str, service: &str, party: &str, clients: usize, seconds: u32) -> Load {
        let child = Command::new(self.bin.join("confide-bench"))
            .args(["load", "--addr", addr, "--service", service, "--data", &self.s(&format!("data/{party}.csv"))])
            .args(["--clients", &clients.to_string(), "--seconds", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("confide-bench load");
        Load(child)
    }

    /// Waits until the coordinator's log says `what`, at most `secs`
    /// seconds (blocking: from async tests, inside `block_in_place`).
    pub fn wait_for_log(&self, what: &str, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !self.coordinator_log().contains(what) {
            assert!(std::time::Instant::now() < deadline, "no {what:?} within {secs} s:\n{}", self.coordinator_log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The coordinator's log so far.
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.path("logs/coordinator.log")).unwrap_or_default()
    }
}

/// A running `confide dashboard` ([`Federation::start_dashboard`]),
/// stopped on drop.
pub struct Dashboard {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The run's token, from the address it printed to open.
    pub token: String,
}

impl Dashboard {
    /// The `Cookie` header line (CRLF-ended) a browser holds after opening
    /// the printed address.
    pub fn cookie(&self) -> String {
        let port = self.addr.rsplit(':').next().unwrap_or_default();
        format!("Cookie: confide_dashboard_{port}={}\r\n", self.token)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Federation {
    /// Starts `confide dashboard` on a free loopback port, with the
    /// administrator's PKI, against this federation's coordinator.
    pub fn start_dashboard(&self) -> Dashboard {
        let out_path = self.path("logs/dashboard.out");
        let child = Command::new(self.bin.join("confide"))
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .env("CONFIDE_COORDINATOR", format!("https://{}", self.addr))
            .env("CONFIDE_PKI", self.path("pki"))
            .env("CONFIDE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("log file"))
            .stderr(append(&self.path("logs/dashboard.log")))
            .spawn()
            .expect("spawn the dashboard");
        let mut d = Dashboard { child, addr: String::new(), token: String::new() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            let addr = text.lines().find_map(|l| l.strip_prefix("dashboard listening on http://"));
            let token = text.lines().find_map(|l| l.strip_prefix("open http://")?.split_once("/?token=").map(|t| t.1));
            if let (Some(a), Some(t)) = (addr, token) {
                d.addr = a.trim().to_owned();
                d.token = t.trim().to_owned();
                return d;
            }
            assert!(Instant::now() < deadline, "the dashboard did not start\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `confide-bench load` ([`Federation::start_load`]).
pub struct Load(Child);

impl Load {
    /// Waits for the run to end and returns its JSON report.
    pub fn report(self) -> Value {
        let out = self.0.wait_with_output().expect("load");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("load report: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(path).expect("log file")
}

impl Drop for Federation {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.parties).into_iter().chain(std::mem::take(&mut self.relays)) {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_coordinator();
    }
}

/// A job spec over the federation's parties with the given settings.
pub fn job_spec(names: &[String], min: usize, rounds: u32, model: &str, training: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "name = \"e2e\"\nkind = \"train\"\nrounds = {rounds}\n[parties]\nnames = [{}]\nmin = {min}\ndataset = \"data\"\n\
         [model]\n{model}\n[training]\n{training}\n[timeouts]\nrecruit_secs = 30\nround_secs = 30\n",
        names.join(", ")
    )
}

/// FedAvg computed without the federation: each round, every trainer starts
/// from `global`, trains, and the example-weighted mean is taken here, in f64.
pub fn independent_fedavg(
    trainers: &mut [Box<dyn Trainer>],
    global: Parameters,
    train: &TrainConfig,
    rounds: u32,
) -> Parameters {
    independent_fedavg_with(trainers, global, |_| train.clone(), rounds)
}

/// [`independent_fedavg`] with round `t`'s training settings from `train_for(t)`.
pub fn independent_fedavg_with(
    trainers: &mut [Box<dyn Trainer>],
    mut global: Parameters,
    train_for: impl Fn(u32) -> TrainConfig,
    rounds: u32,
) -> Parameters {
    for round in 1..=rounds {
        let train = train_for(round);
        let mut sum = vec![0f64; global.num_values()];
        let mut total = 0u64;
        for t in trainers.iter_mut() {
            t.set_parameters(&global).expect("set parameters");
            let out = t.fit(&FitConfig { round, train: train.clone() }).expect("fit");
            for (s, v) in sum.iter_mut().zip(t.parameters().expect("parameters").flat_values()) {
                *s += out.num_examples as f64 * f64::from(v);
            }
            total += out.num_examples;
        }
        let flat: Vec<f32> = sum.iter().map(|s| (s / total as f64) as f32).collect();
        global = Parameters::from_flat(&global.spec(), &flat).expect("flat parameters");
    }
    global
}

/// The initial global model as the coordinator's setup stage makes it: the
/// first trainer's parameters with feature statistics merged over all of them.
pub fn standardised_start(trainers: &[Box<dyn Trainer>]) -> Parameters {
    let mut stats = FeatureStats::default();
    for t in trainers {
        stats.merge(&t.feature_stats()).expect("feature statistics");
    }
    let mut global = trainers.first().expect("a trainer").parameters().expect("parameters");
    apply_feature_stats(&mut global, &stats).expect("apply statistics");
    global
}

/// The largest absolute difference between two models' values (same spec).
pub fn max_abs_diff(a: &Parameters, b: &Parameters) -> f32 {
    assert_eq!(a.spec(), b.spec(), "the models differ in names or shapes");
    a.flat_values().zip(b.flat_values()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}
