//! `confide-party`: the party node a hospital runs next to its data.

fn main() {
    confide_party::cli::main_with(confide_party::plugins::PartyPlugins::default())
}
