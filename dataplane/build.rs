//! Builds the XDP program in `../dataplane-ebpf` for `bpfel-unknown-none`
//! with aya-build (`cargo +nightly build -Z build-std=core`, linked by
//! bpf-linker) into `OUT_DIR/mvc-xdp`, which `src/xdp/mod.rs` embeds.
//!
//! When the BPF toolchain (nightly with rust-src, bpf-linker) is missing, the
//! host crate still builds: the reason is passed to the crate as
//! `MVC_XDP_UNAVAILABLE` and `--datapath auto` falls back to TAP and says why.
//! Set `MVC_REQUIRE_XDP=1` to make a failed eBPF build fail the build (CI).

use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mvc_xdp_built)");
    println!("cargo:rerun-if-env-changed=MVC_REQUIRE_XDP");
    println!("cargo:rerun-if-changed=build.rs");
    // The program's sources: without these a changed program kept the old object.
    for path in [
        "../dataplane-ebpf/src",
        "../dataplane-ebpf/Cargo.toml",
        "../dataplane-ebpf/common/src",
        "../dataplane-ebpf/common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let required = env::var("MVC_REQUIRE_XDP").is_ok_and(|v| v == "1" || v == "true");
    match build() {
        Ok(()) => println!("cargo:rustc-cfg=mvc_xdp_built"),
        Err(reason) => {
            let reason = reason.replace(['\n', '\r'], " ");
            if required {
                panic!("MVC_REQUIRE_XDP is set and the XDP program did not build: {reason}");
            }
            println!("cargo:warning=XDP datapath disabled: {reason}");
            println!("cargo:rustc-env=MVC_XDP_UNAVAILABLE={reason}");
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ebpf_dir = manifest_dir
        .join("../dataplane-ebpf")
        .canonicalize()
        .map_err(|e| format!("dataplane-ebpf not found: {e}"))?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or("dataplane-ebpf path is not UTF-8")?
        .to_owned();
    // aya-build runs `cargo build --package dataplane-ebpf` in the current
    // directory; dataplane-ebpf is its own workspace (the host workspace
    // excludes it), so run it from there.
    env::set_current_dir(&ebpf_dir).map_err(|e| format!("cd {root_dir}: {e}"))?;
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?).join("mvc-xdp");
    // A stale object from an earlier run must not pass for this one.
    let _ = std::fs::remove_file(&out);
    let package = aya_build::Package {
        name: "dataplane-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .map_err(|e| format!("eBPF build failed (needs nightly rust-src and bpf-linker): {e:#}"))?;
    if !out.exists() {
        return Err("eBPF build skipped (AYA_BUILD_SKIP)".into());
    }
    Ok(())
}
