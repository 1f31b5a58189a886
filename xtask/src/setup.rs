//! `cargo xtask setup`: checks every prerequisite and installs what is missing, printing one
//! line per prerequisite (present / installed / missing, with how to get it).
//!
//! Invariants: nothing is installed or updated when already present (so a second run is quick
//! and offline); `apt-get update` runs only when a package must be installed; the `nightly`
//! toolchain is never installed or updated, only given `rust-src` and `bpf-linker`. Without root
//! or apt, what can't be installed is reported and the remaining checks still run.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::cmd::{self, nightly, probe};

/// The bpf-linker release that works with the preinstalled nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Where the agent pins links and maps.
const BPFFS: &str = "/sys/fs/bpf";

/// System tools the tests and demo drive, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("dnsmasq", "dnsmasq-base"),
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("dnsperf", "dnsperf"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("nginx", "nginx"),
    ("node", "nodejs"),
    ("nsenter", "util-linux"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
];

/// The virtualenv holding kmock, the Kubernetes API emulator of the pod identity tests
/// (`tests/src/kube.rs` runs `<venv>/bin/python`).
const KMOCK_VENV: &str = "/opt/aegis-tests/kmock";
/// The kmock release those tests are written against (from PyPI).
const KMOCK_VERSION: &str = "0.8";

/// Debian's policy hook for maintainer scripts: while it exits 101, installing a package never
/// starts its system service (nginx's). The benches run their own nginx instances only.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// What happened to one prerequisite.
enum Status {
    Present(String),
    Installed,
    Missing(String),
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Present(detail) if detail.is_empty() => f.write_str("present"),
            Self::Present(detail) => write!(f, "present ({detail})"),
            Self::Installed => f.write_str("installed"),
            Self::Missing(how) => write!(f, "MISSING: {how}"),
        }
    }
}

/// Runs the whole setup; fails at the end if a prerequisite of the tests is still missing.
/// A missing eBPF toolchain is not an error: the agent build falls back to the committed object.
pub fn run() -> Result<()> {
    let root = is_root();
    let apt = find_binary("apt-get").is_some();
    let mut missing = Vec::new();
    let mut report = |name: &str, status: Status, required: bool| {
        println!("{name:<26} {status}");
        if required && matches!(status, Status::Missing(_)) {
            missing.push(name.to_owned());
        }
    };

    for (name, status) in tools(root, apt) {
        report(name, status, true);
    }
    report("rustfmt, clippy", rust_components(), true);
    report(
        &format!("kmock {KMOCK_VERSION} (PyPI)"),
        kmock(root, apt),
        true,
    );

    let toolchain = EbpfToolchain::probe();
    let nightly_status = match &toolchain.nightly {
        Some(version) => Status::Present(version.clone()),
        None => Status::Missing(
            "no `nightly` toolchain; not installing one (a new nightly's LLVM breaks bpf-linker \
             0.10.4): `cargo xtask ebpf` is unavailable and the agent build falls back to the \
             committed aegis-ebpf/prebuilt/aegis.bpf.o"
                .into(),
        ),
    };
    report("nightly toolchain", nightly_status, false);
    if toolchain.nightly.is_some() {
        report("nightly rust-src", rust_src(&toolchain), false);
        report(
            &format!("bpf-linker {BPF_LINKER_VERSION}"),
            bpf_linker(&toolchain),
            false,
        );
    }
    report(&format!("bpffs at {BPFFS}"), bpffs(root), true);

    if !missing.is_empty() {
        bail!("setup incomplete, missing: {}", missing.join(", "));
    }
    Ok(())
}

/// The state of the toolchain that builds the kernel programs from source.
pub struct EbpfToolchain {
    /// `rustc +nightly --version`, with its LLVM version, if a `nightly` toolchain is installed.
    pub nightly: Option<String>,
    /// Whether the nightly's `rust-src` (needed by `-Z build-std=core`) is installed.
    pub rust_src: bool,
    /// Whether `bpf-linker` on `PATH` is version [`BPF_LINKER_VERSION`].
    pub bpf_linker: bool,
}

