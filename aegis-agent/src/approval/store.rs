//! Approvals on disk (redb, `--approvals-db`): an agent restart or upgrade keeps pending
//! approvals, approved-but-unused override tokens and spent ones (so a token is never spent
//! twice across a restart). Every change is written through, in one transaction, before the
//! caller acts on it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use redb::{Database, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Approval;

/// Approval id → [`Stored`] as JSON.
const APPROVALS: TableDefinition<&str, &str> = TableDefinition::new("approvals");

/// An approval with what its serialized form leaves out (the token is kept on the node only;
/// the file is the agent's, mode 0600).
#[derive(Serialize, Deserialize)]
struct Stored {
    approval: Approval,
    token: Option<String>,
    token_exp: u64,
}

/// The approvals database. redb allows one process at a time: while a predecessor agent holds
/// the file (an upgrade's overlap), it opens on the first use after that agent let go.
pub struct ApprovalStore {
    path: PathBuf,
    db: OnceLock<Database>,
    opening: Mutex<()>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl ApprovalStore {
    /// Opens (creating) the database at `path`, or defers opening while another process
    /// holds it.
    ///
    /// # Errors
    /// The file cannot be created or is not a redb database.
    pub fn open(path: &Path) -> Result<ApprovalStore, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let store = ApprovalStore {
            path: path.to_owned(),
            db: OnceLock::new(),
            opening: Mutex::new(()),
        };
        match store.db() {
            Ok(_) => {}
            Err(e) if e.contains("already open") => {
                tracing::warn!(target: "aegis::approval", path = %path.display(), "approvals store held by the previous agent process; it opens once that process exits");
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// The database, opening it if a predecessor held it so far.
    fn db(&self) -> Result<&Database, String> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let _opening = self.opening.lock().map_err(err)?;
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let db =
            Database::create(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
                .map_err(err)?;
        }
        Ok(self.db.get_or_init(|| db))
    }

    /// Every stored approval.
    ///
    /// # Errors
    /// The file cannot be read, or holds a record that does not parse.
    pub fn load(&self) -> Result<HashMap<String, Approval>, String> {
        let txn = self.db()?.begin_read().map_err(err)?;
        let table = match txn.open_table(APPROVALS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
            Err(e) => return Err(err(e)),
        };
        let mut out = HashMap::new();
        for row in table.iter().map_err(err)? {
            let (id, value) = row.map_err(err)?;
            let stored: Stored = serde_json::from_str(value.value())
                .map_err(|e| format!("approval {}: {e}", id.value()))?;
            let mut approval = stored.approval;
            approval.token = stored.token;
            approval.token_exp = stored.token_exp;
            out.insert(id.value().to_owned(), approval);
        }
        Ok(out)
    }

    /// Writes the approvals `changed` names as they are in `all` (deleting those no longer
    /// there), in one transaction.
    ///
    /// # Errors
    /// The write failed; nothing was changed.
    pub fn sync(&self, all: &HashMap<String, Approval>, changed: &[String]) -> Result<(), String> {
        if changed.is_empty() {
            return Ok(());
        }
        let txn = self.db()?.begin_write().map_err(err)?;
        {
            let mut table = txn.open_table(APPROVALS).map_err(err)?;
            for id in changed {
                match all.get(id) {
                    Some(a) => {
                        let stored = Stored {
                            approval: a.clone(),
                            token: a.token.clone(),
                            token_exp: a.token_exp,
                        };
                        let json = serde_json::to_string(&stored).map_err(err)?;
                        table.insert(id.as_str(), json.as_str()).map_err(err)?;
                    }
                    None => {
                        table.remove(id.as_str()).map_err(err)?;
                    }
                }
            }
        }
        txn.commit().map_err(err)
    }
}
