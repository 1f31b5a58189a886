//! Builds the kernel programs (`aegis-ebpf`) with aya-build and leaves the object at
//! `$OUT_DIR/aegis`, where `src/ebpf` embeds it.
//!
//! Building them needs the `nightly` toolchain with `rust-src` and `bpf-linker` (installed by
//! `cargo xtask setup`). Where any is missing, or `AEGIS_EBPF_PREBUILT=1`, the committed object
//! `aegis-ebpf/prebuilt/aegis.bpf.o` is used instead; `cargo xtask ebpf --check` fails in CI
//! when that object is stale.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AEGIS_EBPF_PREBUILT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("aegis-agent has no parent directory")?;
    let prebuilt = root.join("aegis-ebpf/prebuilt/aegis.bpf.o");
    println!("cargo:rerun-if-changed={}", prebuilt.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("aegis");

    let forced = env::var("AEGIS_EBPF_PREBUILT").is_ok_and(|v| v == "1");
    match (forced, missing_toolchain()) {
        (false, None) => {
            // The kernel programs are built from aegis-ebpf *and* the types in aegis-common;
            // aya-build watches only the former.
            println!(
                "cargo:rerun-if-changed={}",
                root.join("aegis-common/src").display()
            );
            let ebpf_dir = root.join("aegis-ebpf");
            let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
            let package = aya_build::Package {
                name: "aegis-ebpf",
                root_dir: ebpf_dir,
                ..Default::default()
            };
            aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
        }
        (forced, missing) => {
            let why = if forced {
                "AEGIS_EBPF_PREBUILT=1".to_owned()
            } else {
                missing.unwrap_or_default()
            };
            println!(
                "cargo:warning=using the committed kernel object {} ({why})",
                prebuilt.display()
            );
            fs::copy(&prebuilt, &out).map(drop).with_context(|| {
                anyhow!(
                    "copying {} (run `cargo xtask ebpf` to create it)",
                    prebuilt.display()
                )
            })
        }
    }
}

/// Names what is missing to build the kernel programs from source, if anything.
fn missing_toolchain() -> Option<String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("bpf-linker is not installed".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    let Ok(sysroot) = sysroot.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()) else {
        return Some("rustup is not installed".into());
    };
    if sysroot.is_empty() {
        return Some("the nightly toolchain is not installed".into());
    }
    let src = PathBuf::from(sysroot).join("lib/rustlib/src/rust/library");
    (!src.is_dir()).then(|| "rust-src is not installed for nightly".into())
}
