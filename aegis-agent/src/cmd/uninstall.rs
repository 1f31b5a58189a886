//! `aegis-agent uninstall`: removes pinned programs, links and maps, and the cgroups Aegis
//! created. Enforcement stops for every workload; run it only after stopping the agent.

use std::{fs, process::ExitCode, time::Duration};

use anyhow::Context as _;

use crate::{cgroup, cli::UninstallArgs, ebpf};

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<ExitCode> {
    ebpf::uninstall(&args.bpffs)?;
    println!("removed pins under {}", args.bpffs.display());
    let root = cgroup::cgroup2_mount()?.join(&args.cgroup_root);
    if root.exists() {
        let exec = root.join("exec");
        if let Ok(entries) = fs::read_dir(&exec) {
            for entry in entries.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
                cgroup::remove(&entry.path(), Duration::from_secs(5))?;
                println!("removed cgroup {}", entry.path().display());
            }
        }
        cgroup::remove(&exec, Duration::from_secs(5))?;
        cgroup::remove(&root, Duration::from_secs(5))
            .with_context(|| format!("removing {}", root.display()))?;
        println!("removed cgroup {}", root.display());
    }
    Ok(ExitCode::SUCCESS)
}
