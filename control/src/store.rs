//! The controller's state: sites, VM hosts and capacity, clusters, VMs, overlays and
//! attachments.
//!
//! [`Store`] is the interface the commands use; [`SqliteStore`] implements it on one
//! SQLite file (WAL journal, foreign keys on, schema migrations numbered by
//! `PRAGMA user_version`). A larger deployment can implement [`Store`] on a server
//! database without touching the commands.
//!
//! MAC addresses are unique by construction: `02:<controller id>:<32-bit counter>`,
//! where the counter lives in the store and only moves forward inside the same
//! transaction that records the VMs, and `vms.mac` carries a UNIQUE constraint that
//! SQLite checks on every insert.
use crate::listing::{AttachmentRow, ClusterRow, Listing, VmRow};
use crate::model::{
    vm_ip, Attachment, Cluster, HostInfo, Mac, Overlay, OverlayNet, Role, Site, Vm,
};
use crate::validate::quote;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A name that must be unique is taken.
    #[error("{kind} {} already exists", quote(.name))]
    Exists {
        /// `site`, `cluster`, ...
        kind: &'static str,
        /// The clashing name.
        name: String,
    },
    /// No such record.
    #[error("no {kind} named {}", quote(.name))]
    NotFound {
        /// `site`, `cluster`, `vm`, `host`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// The record is still used by something else.
    #[error("{0}")]
    InUse(String),
    /// Every /24 of the overlay pool is taken by this controller's clusters.
    #[error("no free /24 left in the overlay pool {0}; pass --overlay or another --overlay-pool")]
    NoSubnet(OverlayNet),
    /// More VMs in one cluster than its overlay network can address.
    #[error("overlay network {0} holds at most {1} VMs")]
    TooManyVms(OverlayNet, usize),
    /// The MAC counter ran out of its 32 bits.
    #[error("MAC counter exhausted for this controller")]
    MacsExhausted,
    /// The database is from a newer version of mvc.
    #[error("database schema version {0} is newer than this mvc understands ({1})")]
    TooNew(i64, i64),
    /// A stored value does not parse.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A VM the controller wants recorded; MAC and address are allocated by the store.
#[derive(Clone, Debug)]
pub struct PlannedVm {
    /// VM name.
    pub name: String,
    /// Frontend or compute.
    pub role: Role,
    /// Site name.
    pub site: String,
    /// Host name within the site.
    pub host: String,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// Everything `cluster create` records in one transaction.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    /// Cluster name.
    pub name: String,
    /// Origin site (frontend VM and supernode).
    pub origin: String,
    /// Community, secret reference, supernode address (the port the origin's agent
    /// chose).
    pub overlay: Overlay,
    /// The overlay network the user chose; `None`: the first /24 of `pool` that no
    /// other cluster of this store uses.
    pub overlay_net: Option<OverlayNet>,
    /// Where a default overlay network comes from.
    pub pool: OverlayNet,
    /// Frontend first.
    pub vms: Vec<PlannedVm>,
    /// One per VM host in use, with the TAP and bridge names its site's agent chose.
    pub attachments: Vec<Attachment>,
}

/// The controller's persistent state.
pub trait Store {
    /// Record a site; its name must be new.
    fn add_site(&mut self, name: &str, agent_addr: &str, agent_key: &str) -> Result<Site>;
    /// All sites, by name.
    fn sites(&self) -> Result<Vec<Site>>;
    /// One site.
    fn site(&self, name: &str) -> Result<Site>;
    /// Forget a site; refused while a cluster has VMs there.
    fn remove_site(&mut self, name: &str) -> Result<()>;
    /// Replace the capacity snapshot of a site's hosts with what its agent reported.
    fn set_hosts(&mut self, site: &str, hosts: &[HostInfo]) -> Result<()>;
    /// Hosts of a site as last reported.
    fn hosts(&self, site: &str) -> Result<Vec<HostInfo>>;
    /// Every site with its hosts as last reported, sites and hosts by name.
    fn sites_with_hosts(&self) -> Result<Vec<(Site, Vec<HostInfo>)>>;
    /// Record a cluster with its overlay network, overlay, VMs (MACs and addresses
    /// allocated here) and attachments, all or nothing.
    fn create_cluster(&mut self, plan: &ClusterPlan) -> Result<Cluster>;
    /// One cluster with everything in it.
    fn cluster(&self, name: &str) -> Result<Cluster>;
    /// All clusters, by name.
    fn clusters(&self) -> Result<Vec<Cluster>>;
    /// What `cluster list` shows of each cluster, by name: up to `limit` clusters whose
    /// names sort after `after`.
    fn cluster_summaries(&self, after: Option<&str>, limit: usize) -> Result<Vec<ClusterSummary>>;
    /// Up to `limit` clusters whose names sort after `after`, by name, with everything in
    /// them, as `cluster list --json` prints them (the same JSON as [`Store::clusters`]).
    fn cluster_listing(&self, after: Option<&str>, limit: usize) -> Result<Listing>;
    /// One cluster with everything in it, as a [`Listing`] (`vm list --cluster`: no
    /// record per VM).
    fn cluster_listing_of(&self, name: &str) -> Result<Listing>;
    /// The cluster a VM belongs to.
    fn cluster_of_vm(&self, vm: &str) -> Result<Cluster>;
    /// Set the cluster's state.
    fn set_cluster_state(&mut self, name: &str, state: &str) -> Result<()>;
    /// Set one VM's state.
    fn set_vm_state(&mut self, vm: &str, state: &str) -> Result<()>;
    /// Delete a cluster and everything in it.
    fn delete_cluster(&mut self, name: &str) -> Result<()>;
    /// Every MAC ever recorded for a live VM (for checks).
    fn all_macs(&self) -> Result<Vec<Mac>>;
    /// A VM now runs at `site` on `host` (after a live migration).
    fn move_vm(&mut self, vm: &str, site: &str, host: &str) -> Result<()>;
}

/// One line of `cluster list`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClusterSummary {
    /// Unique name.
    pub name: String,
    /// `defined`, `running`, `stopped`.
    pub state: String,
    /// Site holding the frontend VM and the supernode.
    pub origin: String,
    /// VMs in it.
    pub vms: usize,
    /// Its overlay network.
    pub overlay_net: String,
}

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "CREATE TABLE meta(id INTEGER PRIMARY KEY CHECK (id = 1),
                       controller_id INTEGER NOT NULL,
                       next_mac INTEGER NOT NULL);
     CREATE TABLE sites(id INTEGER PRIMARY KEY,
                        name TEXT NOT NULL UNIQUE,
                        agent_addr TEXT NOT NULL,
                        agent_key TEXT NOT NULL);
     CREATE TABLE hosts(id INTEGER PRIMARY KEY,
                        site_id INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
                        name TEXT NOT NULL,
                        vcpus INTEGER NOT NULL,
                        memory_mb INTEGER NOT NULL,
                        max_vms INTEGER NOT NULL,
                        free_vms INTEGER NOT NULL,
                        free_memory_mb INTEGER NOT NULL,
                        UNIQUE(site_id, name));
     CREATE TABLE clusters(id INTEGER PRIMARY KEY,
                           name TEXT NOT NULL UNIQUE,
                           origin_site_id INTEGER NOT NULL REFERENCES sites(id),
                           subnet INTEGER NOT NULL UNIQUE CHECK (subnet BETWEEN 1 AND 254),
                           state TEXT NOT NULL);
     CREATE TABLE overlays(cluster_id INTEGER PRIMARY KEY
                               REFERENCES clusters(id) ON DELETE CASCADE,
                           community TEXT NOT NULL UNIQUE,
                           secret_ref TEXT NOT NULL,
                           supernode TEXT NOT NULL);
     CREATE TABLE vms(id INTEGER PRIMARY KEY,
                      cluster_id INTEGER NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
                      name TEXT NOT NULL UNIQUE,
                      role TEXT NOT NULL CHECK (role IN ('frontend', 'compute')),
                      site_id INTEGER NOT NULL REFERENCES sites(id),
                      host TEXT NOT NULL,
                      memory_mb INTEGER NOT NULL,
                      mac INTEGER NOT NULL UNIQUE,
                      ip TEXT NOT NULL,
                      state TEXT NOT NULL,
                      UNIQUE(cluster_id, ip));
     CREATE TABLE attachments(id INTEGER PRIMARY KEY,
                              cluster_id INTEGER NOT NULL
                                  REFERENCES clusters(id) ON DELETE CASCADE,
                              site_id INTEGER NOT NULL REFERENCES sites(id),
                              host TEXT NOT NULL,
                              tap TEXT NOT NULL,
                              bridge TEXT NOT NULL,
                              edge_name TEXT NOT NULL,
                              UNIQUE(cluster_id, site_id, host));",
    // 2: clusters carry their own overlay network (any prefix, not unique: clusters are
    // separate L2 segments) instead of a unique 198.19.N.0/24 number. Run with foreign
    // keys off, so dropping the old table cascades nowhere.
    "CREATE TABLE clusters2(id INTEGER PRIMARY KEY,
                            name TEXT NOT NULL UNIQUE,
                            origin_site_id INTEGER NOT NULL REFERENCES sites(id),
                            overlay_net TEXT NOT NULL,
                            state TEXT NOT NULL);
     INSERT INTO clusters2(id, name, origin_site_id, overlay_net, state)
         SELECT id, name, origin_site_id, '198.19.' || subnet || '.0/24', state FROM clusters;
     DROP TABLE clusters;
     ALTER TABLE clusters2 RENAME TO clusters;",
    // 3: what removing a site and listing its use look up by site, indexed (these were
    // whole-table scans at 100,000 VMs).
    "CREATE INDEX vms_site ON vms(site_id);
     CREATE INDEX clusters_origin ON clusters(origin_site_id);
     CREATE INDEX attachments_site ON attachments(site_id);",
    // 4: the pool's network pick looks up the networks that may overlap a candidate
    // instead of reading every cluster's.
    "CREATE INDEX clusters_net ON clusters(overlay_net);",
];

