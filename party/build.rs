//! Links libtorch: see scripts/libtorch-build.rs.
include!("../scripts/libtorch-build.rs");

fn main() {
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        link_libtorch();
    }
}
