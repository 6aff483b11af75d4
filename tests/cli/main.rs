//! End-to-end tests of the `kvq` command line.

mod bench;
mod check_config;
mod eval;
mod serve;
