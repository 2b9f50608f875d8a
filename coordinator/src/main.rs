//! `confide`: the coordinator and the data scientist's CLI.

fn main() {
    confide_coordinator::cli::main_with(confide_coordinator::plugins::Plugins::default())
}
