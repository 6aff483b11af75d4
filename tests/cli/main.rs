//! End-to-end tests of the `kvq` command line.

mod check_config;