/// Subnets of the pool looked up one by one, through the index on the clusters'
/// networks, before [`free_subnet`] reads every cluster's network instead.
const POOL_PROBES: u64 = 16;

/// The first subnet of `pool` (of the pool's prefix, at least /24) that overlaps no
/// cluster's network. The first [`POOL_PROBES`] candidates are each looked up with one
/// indexed query that reads only the networks that may overlap it: its supernets (their
/// exact text) and the networks inside its /24 (text starting with its first three
/// numbers). Past them (a pool filling up), every cluster's network is read once.
fn free_subnet(conn: &Connection, pool: OverlayNet) -> Result<OverlayNet> {
    let p = pool.prefix.max(24);
    let mut candidates = (0..(1u64 << (p - pool.prefix))).filter_map(|i| pool.subnet(p, i));
    // Supernets of a candidate: one of each prefix length up to /24 (?1 to ?25); the
    // networks inside its /24: ?26 <= text < ?27.
    let supernet_params: Vec<String> = (1..=25).map(|i| format!("?{i}")).collect();
    let mut probe = conn.prepare_cached(&format!(
        "SELECT overlay_net FROM clusters WHERE overlay_net IN ({})
         UNION ALL
         SELECT overlay_net FROM clusters WHERE overlay_net >= ?26 AND overlay_net < ?27",
        supernet_params.join(", ")
    ))?;
    for n in candidates.by_ref().take(POOL_PROBES as usize) {
        let mut keys: Vec<String> = (0..=24u8)
            .map(|q| {
                let mask = u32::MAX.checked_shl(32 - u32::from(q)).unwrap_or(0);
                let addr = (u32::from(n.addr) & mask).into();
                OverlayNet { addr, prefix: q }.to_string()
            })
            .collect();
        let [a, b, c, _] = n.addr.octets();
        keys.push(format!("{a}.{b}.{c}."));
        keys.push(format!("{a}.{b}.{c}/"));
        let mut rows = probe.query(rusqlite::params_from_iter(&keys))?;
        let mut free = true;
        while let Some(r) = rows.next()? {
            if text(r, 0)?
                .parse::<OverlayNet>()
                .is_ok_and(|t| t.overlaps(&n))
            {
                free = false;
                break;
            }
        }
        if free {
            return Ok(n);
        }
    }
    let taken: Vec<OverlayNet> = conn
        .prepare_cached("SELECT overlay_net FROM clusters")?
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|r| r.ok().and_then(|s| s.parse().ok()))
        .collect();
    candidates
        .find(|n| !taken.iter().any(|t| t.overlaps(n)))
        .ok_or(StoreError::NoSubnet(pool))
}

/// Which clusters a [`Listing`] holds.
#[derive(Clone, Copy)]
enum ListingOf<'a> {
    /// Up to `limit` clusters whose names sort after `after`, by name.
    Page {
        after: Option<&'a str>,
        limit: usize,
    },
    /// The cluster of that name (none when there is none).
    Named(&'a str),
}

