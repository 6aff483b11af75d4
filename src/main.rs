//! The `kvq` command.

mod cli;

fn main() -> std::process::ExitCode {
    // NCCL's NVLink multicast (NVLS) stays off in every kvq process (tensor parallelism), set
    // here before any thread starts; `kernels::tp::TpGroup` forces it again.
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    cli::run()
}
