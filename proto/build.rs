//! Compiles `proto/confide.proto` with protox (pure Rust, no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/confide.proto");
    let fds = protox::compile(["proto/confide.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Chunks of one vector are slices of one shared buffer: sending a
        // model to n parties does not copy it n times.
        .bytes(".confide.v1.Chunk.data")
        .bytes(".confide.v1.ModelPart.data")
        .compile_fds(fds)?;
    Ok(())
}
