//! The export registry: which named devices a server offers, their per-export counters, and the
//! signal that tells open connections an export was withdrawn.
//!
//! Lookups happen once per connection (during the handshake); the transmission phase holds an
//! `Arc<ExportEntry>` and never touches the registry again, so the lock is never on the hot path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::access::{Access, ClientInfo};
use crate::device::BlockDevice;
use crate::metrics::ExportMetrics;

/// A named device offered to clients.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .finish()
    }
}

/// Live counters of one export; updated with relaxed atomics from every connection.
#[derive(Debug, Default)]
pub struct ExportStats {
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    trim_ops: AtomicU64,
    zero_ops: AtomicU64,
    block_status_ops: AtomicU64,
    errors: AtomicU64,
    /// Per-command counts, bytes, errors and latency, for `Server::metrics_text`.
    pub(crate) commands: ExportMetrics,
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStatsSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub trim_ops: u64,
    pub zero_ops: u64,
    pub block_status_ops: u64,
    /// Requests answered with an error (protocol or device).
    pub errors: u64,
}

impl ExportStats {
    pub fn snapshot(&self) -> ExportStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStatsSnapshot {
            connections_total: get(&self.connections_total),
            connections_active: get(&self.connections_active),
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            trim_ops: get(&self.trim_ops),
            zero_ops: get(&self.zero_ops),
            block_status_ops: get(&self.block_status_ops),
            errors: get(&self.errors),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self, bytes: u32) {
        self.read_ops.fetch_add(1, Ordering::Relaxed);
        self.read_bytes
            .fetch_add(u64::from(bytes), Ordering::Relaxed);
    }

    pub(crate) fn write(&self, bytes: u32) {
        self.write_ops.fetch_add(1, Ordering::Relaxed);
        self.write_bytes
            .fetch_add(u64::from(bytes), Ordering::Relaxed);
    }

