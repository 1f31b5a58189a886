//! The kill switch: agents (by name, every tenant) or all agents whose egress is cut off at
//! once, in the kernel (`IDENTITY_F_KILLED`: every connect and send refused, DNS included,
//! shadow mode or not) and in the L7 enforcer (every request refused, also on connections
//! opened before).
//!
//! The state is a small JSON file (`{"all": false, "agents": ["finance-agent"]}`), written
//! atomically (temporary file, `fsync`, rename) before the switch takes effect, so a restarted
//! agent starts with the same switches on. A file that cannot be read stops the agent from
//! starting rather than silently turning switches off.

use std::{
    collections::BTreeSet,
    fs, io,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// What a switch applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every agent on the node.
    All,
    /// One agent name, every tenant.
    Agent(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all agents"),
            Target::Agent(a) => write!(f, "agent {a}"),
        }
    }
}

/// The switches that are on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillState {
    /// Every agent is cut off.
    #[serde(default)]
    pub all: bool,
    /// Agents cut off by name.
    #[serde(default)]
    pub agents: BTreeSet<String>,
}

/// Errors loading or saving the switch state.
#[derive(Debug, thiserror::Error)]
#[error("kill switch state {}: {message}", path.display())]
pub struct KillSwitchError {
    path: PathBuf,
    message: String,
}

/// The node's kill switches; cheap to read from any thread.
pub struct KillSwitch {
    path: PathBuf,
    state: ArcSwap<KillState>,
    /// Serializes writers (read-modify-write of the file).
    write: Mutex<()>,
}

impl KillSwitch {
    /// Loads the state at `path`; a missing file means every switch is off.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<KillSwitch, KillSwitchError> {
        let err = |message: String| KillSwitchError {
            path: path.to_owned(),
            message,
        };
        let state = match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => KillState::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(KillSwitch {
            path: path.to_owned(),
            state: ArcSwap::from_pointee(state),
            write: Mutex::new(()),
        })
    }

    /// Whether `agent` is cut off.
    pub fn is_killed(&self, agent: &str) -> bool {
        let state = self.state.load();
        state.all || state.agents.contains(agent)
    }

    /// The switches that are on.
    pub fn state(&self) -> Arc<KillState> {
        self.state.load_full()
    }

    /// Turns the switch of `target` on or off: saved to disk first, then in force for
    /// [`KillSwitch::is_killed`]. Returns the new state.
    ///
    /// # Errors
    /// The state cannot be saved; nothing changed.
    pub fn set(&self, target: &Target, on: bool) -> Result<Arc<KillState>, KillSwitchError> {
        let _writer = self.write.lock().expect("lock poisoned");
        let mut next = (*self.state.load_full()).clone();
        match (target, on) {
            (Target::All, on) => next.all = on,
            (Target::Agent(a), true) => {
                next.agents.insert(a.clone());
            }
            (Target::Agent(a), false) => {
                next.agents.remove(a);
            }
        }
        self.save(&next).map_err(|e| KillSwitchError {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let next = Arc::new(next);
        self.state.store(next.clone());
        Ok(next)
    }

    fn save(&self, state: &KillState) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = fs::File::create(&tmp)?;
        file.write_all(serde_json::to_string(state)?.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_persist_and_a_broken_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/kill-switch.json");
        let ks = KillSwitch::load(&path).unwrap();
        assert!(!ks.is_killed("a"));
        ks.set(&Target::Agent("a".into()), true).unwrap();
        assert!(ks.is_killed("a") && !ks.is_killed("b"));
        let again = KillSwitch::load(&path).unwrap();
        assert!(again.is_killed("a"), "survives a restart");
        again.set(&Target::All, true).unwrap();
        assert!(again.is_killed("b"));
        again.set(&Target::All, false).unwrap();
        again.set(&Target::Agent("a".into()), false).unwrap();
        assert!(!again.is_killed("a"));
        assert_eq!(
            *KillSwitch::load(&path).unwrap().state(),
            KillState::default()
        );
        fs::write(&path, "{\"all\": tru").unwrap();
        assert!(KillSwitch::load(&path).is_err());
    }
}
