//! `confide-party`: the party node a hospital runs next to its data.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use confide_party::config::PartyConfig;
use confide_party::node::PartyNode;
use confide_party::trainers::BuiltinTrainers;

/// Confide party node: dials out to the coordinator and trains next to private data.
#[derive(Parser, Debug)]
#[command(name = "confide-party", version, about)]
struct Cli {
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
    /// Check the config file and load every data set, then exit.
    Check {
        /// The party's config file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONFIDE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => match PartyConfig::load(&config) {
            Ok(cfg) => {
                let node = PartyNode::new(cfg, Arc::new(BuiltinTrainers));
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
        Command::Check { config } => match PartyConfig::load(&config) {
            Ok(cfg) => {
                let mut code = 0;
                for (name, src) in &cfg.datasets {
                    match src.load() {
                        Ok(ds) => println!("data set {name}: {} rows, {} features", ds.len(), ds.num_features),
                        Err(e) => {
                            eprintln!("data set {name}: {e}");
                            code = 1;
                        }
                    }
                }
                code
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}
