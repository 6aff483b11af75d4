//! Compiles every kernel source for every supported architecture with NVRTC. Needs no GPU,
//! only `libnvrtc` (CI installs it from PyPI: see `.ci/run`). Without NVRTC the test says so
//! and passes, unless `KVQ_REQUIRE_NVRTC=1`.
#![cfg(feature = "cuda")]

use kernels::nvrtc::{compile, nvrtc_available};
use kernels::spec::compile_check_set;
use kernels::spec::MODEL_ENTRIES;
use kernels::{KernelKind, Specialization, SUPPORTED_ARCHS};

#[test]
fn every_kernel_compiles_for_every_supported_arch() {
    if !nvrtc_available() {
        if std::env::var("KVQ_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("KVQ_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (is LD_LIBRARY_PATH set?)");
        }
        eprintln!("skipping: libnvrtc not found (set KVQ_REQUIRE_NVRTC=1 to make this an error)");
        return;
    }
    let mut built = 0;
    let t0 = std::time::Instant::now();
    for arch in SUPPORTED_ARCHS {
        for spec in compile_check_set() {
            for kind in KernelKind::ALL {
                if kind == KernelKind::Decode && spec.check_decode().is_err() {
                    continue;
                }
                let src = spec.source(kind);
                let ptx = compile(&src, arch).unwrap_or_else(|e| panic!("{e}"));
                for entry in match kind {
                    KernelKind::Store => &["kvq_store_kv", "kvq_fill_normal"][..],
                    KernelKind::Decode => &["kvq_decode_split", "kvq_decode_reduce"][..],
                    KernelKind::Model => unreachable!("not in KernelKind::ALL"),
                } {
                    assert!(
                        ptx.contains(&format!(".entry {entry}")),
                        "{} for {arch}: no entry {entry}",
                        src.name
                    );
                }
                built += 1;
            }
        }
    }
    for arch in SUPPORTED_ARCHS {
        let src = Specialization::MODEL.source(KernelKind::Model);
        let ptx = compile(&src, arch).unwrap_or_else(|e| panic!("{e}"));
        for entry in MODEL_ENTRIES {
            assert!(
                ptx.contains(&format!(".entry {entry}")),
                "{} for {arch}: no entry {entry}",
                src.name
            );
        }
        built += 1;
    }
    eprintln!(
        "compiled {built} kernel modules for {SUPPORTED_ARCHS:?} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
