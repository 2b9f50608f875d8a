// Found only when libtorch is not set up: .cargo/config.toml puts this
// directory last on the C++ include path (CPLUS_INCLUDE_PATH), after
// libtorch's own headers, so torch-sys's build stops here with the fix.
#error "libtorch is not set up: run `scripts/setup-libtorch` (make build, make test and make demo run it for you), or build without libtorch: cargo build -p confide-party --no-default-features"
#include "confide-stop-libtorch-is-not-set-up"