/// [`Store`] on one SQLite file.
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Open (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        Self::init(Connection::open(path)?)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<SqliteStore> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Migrations run with foreign keys off (a table rebuild must not cascade).
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let latest = MIGRATIONS.len() as i64;
        if version > latest {
            return Err(StoreError::TooNew(version, latest));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(m)?;
            if i == 0 {
                let mut id = [0u8; 1];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .map_err(|_| StoreError::Corrupt("no system randomness".into()))?;
                tx.execute(
                    "INSERT INTO meta(id, controller_id, next_mac) VALUES (1, ?1, 1)",
                    params![i64::from(id[0])],
                )?;
            }
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(SqliteStore { conn })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn site_id(&self, name: &str) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT id FROM sites WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "site",
                name: name.into(),
            })
    }

    fn load_cluster(
        &self,
        id: i64,
        name: String,
        origin: String,
        net: String,
        state: String,
    ) -> Result<Cluster> {
        // Cached statements: parsing the SQL again costs more than the lookups.
        let overlay = self
            .conn
            .prepare_cached(
                "SELECT community, secret_ref, supernode FROM overlays WHERE cluster_id = ?1",
            )?
            .query_row([id], |r| {
                Ok(Overlay {
                    community: r.get(0)?,
                    secret_ref: r.get(1)?,
                    supernode: r.get(2)?,
                })
            })?;
        let mut vms = Vec::new();
        let mut st = self.conn.prepare_cached(&vm_select(
            "s.name",
            "JOIN sites s ON s.id = v.site_id WHERE v.cluster_id = ?1 ORDER BY v.id",
        ))?;
        let mut rows = st.query([id])?;
        while let Some(r) = rows.next()? {
            vms.push(vm_of_row(r, r.get(3)?)?);
        }
        let mut attachments = Vec::new();
        let mut st = self.conn.prepare_cached(&attachment_select(
            "s.name",
            "JOIN sites s ON s.id = a.site_id WHERE a.cluster_id = ?1 ORDER BY a.id",
        ))?;
        let mut rows = st.query([id])?;
        while let Some(r) = rows.next()? {
            attachments.push(attachment_of_row(r, r.get(1)?)?);
        }
        cluster_of(id, name, origin, net, state, overlay, vms, attachments)
    }

    /// Every site's name by id: read once for a listing, instead of joining `sites`
    /// into every row of it.
    fn site_names(&self) -> Result<SiteNames> {
        let mut st = self.conn.prepare_cached("SELECT id, name FROM sites")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(SiteNames(rows.collect::<rusqlite::Result<_>>()?))
    }

    /// The clusters `which` names with everything in them (see [`Listing`]).
    fn listing(&self, which: ListingOf<'_>) -> Result<Listing> {
        // Text borrowed from the rows into one buffer (no String per field); site names
        // put there once: every site's, or for one cluster only those its rows name (a
        // cluster spans a few of possibly thousands).
        let mut l = Listing::default();
        let mut sites = std::collections::HashMap::new();
        let (mut st, name) = match which {
            ListingOf::Page { .. } => (
                self.conn.prepare_cached("SELECT id, name FROM sites")?,
                None,
            ),
            ListingOf::Named(name) => (
                self.conn.prepare_cached(
                    "SELECT id, name FROM sites WHERE id IN (
                         SELECT origin_site_id FROM clusters WHERE name = ?1
                         UNION SELECT v.site_id FROM vms v JOIN clusters c ON c.id = v.cluster_id
                             WHERE c.name = ?1
                         UNION SELECT a.site_id FROM attachments a
                             JOIN clusters c ON c.id = a.cluster_id WHERE c.name = ?1)",
                )?,
                Some(name),
            ),
        };
        let mut rows = match name {
            Some(name) => st.query([name])?,
            None => st.query([])?,
        };
        while let Some(r) = rows.next()? {
            sites.insert(r.get::<_, i64>(0)?, l.put(text(r, 1)?));
        }
        let site = |id: i64| {
            sites
                .get(&id)
                .copied()
                .ok_or_else(|| StoreError::Corrupt(format!("no site with id {id}")))
        };
        let mut at = ClusterIndex::default();
        const COLUMNS: &str = "SELECT c.id, c.name, c.origin_site_id, c.overlay_net, c.state,
                    o.community, o.secret_ref, o.supernode
             FROM clusters c LEFT JOIN overlays o ON o.cluster_id = c.id";
        let (mut st, whole_of) = match which {
            ListingOf::Page { after, limit } => (
                self.conn.prepare_cached(&format!(
                    "{COLUMNS} WHERE ?1 IS NULL OR c.name > ?1 ORDER BY c.name LIMIT ?2"
                ))?,
                after.is_none().then_some(limit),
            ),
            ListingOf::Named(_) => (
                self.conn
                    .prepare_cached(&format!("{COLUMNS} WHERE c.name = ?1"))?,
                None,
            ),
        };
        let mut rows = match which {
            ListingOf::Page { after, limit } => {
                st.query(params![after, i64::try_from(limit).unwrap_or(i64::MAX)])?
            }
            ListingOf::Named(name) => st.query([name])?,
        };
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let name = text(r, 1)?;
            if r.get_ref(5)? == rusqlite::types::ValueRef::Null {
                return Err(StoreError::Corrupt(format!(
                    "cluster {name} has no overlay"
                )));
            }
            let row = ClusterRow {
                id,
                name: l.put(name),
                origin: site(r.get(2)?)?,
                overlay_net: overlay_net_of(text(r, 3)?)?,
                state: l.put(text(r, 4)?),
                community: l.put(text(r, 5)?),
                secret_ref: l.put(text(r, 6)?),
                supernode: l.put(text(r, 7)?),
                vms: Vec::new(),
                attachments: Vec::new(),
            };
            at.insert(id, l.clusters.len());
            l.clusters.push(row);
        }
        // The whole listing reads each table once in id order; a page reads its own
        // clusters' rows by index.
        let whole = whole_of.is_some_and(|limit| l.len() < limit);
        let (vm_rest, attachment_rest) = if whole {
            ("ORDER BY v.id", "ORDER BY a.id")
        } else {
            (
                "WHERE v.cluster_id = ?1 ORDER BY v.id",
                "WHERE a.cluster_id = ?1 ORDER BY a.id",
            )
        };
        let ids: Vec<Option<i64>> = if whole {
            vec![None]
        } else {
            l.clusters.iter().map(|c| Some(c.id)).collect()
        };
        let mut vms = self.conn.prepare_cached(&vm_select("v.site_id", vm_rest))?;
        let mut attachments = self
            .conn
            .prepare_cached(&attachment_select("a.site_id", attachment_rest))?;
        for id in ids {
            rows_by_cluster(&mut vms, id, &mut at, |i, r| {
                let vm = VmRow {
                    name: l.put(text(r, 1)?),
                    role: role_at(r, 2)?,
                    site: site(r.get(3)?)?,
                    host: l.put(text(r, 4)?),
                    memory_mb: r.get::<_, i64>(5)? as u64,
                    mac: Mac::from_u64(r.get::<_, i64>(6)? as u64),
                    ip: ip_at(r, 7)?,
                    state: l.put(text(r, 8)?),
                };
                l.clusters[i].vms.push(vm);
                Ok(())
            })?;
            rows_by_cluster(&mut attachments, id, &mut at, |i, r| {
                let a = AttachmentRow {
                    site: site(r.get(1)?)?,
                    host: l.put(text(r, 2)?),
                    tap: l.put(text(r, 3)?),
                    bridge: l.put(text(r, 4)?),
                    edge_name: l.put(text(r, 5)?),
                };
                l.clusters[i].attachments.push(a);
                Ok(())
            })?;
        }
        Ok(l)
    }
}

