//! Library side of `confide-bench`: the HTTP load generator that the
//! `serve` and `load` commands, the serving end-to-end tests and
//! `scripts/demo-lifecycle.sh` drive prediction endpoints with.

pub mod loadgen;
