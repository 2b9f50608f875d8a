// Shared by the build scripts of the packages that link libtorch (`include!`d).
//
// Fails early, with the fix, when libtorch is not set up (instead of a C++
// header error from torch-sys), and adds libtorch's directory to the rpath of
// the package's binaries, tests and examples so they run without
// LD_LIBRARY_PATH.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(dir) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        eprintln!("error: LIBTORCH is not set; run `scripts/setup-libtorch` (make build/test/demo do it for you)");
        std::process::exit(1);
    };
    let lib = dir.join("lib");
    println!("cargo:rerun-if-changed={}", lib.join("libtorch_cpu.so").display());
    if !lib.join("libtorch_cpu.so").exists() {
        eprintln!(
            "error: libtorch is not set up: {} is missing.\n\
             Run `scripts/setup-libtorch` once (make build/test/demo do it for you),\n\
             or build without libtorch: `cargo build -p confide-party --no-default-features`.",
            lib.join("libtorch_cpu.so").display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