impl EbpfToolchain {
    /// Looks at what is installed, installing nothing.
    pub fn probe() -> Self {
        let nightly = has_nightly().then(nightly_version).flatten();
        let rust_src = nightly.is_some() && rust_src_dir().is_some_and(|dir| dir.is_dir());
        let bpf_linker = probe(Command::new("bpf-linker").arg("--version"))
            .is_some_and(|v| v.split_whitespace().last() == Some(BPF_LINKER_VERSION));
        Self {
            nightly,
            rust_src,
            bpf_linker,
        }
    }

    /// Why the kernel programs can't be built from source, if they can't.
    pub fn unavailable(&self) -> Option<String> {
        let missing: Vec<_> = [
            (self.nightly.is_none(), "the `nightly` toolchain".to_owned()),
            (!self.rust_src, "nightly's rust-src component".to_owned()),
            (!self.bpf_linker, format!("bpf-linker {BPF_LINKER_VERSION}")),
        ]
        .into_iter()
        .filter_map(|(absent, what)| absent.then_some(what))
        .collect();
        (!missing.is_empty())
            .then(|| format!("missing {} (see `cargo xtask setup`)", missing.join(", ")))
    }
}

fn tools(root: bool, apt: bool) -> Vec<(&'static str, Status)> {
    let absent: Vec<_> = TOOLS
        .iter()
        .filter(|(bin, _)| find_binary(bin).is_none())
        .collect();
    let packages: Vec<_> = absent.iter().map(|(_, package)| *package).collect();
    let install = format!("apt-get install -y {}", packages.join(" "));
    let attempted =
        !absent.is_empty() && root && apt && attempt(Command::new("apt-get").arg("update")) && {
            let _no_starts = NoServiceStarts::install();
            attempt(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(&packages)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
    TOOLS
        .iter()
        .map(|&(bin, package)| {
            let status = if !absent.iter().any(|(b, _)| *b == bin) {
                Status::Present(String::new())
            } else if attempted && find_binary(bin).is_some() {
                Status::Installed
            } else if !apt {
                Status::Missing(format!(
                    "no apt-get (not Debian/Ubuntu): install the package providing `{bin}` \
                     (Debian: {package})"
                ))
            } else if !root {
                Status::Missing(format!("run as root, or: sudo {install}"))
            } else {
                Status::Missing(format!("`{install}` did not provide `{bin}`"))
            };
            (bin, status)
        })
        .collect()
}

/// A [`POLICY_RC_D`] that forbids service starts, written for the duration of an install when
/// the machine has none (an existing one is left alone), removed on drop.
struct NoServiceStarts {
    written: bool,
}

impl NoServiceStarts {
    fn install() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Self { written: false };
        }
        let written = fs::write(
            path,
            "#!/bin/sh\n# written by cargo xtask setup\nexit 101\n",
        )
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o755)))
        .inspect_err(|e| eprintln!("writing {POLICY_RC_D}: {e}"))
        .is_ok();
        Self { written }
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.written
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("removing {POLICY_RC_D}: {e}");
        }
    }
}

