//! End-to-end tests of the `kvq` command line.

mod bench;
mod bench_throughput;
mod check_config;
mod eval;
mod serve;