/// Runs `st` for one cluster (`Some(id)` as its parameter) or for all (`None`, no
/// parameter) and hands each row whose cluster id (column 0) is in `at` to `each`, with
/// that cluster's index in the listing.
fn rows_by_cluster(
    st: &mut rusqlite::CachedStatement<'_>,
    id: Option<i64>,
    at: &mut ClusterIndex,
    mut each: impl FnMut(usize, &rusqlite::Row<'_>) -> Result<()>,
) -> Result<()> {
    let mut rows = match id {
        Some(id) => st.query([id])?,
        None => st.query([])?,
    };
    while let Some(r) = rows.next()? {
        if let Some(i) = at.get(r.get(0)?) {
            each(i, r)?;
        }
    }
    Ok(())
}

/// Columns of a host row as [`host_of_row`] reads them.
const HOST_COLUMNS: &str = "name, vcpus, memory_mb, max_vms, free_vms, free_memory_mb";
/// How many [`HOST_COLUMNS`] there are.
const HOST_COLUMNS_N: usize = 6;

fn host_of_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostInfo> {
    Ok(HostInfo {
        name: r.get(0)?,
        vcpus: r.get(1)?,
        memory_mb: r.get::<_, i64>(2)? as u64,
        max_vms: r.get(3)?,
        free_vms: r.get(4)?,
        free_memory_mb: r.get::<_, i64>(5)? as u64,
    })
}

/// Where each cluster of a listing is, by cluster id. A cluster's VM and attachment
/// rows are mostly consecutive: the map is read once per run of them.
#[derive(Default)]
struct ClusterIndex {
    at: std::collections::HashMap<i64, usize>,
    last: Option<(i64, Option<usize>)>,
}

impl ClusterIndex {
    fn insert(&mut self, id: i64, i: usize) {
        self.at.insert(id, i);
        self.last = None;
    }

    fn get(&mut self, id: i64) -> Option<usize> {
        match self.last {
            Some((c, i)) if c == id => i,
            _ => {
                let i = self.at.get(&id).copied();
                self.last = Some((id, i));
                i
            }
        }
    }
}

/// Site names by site id.
struct SiteNames(std::collections::HashMap<i64, String>);

impl SiteNames {
    fn name(&self, id: i64) -> Result<String> {
        self.0
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("no site with id {id}")))
    }
}

/// `SELECT` of VM rows (`v`: vms) as [`vm_of_row`] reads them, then `rest`; column 3 is
/// `site`, the site's name (joined) or its id, which the caller turns into the name.
fn vm_select(site: &str, rest: &str) -> String {
    format!(
        "SELECT v.cluster_id, v.name, v.role, {site}, v.host, v.memory_mb, v.mac, v.ip,
                v.state FROM vms v {rest}"
    )
}

/// `SELECT` of attachment rows (`a`: attachments) as [`attachment_of_row`] reads them,
/// then `rest`; column 1 is `site`, as in [`vm_select`].
fn attachment_select(site: &str, rest: &str) -> String {
    format!(
        "SELECT a.cluster_id, {site}, a.host, a.tap, a.bridge, a.edge_name
         FROM attachments a {rest}"
    )
}

/// Column `i` as text, borrowed from the row (what is parsed needs no copy).
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str> {
    r.get_ref(i)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
}

/// The role in column `i`.
fn role_at(r: &rusqlite::Row<'_>, i: usize) -> Result<Role> {
    let role = text(r, i)?;
    Role::parse(role).ok_or_else(|| StoreError::Corrupt(role.into()))
}

/// The address in column `i`.
fn ip_at(r: &rusqlite::Row<'_>, i: usize) -> Result<std::net::Ipv4Addr> {
    let ip = text(r, i)?;
    ip.parse().map_err(|_| StoreError::Corrupt(ip.into()))
}

/// A stored overlay network.
fn overlay_net_of(net: &str) -> Result<OverlayNet> {
    net.parse()
        .map_err(|e: crate::model::BadNet| StoreError::Corrupt(e.to_string()))
}

/// The VM of a row of [`vm_select`], at `site`.
fn vm_of_row(r: &rusqlite::Row<'_>, site: String) -> Result<Vm> {
    Ok(Vm {
        name: r.get(1)?,
        role: role_at(r, 2)?,
        site,
        host: r.get(4)?,
        memory_mb: r.get::<_, i64>(5)? as u64,
        mac: Mac::from_u64(r.get::<_, i64>(6)? as u64),
        ip: ip_at(r, 7)?,
        state: r.get(8)?,
    })
}

/// The attachment of a row of [`attachment_select`], at `site`.
fn attachment_of_row(r: &rusqlite::Row<'_>, site: String) -> Result<Attachment> {
    Ok(Attachment {
        site,
        host: r.get(2)?,
        tap: r.get(3)?,
        bridge: r.get(4)?,
        edge_name: r.get(5)?,
    })
}

#[allow(clippy::too_many_arguments)]
fn cluster_of(
    id: i64,
    name: String,
    origin: String,
    net: String,
    state: String,
    overlay: Overlay,
    vms: Vec<Vm>,
    attachments: Vec<Attachment>,
) -> Result<Cluster> {
    Ok(Cluster {
        id,
        name,
        origin,
        overlay_net: overlay_net_of(&net)?,
        state,
        overlay,
        vms,
        attachments,
    })
}

/// `NotFound` when a change by name touched no row (`changed` rows).
fn found(changed: usize, kind: &'static str, name: &str) -> Result<()> {
    if changed == 0 {
        return Err(StoreError::NotFound {
            kind,
            name: name.into(),
        });
    }
    Ok(())
}

