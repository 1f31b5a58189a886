//! Workload identities: which cgroup belongs to which (agent, tenant).
//!
//! Sources implement [`IdentitySource`] and report the cgroups they know with their identity.
//! Two exist today: [`StaticFile`] (hosts without Kubernetes: a YAML file mapping cgroup paths
//! to identities) and [`ExecCgroups`] (cgroups made by `aegis-agent exec`, whose directory
//! names carry the identity, so an agent restarting finds them again). [`kube::KubePods`] is the
//! third: pods on this node, from the Kubernetes API server.
//!
//! The numeric identity the kernel sees is the 32-bit FNV-1a hash of `agent/tenant`: stable
//! across restarts and nodes without any stored state. A collision between two identities in
//! use is refused by the registry rather than letting them share an allowlist.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::policy::Name;

pub mod kube;

/// Tenant of identities that name none.
pub const DEFAULT_TENANT: &str = "default";

/// An agent workload's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub agent: Name,
    pub tenant: Name,
}

impl Identity {
    /// Builds an identity from names, validating them.
    ///
    /// # Errors
    /// A name outside the accepted shape (see [`Name`]).
    pub fn new(agent: &str, tenant: Option<&str>) -> Result<Identity, String> {
        Ok(Identity {
            agent: Name::try_from(agent.to_owned())?,
            tenant: Name::try_from(tenant.unwrap_or(DEFAULT_TENANT).to_owned())?,
        })
    }

    /// The numeric identity written to the kernel maps (never 0).
    pub fn id(&self) -> u32 {
        let key = format!("{}/{}", self.agent, self.tenant);
        aegis_common::fnv1a32(key.as_bytes()).max(1)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.agent, self.tenant)
    }
}

/// A cgroup (absolute path in the cgroup2 mount) and the identity of everything in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityCgroup {
    pub path: PathBuf,
    pub identity: Identity,
}

/// Errors of identity sources, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A remote source (the API server) has not answered yet.
    #[error("{what}: {message}")]
    Unavailable { what: &'static str, message: String },
}

/// Something that knows which cgroups carry which identity.
pub trait IdentitySource: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Every cgroup the source currently knows.
    ///
    /// # Errors
    /// The source cannot be read; the caller keeps what it had.
    fn cgroups(&self) -> Result<Vec<IdentityCgroup>, IdentityError>;
}

// === impl StaticFile ===

/// Identities from a YAML file:
///
/// ```yaml
/// identities:
///   - cgroup: /system.slice/agents.slice/finance.service   # below the cgroup2 mount
///     agent: finance-agent
///     tenant: acme                                         # optional
/// ```
pub struct StaticFile {
    path: PathBuf,
    cgroup2: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    identities: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    cgroup: PathBuf,
    agent: Name,
    #[serde(default)]
    tenant: Option<Name>,
}

impl StaticFile {
    /// A source reading `path`, resolving cgroup paths below the `cgroup2` mount.
    pub fn new(path: PathBuf, cgroup2: PathBuf) -> StaticFile {
        StaticFile { path, cgroup2 }
    }
}

impl IdentitySource for StaticFile {
    fn name(&self) -> &'static str {
        "static-file"
    }

    fn cgroups(&self) -> Result<Vec<IdentityCgroup>, IdentityError> {
        let text = fs::read_to_string(&self.path).map_err(|source| IdentityError::Io {
            path: self.path.clone(),
            source,
        })?;
        let raw: RawFile = serde_norway::from_str(&text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            IdentityError::Parse {
                path: self.path.clone(),
                line,
                column,
                message: crate::policy::yaml_message(&e),
            }
        })?;
        Ok(raw
            .identities
            .into_iter()
            .map(|e| {
                let rel = e.cgroup.strip_prefix("/").unwrap_or(&e.cgroup).to_owned();
                let tenant = e
                    .tenant
                    .unwrap_or_else(|| Name::try_from(DEFAULT_TENANT.to_owned()).expect("valid"));
                IdentityCgroup {
                    path: self.cgroup2.join(rel),
                    identity: Identity {
                        agent: e.agent,
                        tenant,
                    },
                }
            })
            .collect())
    }
}

// === impl ExecCgroups ===

/// cgroups made by `aegis-agent exec`: `<dir>/<agent>@<tenant>.<pid>`.
pub struct ExecCgroups {
    dir: PathBuf,
}

impl ExecCgroups {
    /// A source listing `dir` (created on demand).
    pub fn new(dir: PathBuf) -> ExecCgroups {
        ExecCgroups { dir }
    }

    /// Directory of exec cgroups.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the cgroup for an exec'd process.
    pub fn path_for(&self, identity: &Identity, pid: u32) -> PathBuf {
        self.dir
            .join(format!("{}@{}.{pid}", identity.agent, identity.tenant))
    }

    /// Parses `<agent>@<tenant>.<pid>`.
    fn parse_name(name: &str) -> Option<Identity> {
        let (agent, rest) = name.split_once('@')?;
        let (tenant, pid) = rest.rsplit_once('.')?;
        pid.parse::<u32>().ok()?;
        Identity::new(agent, Some(tenant)).ok()
    }
}

impl IdentitySource for ExecCgroups {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn cgroups(&self) -> Result<Vec<IdentityCgroup>, IdentityError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(IdentityError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let identity = Self::parse_name(e.file_name().to_str()?)?;
                Some(IdentityCgroup {
                    path: e.path(),
                    identity,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_ids_are_stable_and_distinct() {
        let a = Identity::new("finance-agent", Some("acme")).unwrap();
        let b = Identity::new("finance-agent", None).unwrap();
        assert_eq!(a.id(), aegis_common::fnv1a32(b"finance-agent/acme"));
        assert_ne!(a.id(), b.id());
        assert_eq!(b.tenant.as_str(), DEFAULT_TENANT);
        assert!(Identity::new("Bad Name", None).is_err());
    }

    #[test]
    fn exec_names_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let src = ExecCgroups::new(dir.path().to_owned());
        let id = Identity::new("llm-agent", Some("t.1")).unwrap();
        let path = src.path_for(&id, 4242);
        fs::create_dir(&path).unwrap();
        fs::create_dir(dir.path().join("not-an-exec-cgroup")).unwrap();
        let found = src.cgroups().unwrap();
        assert_eq!(found, vec![IdentityCgroup { path, identity: id }]);
    }

    #[test]
    fn static_file_resolves_paths_and_reports_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ids.yaml");
        fs::write(
            &file,
            "identities:\n  - cgroup: /system.slice/a.service\n    agent: a\n",
        )
        .unwrap();
        let src = StaticFile::new(file.clone(), PathBuf::from("/sys/fs/cgroup"));
        let found = src.cgroups().unwrap();
        assert_eq!(
            found[0].path,
            PathBuf::from("/sys/fs/cgroup/system.slice/a.service")
        );
        assert_eq!(found[0].identity, Identity::new("a", None).unwrap());

        fs::write(
            &file,
            "identities:\n  - cgroup: /x\n    agent: a\n    tenat: b\n",
        )
        .unwrap();
        match src.cgroups() {
            Err(IdentityError::Parse { line, .. }) => {
                assert_eq!(line, 4, "the unknown field's own line")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }
}