/// rustfmt and clippy for the toolchain running `cargo xtask` (used by `cargo xtask test`).
fn rust_components() -> Status {
    let present = || {
        ["fmt", "clippy"]
            .iter()
            .all(|sub| probe(cmd::cargo().args([sub, "--version"])).is_some())
    };
    if present() {
        return Status::Present(String::new());
    }
    if attempt(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"])) && present()
    {
        Status::Installed
    } else {
        Status::Missing("rustup component add rustfmt clippy".into())
    }
}

fn rust_src(toolchain: &EbpfToolchain) -> Status {
    if toolchain.rust_src {
        return Status::Present(String::new());
    }
    let add = ["component", "add", "rust-src", "--toolchain", "nightly"];
    let mut rustup = Command::new("rustup");
    rustup.args(add).env("RUSTUP_AUTO_INSTALL", "0");
    if attempt(&mut rustup) && rust_src_dir().is_some_and(|dir| dir.is_dir()) {
        Status::Installed
    } else {
        Status::Missing(format!("rustup {}", add.join(" ")))
    }
}

fn bpf_linker(toolchain: &EbpfToolchain) -> Status {
    if toolchain.bpf_linker {
        return Status::Present(String::new());
    }
    let crate_ = format!("bpf-linker@{BPF_LINKER_VERSION}");
    if attempt(nightly("cargo").args(["install", &crate_, "--locked"]))
        && EbpfToolchain::probe().bpf_linker
    {
        Status::Installed
    } else {
        Status::Missing(format!(
            "cargo +nightly install {crate_} --locked (and put ~/.cargo/bin on PATH)"
        ))
    }
}

/// kmock in its own virtualenv ([`KMOCK_VENV`]), made with the system python3 (Debian's needs
/// `python3-venv` for that, installed when missing).
fn kmock(root: bool, apt: bool) -> Status {
    let python = Path::new(KMOCK_VENV).join("bin/python");
    let installed = || {
        probe(Command::new(&python).args(["-c", "import kmock; print(kmock.__version__)"]))
            .is_some_and(|v| v.trim() == KMOCK_VERSION)
    };
    if installed() {
        return Status::Present(KMOCK_VENV.into());
    }
    let system_python = Some(PathBuf::from("/usr/bin/python3"))
        .filter(|p| p.is_file())
        .or_else(|| find_binary("python3"));
    let Some(system_python) = system_python else {
        return Status::Missing("no python3 to make the virtualenv with".into());
    };
    let steps = format!(
        "{} -m venv {KMOCK_VENV} && {KMOCK_VENV}/bin/pip install kmock=={KMOCK_VERSION}",
        system_python.display()
    );
    if !root {
        return Status::Missing(format!("run as root, or: sudo sh -c '{steps}'"));
    }
    let make_venv = || {
        attempt(
            Command::new(&system_python)
                .args(["-m", "venv", "--clear"])
                .arg(KMOCK_VENV),
        )
    };
    let venv = make_venv()
        || (apt
            && attempt(Command::new("apt-get").arg("update"))
            && attempt(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends", "python3-venv"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
            && make_venv());
    let pip = Path::new(KMOCK_VENV).join("bin/pip");
    if venv
        && attempt(Command::new(pip).args([
            "install",
            "--quiet",
            &format!("kmock=={KMOCK_VERSION}"),
        ]))
        && installed()
    {
        Status::Installed
    } else {
        Status::Missing(steps)
    }
}

fn bpffs(root: bool) -> Status {
    if bpffs_mounted() {
        return Status::Present(String::new());
    }
    let mount = format!("mount -t bpf bpf {BPFFS}");
    if !root {
        return Status::Missing(format!("run as root, or: sudo {mount}"));
    }
    if attempt(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])) && bpffs_mounted() {
        Status::Installed
    } else {
        Status::Missing(mount)
    }
}

/// Runs an installing command, reporting (not propagating) its failure.
fn attempt(cmd: &mut Command) -> bool {
    cmd::run(cmd)
        .inspect_err(|err| eprintln!("{err:#}"))
        .is_ok()
}

/// Whether `/proc/self/mountinfo` lists a filesystem of type `bpf` mounted at [`BPFFS`].
fn bpffs_mounted() -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // `id parent major:minor root mount-point options [optional…] - fstype source super-options`
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        left.split(' ').nth(4) == Some(BPFFS) && right.split(' ').next() == Some("bpf")
    })
}

/// Whether rustup has the plain `nightly` channel toolchain (not a dated one) for this host.
fn has_nightly() -> bool {
    probe(Command::new("rustup").args(["toolchain", "list"])).is_some_and(|list| {
        list.lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(|name| {
                name.strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
            })
    })
}

/// `rustc 1.97.0-nightly (… 2026-05-19), LLVM 22.1.4`.
fn nightly_version() -> Option<String> {
    let verbose = probe(nightly("rustc").arg("-vV"))?;
    let field = |key: &str| {
        verbose
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let version = verbose.lines().next()?.to_owned();
    Some(match field("LLVM version:") {
        Some(llvm) => format!("{version}, LLVM {llvm}"),
        None => version,
    })
}

fn rust_src_dir() -> Option<PathBuf> {
    let sysroot = probe(nightly("rustc").args(["--print", "sysroot"]))?;
    Some(Path::new(&sysroot).join("lib/rustlib/src/rust/library"))
}

/// Whether the effective user is root, from `/proc/self/status`.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Finds `name` on `PATH` or in the sbin directories (often missing from a user's `PATH`).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
}