fn unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Store for SqliteStore {
    fn add_site(&mut self, name: &str, agent_addr: &str, agent_key: &str) -> Result<Site> {
        match self.conn.execute(
            "INSERT INTO sites(name, agent_addr, agent_key) VALUES (?1, ?2, ?3)",
            params![name, agent_addr, agent_key],
        ) {
            Ok(_) => {}
            Err(e) if unique_violation(&e) => {
                return Err(StoreError::Exists {
                    kind: "site",
                    name: name.into(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        self.site(name)
    }

    fn sites(&self) -> Result<Vec<Site>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, agent_addr, agent_key FROM sites ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Site {
                id: r.get(0)?,
                name: r.get(1)?,
                agent_addr: r.get(2)?,
                agent_key: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn site(&self, name: &str) -> Result<Site> {
        self.conn
            .query_row(
                "SELECT id, name, agent_addr, agent_key FROM sites WHERE name = ?1",
                [name],
                |r| {
                    Ok(Site {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        agent_addr: r.get(2)?,
                        agent_key: r.get(3)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "site",
                name: name.into(),
            })
    }

    fn remove_site(&mut self, name: &str) -> Result<()> {
        let id = self.site_id(name)?;
        let users: Vec<String> = self
            .conn
            .prepare(
                // Two indexed lookups (origin, VMs by site), not a scan of every
                // cluster and VM that an OR across the join would need.
                "SELECT name FROM clusters WHERE origin_site_id = ?1
                 UNION SELECT c.name FROM vms v JOIN clusters c ON c.id = v.cluster_id
                       WHERE v.site_id = ?1
                 ORDER BY 1",
            )?
            .query_map([id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if !users.is_empty() {
            return Err(StoreError::InUse(format!(
                "site {} is used by cluster(s) {}; destroy them first",
                quote(name),
                users.join(", ")
            )));
        }
        self.conn.execute("DELETE FROM sites WHERE id = ?1", [id])?;
        Ok(())
    }

    fn set_hosts(&mut self, site: &str, hosts: &[HostInfo]) -> Result<()> {
        let id = self.site_id(site)?;
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM hosts WHERE site_id = ?1", [id])?;
        for h in hosts {
            tx.execute(
                "INSERT INTO hosts(site_id, name, vcpus, memory_mb, max_vms, free_vms,
                                   free_memory_mb) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    h.name,
                    h.vcpus,
                    h.memory_mb as i64,
                    h.max_vms,
                    h.free_vms,
                    h.free_memory_mb as i64
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn hosts(&self, site: &str) -> Result<Vec<HostInfo>> {
        let id = self.site_id(site)?;
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts WHERE site_id = ?1 ORDER BY name"
        ))?;
        let rows = st.query_map([id], host_of_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn sites_with_hosts(&self) -> Result<Vec<(Site, Vec<HostInfo>)>> {
        // One query per table, not one hosts query per site.
        let mut out: Vec<(Site, Vec<HostInfo>)> =
            self.sites()?.into_iter().map(|s| (s, Vec::new())).collect();
        let at: std::collections::HashMap<i64, usize> = out
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (s.id, i))
            .collect();
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {HOST_COLUMNS}, site_id FROM hosts ORDER BY site_id, name"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(&i) = at.get(&r.get(HOST_COLUMNS_N)?) {
                out[i].1.push(host_of_row(r)?);
            }
        }
        Ok(out)
    }

    fn create_cluster(&mut self, plan: &ClusterPlan) -> Result<Cluster> {
        let origin_id = self.site_id(&plan.origin)?;
        let mut site_ids = std::collections::HashMap::new();
        for site in plan
            .vms
            .iter()
            .map(|v| &v.site)
            .chain(plan.attachments.iter().map(|a| &a.site))
        {
            if !site_ids.contains_key(site) {
                site_ids.insert(site.clone(), self.site_id(site)?);
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let net = match plan.overlay_net {
            Some(n) => n,
            None => free_subnet(&tx, plan.pool)?,
        };
        if plan.vms.len() > net.max_vms() {
            return Err(StoreError::TooManyVms(net, net.max_vms()));
        }
        match tx.execute(
            "INSERT INTO clusters(name, origin_site_id, overlay_net, state)
             VALUES (?1, ?2, ?3, 'defined')",
            params![plan.name, origin_id, net.to_string()],
        ) {
            Ok(_) => {}
            Err(e) if unique_violation(&e) => {
                return Err(StoreError::Exists {
                    kind: "cluster",
                    name: plan.name.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        let cid = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO overlays(cluster_id, community, secret_ref, supernode)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                cid,
                plan.overlay.community,
                plan.overlay.secret_ref,
                plan.overlay.supernode
            ],
        )?;
        let (controller_id, next_mac): (i64, i64) = tx.query_row(
            "SELECT controller_id, next_mac FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let end = next_mac + plan.vms.len() as i64;
        if end > i64::from(u32::MAX) {
            return Err(StoreError::MacsExhausted);
        }
        tx.execute("UPDATE meta SET next_mac = ?1 WHERE id = 1", [end])?;
        for (i, v) in plan.vms.iter().enumerate() {
            let mac = Mac::from_counter(controller_id as u8, (next_mac + i as i64) as u32);
            let ip = vm_ip(&net, i).ok_or(StoreError::TooManyVms(net, net.max_vms()))?;
            match tx.execute(
                "INSERT INTO vms(cluster_id, name, role, site_id, host, memory_mb, mac, ip,
                                 state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'defined')",
                params![
                    cid,
                    v.name,
                    v.role.as_str(),
                    site_ids[&v.site],
                    v.host,
                    v.memory_mb as i64,
                    mac.as_u64() as i64,
                    ip.to_string()
                ],
            ) {
                Ok(_) => {}
                Err(e) if unique_violation(&e) => {
                    return Err(StoreError::Exists {
                        kind: "vm (name or MAC)",
                        name: format!("{} / {mac}", v.name),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        for a in &plan.attachments {
            tx.execute(
                "INSERT INTO attachments(cluster_id, site_id, host, tap, bridge, edge_name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![cid, site_ids[&a.site], a.host, a.tap, a.bridge, a.edge_name],
            )?;
        }
        tx.commit()?;
        self.cluster(&plan.name)
    }

    fn cluster(&self, name: &str) -> Result<Cluster> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT c.id, c.name, s.name, c.overlay_net, c.state FROM clusters c
                 JOIN sites s ON s.id = c.origin_site_id WHERE c.name = ?1",
            )?
            .query_row([name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "cluster",
                name: name.into(),
            })?;
        self.load_cluster(row.0, row.1, row.2, row.3, row.4)
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        // One query per table for every cluster (not four per cluster), put together by
        // cluster id; site names from one read of `sites`, not a join per row.
        let sites = self.site_names()?;
        let mut out = Vec::new();
        let mut at = ClusterIndex::default();
        let mut st = self.conn.prepare_cached(
            "SELECT c.id, c.name, c.origin_site_id, c.overlay_net, c.state,
                    o.community, o.secret_ref, o.supernode
             FROM clusters c LEFT JOIN overlays o ON o.cluster_id = c.id ORDER BY c.name",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let name: String = r.get(1)?;
            let overlay = match (r.get(5)?, r.get(6)?, r.get(7)?) {
                (Some(community), Some(secret_ref), Some(supernode)) => Overlay {
                    community,
                    secret_ref,
                    supernode,
                },
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "cluster {name} has no overlay"
                    )))
                }
            };
            at.insert(id, out.len());
            let origin = sites.name(r.get(2)?)?;
            let (net, state) = (r.get(3)?, r.get(4)?);
            out.push(cluster_of(
                id,
                name,
                origin,
                net,
                state,
                overlay,
                Vec::new(),
                Vec::new(),
            )?);
        }
        let mut st = self
            .conn
            .prepare_cached(&vm_select("v.site_id", "ORDER BY v.id"))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(i) = at.get(r.get(0)?) {
                out[i].vms.push(vm_of_row(r, sites.name(r.get(3)?)?)?);
            }
        }
        let mut st = self
            .conn
            .prepare_cached(&attachment_select("a.site_id", "ORDER BY a.id"))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(i) = at.get(r.get(0)?) {
                out[i]
                    .attachments
                    .push(attachment_of_row(r, sites.name(r.get(1)?)?)?);
            }
        }
        Ok(out)
    }

    fn cluster_summaries(&self, after: Option<&str>, limit: usize) -> Result<Vec<ClusterSummary>> {
        // The VM count comes from the (cluster_id, ip) index, not from the VM rows.
        let mut st = self.conn.prepare_cached(
            "SELECT c.name, c.state, s.name, c.overlay_net,
                    (SELECT count(*) FROM vms v WHERE v.cluster_id = c.id)
             FROM clusters c JOIN sites s ON s.id = c.origin_site_id
             WHERE ?1 IS NULL OR c.name > ?1 ORDER BY c.name LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(params![after, limit], |r| {
            Ok(ClusterSummary {
                name: r.get(0)?,
                state: r.get(1)?,
                origin: r.get(2)?,
                overlay_net: r.get(3)?,
                vms: r.get::<_, i64>(4)? as usize,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn cluster_listing(&self, after: Option<&str>, limit: usize) -> Result<Listing> {
        self.listing(ListingOf::Page { after, limit })
    }

    fn cluster_listing_of(&self, name: &str) -> Result<Listing> {
        let l = self.listing(ListingOf::Named(name))?;
        if l.is_empty() {
            return Err(StoreError::NotFound {
                kind: "cluster",
                name: name.into(),
            });
        }
        Ok(l)
    }

    fn cluster_of_vm(&self, vm: &str) -> Result<Cluster> {
        let name: String = self
            .conn
            .prepare_cached(
                "SELECT c.name FROM vms v JOIN clusters c ON c.id = v.cluster_id
                 WHERE v.name = ?1",
            )?
            .query_row([vm], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "vm",
                name: vm.into(),
            })?;
        self.cluster(&name)
    }

    fn set_cluster_state(&mut self, name: &str, state: &str) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE clusters SET state = ?2 WHERE name = ?1",
            params![name, state],
        )?;
        found(n, "cluster", name)
    }

    fn set_vm_state(&mut self, vm: &str, state: &str) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE vms SET state = ?2 WHERE name = ?1",
            params![vm, state],
        )?;
        found(n, "vm", vm)
    }

    fn move_vm(&mut self, vm: &str, site: &str, host: &str) -> Result<()> {
        let site_id = self.site_id(site)?;
        let n = self.conn.execute(
            "UPDATE vms SET site_id = ?2, host = ?3 WHERE name = ?1",
            params![vm, site_id, host],
        )?;
        found(n, "vm", vm)
    }

    fn delete_cluster(&mut self, name: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM clusters WHERE name = ?1", [name])?;
        found(n, "cluster", name)
    }

    fn all_macs(&self) -> Result<Vec<Mac>> {
        let macs: Vec<i64> = self
            .conn
            .prepare("SELECT mac FROM vms ORDER BY mac")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(macs.into_iter().map(|m| Mac::from_u64(m as u64)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(name: &str, sites: &[(&str, usize)]) -> ClusterPlan {
        let mut vms = vec![PlannedVm {
            name: format!("{name}-fe"),
            role: Role::Frontend,
            site: sites[0].0.into(),
            host: "h0".into(),
            memory_mb: 512,
        }];
        let mut k = 0;
        for (site, n) in sites {
            for _ in 0..*n {
                k += 1;
                vms.push(PlannedVm {
                    name: format!("{name}-c{k}"),
                    role: Role::Compute,
                    site: (*site).into(),
                    host: "h0".into(),
                    memory_mb: 256,
                });
            }
        }
        let mut attachments: Vec<Attachment> = Vec::new();
        for v in &vms {
            if !attachments.iter().any(|a| a.site == v.site) {
                attachments.push(Attachment {
                    site: v.site.clone(),
                    host: v.host.clone(),
                    tap: "mvt1".into(),
                    bridge: "mvb1".into(),
                    edge_name: format!("{}-{}-0", v.site, v.host),
                });
            }
        }
        ClusterPlan {
            name: name.into(),
            origin: sites[0].0.into(),
            overlay: Overlay {
                community: format!("mvc-{name}"),
                secret_ref: format!("file:/tmp/{name}"),
                supernode: "198.18.0.1:7701".into(),
            },
            overlay_net: None,
            pool: "198.19.0.0/16".parse().unwrap(),
            vms,
            attachments,
        }
    }

    fn three_sites() -> SqliteStore {
        let mut s = SqliteStore::open_in_memory().unwrap();
        for n in ["A", "B", "C"] {
            s.add_site(n, "198.18.0.1:7000", "00").unwrap();
        }
        s
    }

    #[test]
    fn sites_add_list_remove() {
        let mut s = three_sites();
        assert!(matches!(
            s.add_site("A", "x", "y"),
            Err(StoreError::Exists { .. })
        ));
        assert_eq!(s.sites().unwrap().len(), 3);
        s.create_cluster(&plan("k", &[("A", 1), ("B", 1)])).unwrap();
        let e = s.remove_site("B").unwrap_err();
        assert!(e.to_string().contains("cluster(s) k;"), "{e}");
        // Named once each, by name, whether used as origin, by VMs, or both.
        s.create_cluster(&plan("j", &[("B", 2), ("A", 1)])).unwrap();
        for site in ["A", "B"] {
            let e = s.remove_site(site).unwrap_err();
            assert!(e.to_string().contains("cluster(s) j, k;"), "{e}");
        }
        s.remove_site("C").unwrap();
        assert!(matches!(s.site("C"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn sites_with_hosts_match_each_sites_hosts() {
        let mut s = three_sites();
        let host = |name: &str, free_vms| HostInfo {
            name: name.into(),
            vcpus: 4,
            memory_mb: 8192,
            max_vms: 8,
            free_vms,
            free_memory_mb: 4096,
        };
        s.set_hosts("C", &[host("z", 1), host("a", 2)]).unwrap();
        s.set_hosts("A", &[host("h0", 3)]).unwrap();
        let all = s.sites_with_hosts().unwrap();
        assert_eq!(all.len(), 3);
        for (site, hosts) in &all {
            assert_eq!(site, &s.site(&site.name).unwrap());
            assert_eq!(hosts, &s.hosts(&site.name).unwrap());
        }
        let names: Vec<(&str, Vec<&str>)> = all
            .iter()
            .map(|(s, h)| (s.name.as_str(), h.iter().map(|h| h.name.as_str()).collect()))
            .collect();
        assert_eq!(
            names,
            [("A", vec!["h0"]), ("B", vec![]), ("C", vec!["a", "z"])]
        );
    }

    #[test]
    fn cluster_records_everything() {
        let mut s = three_sites();
        let c = s
            .create_cluster(&plan("k", &[("A", 3), ("B", 2), ("C", 2)]))
            .unwrap();
        assert_eq!(c.vms.len(), 8);
        assert_eq!(c.attachments.len(), 3);
        assert_eq!(c.overlay.supernode, "198.18.0.1:7701");
        assert_eq!(c.overlay_net.to_string(), "198.19.0.0/24");
        assert_eq!(c.frontend().unwrap().ip, c.frontend_ip());
        assert!(matches!(
            s.create_cluster(&plan("k", &[("A", 1)])),
            Err(StoreError::Exists { .. })
        ));
        let c2 = s.create_cluster(&plan("j", &[("B", 1)])).unwrap();
        assert_ne!(c.overlay_net, c2.overlay_net);
        s.delete_cluster("k").unwrap();
        assert_eq!(s.clusters().unwrap().len(), 1);
        // the network is reused, MACs are not
        let c3 = s.create_cluster(&plan("m", &[("B", 1)])).unwrap();
        assert_eq!(c3.overlay_net, c.overlay_net);
        // a network the user chose may be used by another cluster too (its own segment)
        let mut p = plan("n", &[("B", 1)]);
        p.overlay_net = Some(c2.overlay_net);
        assert_eq!(s.create_cluster(&p).unwrap().overlay_net, c2.overlay_net);
        let mut p = plan("small", &[("B", 30)]);
        p.overlay_net = Some("198.19.9.0/27".parse().unwrap());
        assert!(matches!(
            s.create_cluster(&p),
            Err(StoreError::TooManyVms(_, 22))
        ));
        for v in &c3.vms {
            assert!(c.vms.iter().all(|o| o.mac != v.mac));
        }
    }

    /// The pool's pick skips every candidate that a network overlaps (a supernet, the
    /// same network, one inside it), through the indexed probes and, past them, through
    /// the read of every network.
    #[test]
    fn pool_pick_skips_overlapping_networks() {
        let mut s = three_sites();
        let mut given = |name: &str, net: &str| {
            let mut p = plan(name, &[("A", 1)]);
            p.overlay_net = Some(net.parse().unwrap());
            s.create_cluster(&p).unwrap();
        };
        given("super", "198.19.0.0/23");
        given("same", "198.19.2.0/24");
        given("inside", "198.19.3.96/27");
        // Neighbours that overlap nothing: text that sorts near the candidates'.
        given("near1", "198.19.40.0/24");
        given("near2", "198.1.4.0/24");
        let mut pick = |name: &str| {
            s.create_cluster(&plan(name, &[("A", 1)]))
                .unwrap()
                .overlay_net
                .to_string()
        };
        assert_eq!(pick("p4"), "198.19.4.0/24");
        for i in 5..=40 {
            let want = if i < 40 { i } else { 41 };
            assert_eq!(pick(&format!("p{i}")), format!("198.19.{want}.0/24"));
        }
        // A network that holds the whole pool leaves nothing.
        let mut p = plan("all", &[("A", 1)]);
        p.overlay_net = Some("198.16.0.0/14".parse().unwrap());
        s.create_cluster(&p).unwrap();
        s.delete_cluster("p4").unwrap();
        assert!(matches!(
            s.create_cluster(&plan("none", &[("A", 1)])),
            Err(StoreError::NoSubnet(_))
        ));
    }

    #[test]
    fn listing_in_one_pass_matches_loading_each_cluster() {
        let mut s = three_sites();
        for (name, sites) in [
            ("zeta", &[("B", 2), ("C", 1)][..]),
            ("alpha", &[("A", 3)][..]),
            ("mid", &[("C", 1), ("A", 2), ("B", 1)][..]),
        ] {
            s.create_cluster(&plan(name, sites)).unwrap();
        }
        s.set_vm_state("mid-c2", "running").unwrap();
        let all = s.clusters().unwrap();
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        for c in &all {
            assert_eq!(c, &s.cluster(&c.name).unwrap());
        }
        let sums = s.cluster_summaries(None, usize::MAX).unwrap();
        assert_eq!(sums.len(), 3);
        for (x, c) in sums.iter().zip(&all) {
            assert_eq!(
                (&x.name, &x.state, &x.origin, x.vms),
                (&c.name, &c.state, &c.origin, c.vms.len())
            );
            assert_eq!(x.overlay_net, c.overlay_net.to_string());
        }
        // Pages: after a name, at most `limit`.
        let page = s.cluster_summaries(Some("alpha"), 1).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].name, "mid");
        assert!(s.cluster_summaries(Some("zeta"), 10).unwrap().is_empty());
        assert_eq!(s.cluster_of_vm("mid-c2").unwrap().name, "mid");
        assert!(matches!(
            s.cluster_of_vm("nope"),
            Err(StoreError::NotFound { kind: "vm", .. })
        ));
    }

    /// `cluster list --json` and `vm list --json` as they were printed from loaded
    /// clusters, and as they are from a listing: the same bytes.
    #[test]
    fn listing_json_is_the_json_of_loaded_clusters() {
        let mut s = three_sites();
        s.add_site("s\"q\\é\u{1}", "198.18.0.1:7000", "00").unwrap();
        for (name, sites) in [
            ("zeta", &[("B", 2), ("C", 1)][..]),
            (
                "quo\"te\\back\tslash\u{7}",
                &[("A", 1), ("s\"q\\é\u{1}", 2)][..],
            ),
            ("alpha", &[("A", 3)][..]),
            ("ünï/cødé", &[("C", 1), ("A", 2), ("B", 1)][..]),
        ] {
            s.create_cluster(&plan(name, sites)).unwrap();
        }
        s.set_vm_state("alpha-c2", "run\"ning\n").unwrap();
        s.move_vm("zeta-c1", "A", "h\\1").unwrap();
        let all = s.clusters().unwrap();
        let listing = s.cluster_listing(None, usize::MAX).unwrap();
        assert_eq!(listing.len(), 4);
        assert_eq!(pretty(&all), pretty(&listing));
        let pairs: Vec<(String, Vm)> = all
            .iter()
            .flat_map(|c| c.vms.iter().map(|v| (c.name.clone(), v.clone())))
            .collect();
        assert_eq!(pretty(&pairs), pretty(&listing.vms()));
        // Pages: after a name, at most `limit`, read cluster by cluster.
        for (after, limit) in [
            (None, 2),
            (Some("alpha"), 2),
            (Some("alpha"), 9),
            (Some("zz"), 1),
        ] {
            let page: Vec<&Cluster> = all
                .iter()
                .filter(|c| after.is_none_or(|a| c.name.as_str() > a))
                .take(limit)
                .collect();
            let l = s.cluster_listing(after, limit).unwrap();
            assert_eq!(pretty(&page), pretty(&l), "after {after:?} limit {limit}");
        }
        assert!(s.cluster_listing(None, 0).unwrap().is_empty());
        // One cluster by name (`vm list --cluster`): its VMs, as from the loaded cluster.
        for c in &all {
            let one = s.cluster_listing_of(&c.name).unwrap();
            let pairs: Vec<(&str, &Vm)> = c.vms.iter().map(|v| (c.name.as_str(), v)).collect();
            assert_eq!(pretty(&pairs), pretty(&one.vms()), "{}", c.name);
            assert_eq!(pretty(&[c]), pretty(&one));
        }
        assert!(matches!(
            s.cluster_listing_of("nope"),
            Err(StoreError::NotFound {
                kind: "cluster",
                ..
            })
        ));
        // The text of `vm list`: a header and a line per VM, in the JSON's order (of a
        // cluster without line breaks in its fields).
        let zeta = s.cluster("zeta").unwrap();
        let table = s.cluster_listing_of("zeta").unwrap().vm_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + zeta.vms.len());
        assert!(lines[0].starts_with("CLUSTER      VM           ROLE"));
        for (v, line) in zeta.vms.iter().zip(&lines[1..]) {
            let c = "zeta";
            let want = format!("{c:<12} {:<12} {:<9}", v.name, v.role.as_str());
            assert!(line.starts_with(&want), "{line}");
            let tail = format!("{:<15} {}", v.ip.to_string(), v.state);
            assert!(line.ends_with(&tail), "{line}");
        }
        // A closed pipe is an error of the write, not a panic.
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let e = serde_json::to_writer_pretty(Closed, &listing).unwrap_err();
        assert_eq!(e.io_error_kind(), Some(std::io::ErrorKind::BrokenPipe));
    }

    /// Pretty JSON as `--json` prints it.
    fn pretty<T: serde::Serialize>(v: &T) -> String {
        serde_json::to_string_pretty(v).unwrap()
    }

    #[test]
    fn failed_create_leaves_nothing() {
        let mut s = three_sites();
        let mut p = plan("k", &[("A", 2)]);
        p.vms[1].name = p.vms[0].name.clone(); // duplicate VM name: the insert fails
        assert!(s.create_cluster(&p).is_err());
        assert!(s.clusters().unwrap().is_empty());
        assert!(s.all_macs().unwrap().is_empty());
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM overlays", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn duplicate_mac_is_refused_by_the_schema() {
        let mut s = three_sites();
        let c = s.create_cluster(&plan("k", &[("A", 1)])).unwrap();
        let mac = c.vms[0].mac.as_u64() as i64;
        let e = s.conn.execute(
            "INSERT INTO vms(cluster_id, name, role, site_id, host, memory_mb, mac, ip, state)
             VALUES (?1, 'x', 'compute', 1, 'h0', 1, ?2, '198.19.9.9', 'defined')",
            params![c.id, mac],
        );
        assert!(unique_violation(&e.unwrap_err()));
    }

    #[test]
    fn version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO meta VALUES (1, 7, 3);
                 INSERT INTO sites VALUES (1, 'A', '198.18.0.1:7000', 'ab');
                 INSERT INTO clusters VALUES (1, 'k', 1, 4, 'running');
                 INSERT INTO overlays VALUES (1, 'mvc-k', 'file:/tmp/k', '198.18.0.1:7704');
                 INSERT INTO vms VALUES (1, 1, 'k-fe', 'frontend', 1, 'h0', 256, 1,
                                         '198.19.4.1', 'running');
                 INSERT INTO attachments VALUES (1, 1, 1, 'h0', 'mvt4', 'mvb4', 'A-h0-0');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let c = s.cluster("k").unwrap();
        assert_eq!(c.overlay_net.to_string(), "198.19.4.0/24");
        assert_eq!((c.vms.len(), c.attachments.len()), (1, 1));
        assert_eq!(c.overlay.supernode, "198.18.0.1:7704");
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let before = {
            let mut s = SqliteStore::open(&path).unwrap();
            s.add_site("A", "198.18.0.1:7000", "ab").unwrap();
            s.set_hosts(
                "A",
                &[HostInfo {
                    name: "h0".into(),
                    vcpus: 2,
                    memory_mb: 4096,
                    max_vms: 8,
                    free_vms: 8,
                    free_memory_mb: 4096,
                }],
            )
            .unwrap();
            s.create_cluster(&plan("k", &[("A", 2)])).unwrap();
            s.set_vm_state("k-c1", "running").unwrap();
            s.cluster("k").unwrap()
        };
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(s.cluster("k").unwrap(), before);
        assert_eq!(s.hosts("A").unwrap().len(), 1);
        // the MAC counter persisted too
        let c = s.create_cluster(&plan("j", &[("A", 1)])).unwrap();
        for v in &c.vms {
            assert!(before.vms.iter().all(|o| o.mac != v.mac));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever sequence of creates and destroys, across sites and clusters, every
        /// live MAC is distinct, locally administered unicast, and never reissued.
        #[test]
        fn macs_unique_across_sites_and_clusters(
            ops in prop::collection::vec((0usize..4, 0usize..6, 0usize..6, any::<bool>()), 1..24)
        ) {
            let mut s = three_sites();
            let mut ever = std::collections::HashSet::new();
            let mut live: Vec<String> = Vec::new();
            for (i, (a, b, c, destroy)) in ops.into_iter().enumerate() {
                if destroy && !live.is_empty() {
                    let name = live.remove(i % live.len());
                    s.delete_cluster(&name).unwrap();
                    continue;
                }
                let name = format!("k{i}");
                let cl = s.create_cluster(&plan(&name, &[("A", a), ("B", b), ("C", c)])).unwrap();
                live.push(name);
                for v in &cl.vms {
                    prop_assert!(v.mac.is_local_unicast());
                    prop_assert!(ever.insert(v.mac), "MAC {} issued twice", v.mac);
                }
            }
            let macs = s.all_macs().unwrap();
            let set: std::collections::HashSet<_> = macs.iter().collect();
            prop_assert_eq!(set.len(), macs.len());
        }
    }
}