    pub(crate) fn flush(&self) {
        self.flush_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn trim(&self) {
        self.trim_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn zero(&self) {
        self.zero_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn block_status(&self) {
        self.block_status_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Decrements `connections_active` when a connection ends, however it ends.
pub(crate) struct ConnectionGuard(Arc<ExportEntry>);

impl ConnectionGuard {
    pub(crate) fn new(entry: Arc<ExportEntry>) -> Self {
        entry.stats.connection_opened();
        ConnectionGuard(entry)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.stats.connection_closed();
    }
}

/// One registered export with its counters and its removal signal.
pub struct ExportEntry {
    pub export: Export,
    /// Which clients may use it.
    pub access: Access,
    pub stats: ExportStats,
    removed: watch::Sender<bool>,
}

impl ExportEntry {
    fn new(export: Export, access: Access) -> Self {
        ExportEntry {
            export,
            access,
            stats: ExportStats::default(),
            removed: watch::Sender::new(false),
        }
    }

    /// Resolves once the export has been removed from its registry.
    pub(crate) fn removed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.removed.subscribe();
        async move {
            // An error means the sender is gone, which also means the export is gone.
            let _ = rx.wait_for(|removed| *removed).await;
        }
    }

    pub fn is_removed(&self) -> bool {
        *self.removed.borrow()
    }
}

/// A summary of one export for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub stats: ExportStatsSnapshot,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("export {0:?} does not exist")]
    NotFound(String),
    #[error("export name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

#[derive(Default)]
struct RegistryState {
    exports: BTreeMap<String, Arc<ExportEntry>>,
    default_export: Option<String>,
}

/// All exports of one server, keyed by name.
#[derive(Default)]
pub struct ExportRegistry {
    state: RwLock<RegistryState>,
}

impl ExportRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryState> {
        // A panic while holding the lock cannot leave the map half-updated (every mutation is
        // one insert or remove), so a poisoned lock is safe to keep using.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RegistryState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, export: Export) -> Result<(), ExportError> {
        self.add_with_access(export, Access::default())
    }

    /// Adds an export that only the clients `access` admits may use.
    pub fn add_with_access(&self, export: Export, access: Access) -> Result<(), ExportError> {
        if export.name.is_empty() {
            return Err(ExportError::InvalidName {
                name: export.name,
                reason: "empty name is reserved for the default export",
            });
        }
        if export.name.len() > crate::proto::MAX_STRING_BYTES {
            return Err(ExportError::InvalidName {
                name: export.name,
                reason: "longer than 4096 bytes",
            });
        }
        let mut state = self.write();
        if state.exports.contains_key(&export.name) {
            return Err(ExportError::Exists(export.name));
        }
        state.exports.insert(
            export.name.clone(),
            Arc::new(ExportEntry::new(export, access)),
        );
        Ok(())
    }

    /// Removes the export: new connections are refused, open ones finish their in-flight
    /// requests and are closed.
    pub fn remove(&self, name: &str) -> Result<(), ExportError> {
        let mut state = self.write();
        let entry = state
            .exports
            .remove(name)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
        if state.default_export.as_deref() == Some(name) {
            state.default_export = None;
        }
        drop(state);
        entry.removed.send_replace(true);
        Ok(())
    }

    /// Resolves a client-supplied name; the empty name selects the default export.
    pub fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>> {
        let state = self.read();
        let name = if name.is_empty() {
            state.default_export.as_deref()?
        } else {
            name
        };
        state.exports.get(name).cloned()
    }

    pub fn set_default(&self, name: Option<String>) -> Result<(), ExportError> {
        let mut state = self.write();
        if let Some(n) = &name {
            if !state.exports.contains_key(n) {
                return Err(ExportError::NotFound(n.clone()));
            }
        }
        state.default_export = name;
        Ok(())
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        self.read()
            .exports
            .values()
            .map(|e| ExportInfo {
                name: e.export.name.clone(),
                description: e.export.description.clone(),
                size_bytes: e.export.device.size(),
                stats: e.stats.snapshot(),
            })
            .collect()
    }

    /// Names and descriptions of the exports `client` may use, for `NBD_OPT_LIST`.
    pub(crate) fn names_for(&self, client: &ClientInfo) -> Vec<(String, String)> {
        self.read()
            .exports
            .values()
            .filter(|e| e.access.check(client).is_ok())
            .map(|e| (e.export.name.clone(), e.export.description.clone()))
            .collect()
    }

    /// Every export's entry, in name order.
    pub(crate) fn entries(&self) -> Vec<Arc<ExportEntry>> {
        self.read().exports.values().cloned().collect()
    }

    pub fn stats(&self, name: &str) -> Option<ExportStatsSnapshot> {
        self.read().exports.get(name).map(|e| e.stats.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDevice;

    fn export(name: &str) -> Export {
        Export {
            name: name.into(),
            description: format!("{name} test"),
            device: Arc::new(MemDevice::new(4096)),
        }
    }

    #[test]
    fn registry_refuses_duplicate_and_empty_names() {
        let r = ExportRegistry::default();
        r.add(export("a")).unwrap();
        assert_eq!(r.add(export("a")), Err(ExportError::Exists("a".into())));
        assert!(matches!(
            r.add(export("")),
            Err(ExportError::InvalidName { .. })
        ));
    }

    #[test]
    fn empty_name_resolves_to_default_export_only_when_set() {
        let r = ExportRegistry::default();
        r.add(export("a")).unwrap();
        assert!(r.lookup("").is_none());
        r.set_default(Some("a".into())).unwrap();
        assert_eq!(r.lookup("").unwrap().export.name, "a");
        assert_eq!(
            r.set_default(Some("zz".into())),
            Err(ExportError::NotFound("zz".into()))
        );
    }

    #[test]
    fn removing_export_signals_holders_and_clears_default() {
        let r = ExportRegistry::default();
        r.add(export("a")).unwrap();
        r.set_default(Some("a".into())).unwrap();
        let held = r.lookup("a").unwrap();
        assert!(!held.is_removed());
        r.remove("a").unwrap();
        assert!(held.is_removed());
        assert!(r.lookup("a").is_none());
        assert!(r.lookup("").is_none());
        assert_eq!(r.remove("a"), Err(ExportError::NotFound("a".into())));
    }
}
