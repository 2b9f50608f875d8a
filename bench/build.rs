//! Links libtorch: see scripts/libtorch-build.rs.
include!("../scripts/libtorch-build.rs");

fn main() {
    link_libtorch();
}
