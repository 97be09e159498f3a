//! The peer table and its deadline index: every peer's earliest timer, ordered, so the
//! core's next deadline ([`super::EdgeCore::poll_timeout`]) is the first entry and a poll
//! visits only the peers whose timers came, instead of walking every peer after every
//! event (a community of K edges in one simulation cost O(K^3) so).
//!
//! Invariant: every peer has one entry, and it is not later than the peer's earliest
//! timer ([`Peer::deadline`]); earlier only costs a poll that finds nothing to do for it.
//! It holds because every mutable access marks the peer touched ([`PeerTable::get_mut`],
//! [`PeerTable::values_mut`] marks all) and every entry point of the core ends with
//! [`PeerTable::reindex`], which moves the entries of touched peers earlier when their
//! deadline did (most changes, a packet received or a peer listed again, only postpone
//! timers: they cost one computation, no reordering). A peer is marked once however
//! often it is accessed ([`Peer::touched`]): a datagram reaches its peer several times
//! (session, replay window, path, statistics), and its deadline is computed once. A poll
//! sets the entries of the peers it visited exactly ([`PeerTable::reindex_exact`]),
//! which also takes their marks. What a deadline depends on
//! besides the peer: the timers and the edge's id (fixed), and "at once", written as the
//! time of the last poll, which only moves forward (an older entry is earlier). Debug
//! builds check the invariant against a full scan whenever the deadline is asked for.
//!
//! The table also finds peers by name ([`PeerTable::namesakes`]: an edge that restarted
//! comes back under its name with a new id), which every introduction and every new
//! session asks, so that it does not walk the table either.

use std::collections::BTreeSet;
use std::time::Instant;

use foldhash::fast::FixedState;

use crate::wire::EdgeId;

use super::peer::Peer;
use super::{Map, Timers};

/// What a peer's timers are computed from besides the peer itself.
#[derive(Clone, Copy)]
pub(super) struct DeadlineCtx<'a> {
    pub(super) timers: &'a Timers,
    pub(super) me: EdgeId,
    /// "At once": the last poll (a deadline not later than it is due now).
    pub(super) due: Instant,
}

impl<'a> DeadlineCtx<'a> {
    pub(super) fn of(timers: &'a Timers, me: EdgeId, due: Instant) -> Self {
        Self { timers, me, due }
    }
}

/// The peers and the index of their deadlines.
pub(super) struct PeerTable {
    map: Map<EdgeId, Peer>,
    /// (not later than the peer's earliest timer, peer): one entry per peer, the time of
    /// which is also in [`Peer::indexed_at`].
    index: BTreeSet<(Instant, EdgeId)>,
    /// Peers changed since the last [`PeerTable::reindex`], each once (those marked
    /// [`Peer::touched`]; one whose mark [`PeerTable::reindex_exact`] took is skipped).
    touched: Vec<EdgeId>,
    /// Every peer may have changed.
    all_touched: bool,
    /// Name -> the peers of that name (set by [`PeerTable::set_name`]).
    names: Map<String, Vec<EdgeId>>,
}

impl PeerTable {
    /// An empty table whose hash maps are seeded with `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Self {
            map: Map::with_hasher(FixedState::with_seed(seed)),
            index: BTreeSet::new(),
            touched: Vec::new(),
            all_touched: false,
            names: Map::with_hasher(FixedState::with_seed(seed)),
        }
    }

    pub(super) fn get(&self, id: &EdgeId) -> Option<&Peer> {
        self.map.get(id)
    }

    /// The peer, marked touched: its deadline is recomputed at the end of the entry point.
    pub(super) fn get_mut(&mut self, id: &EdgeId) -> Option<&mut Peer> {
        let p = self.map.get_mut(id)?;
        touch(&mut self.touched, p);
        Some(p)
    }

    pub(super) fn contains_key(&self, id: &EdgeId) -> bool {
        self.map.contains_key(id)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &EdgeId> {
        self.map.keys()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Peer> {
        self.map.values()
    }

    /// Every peer, all marked touched.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.all_touched = true;
        self.map.values_mut()
    }

    /// Adds a peer (indexed at the end of the entry point, as a touched one).
    pub(super) fn insert(&mut self, mut p: Peer) {
        p.touched = false;
        touch(&mut self.touched, &mut p);
        if let Some(old) = self.map.insert(p.id, p) {
            self.unindex(&old);
        }
    }

    pub(super) fn remove(&mut self, id: &EdgeId) -> Option<Peer> {
        let p = self.map.remove(id)?;
        self.unindex(&p);
        Some(p)
    }

    fn unindex(&mut self, p: &Peer) {
        if let Some(at) = p.indexed_at {
            self.index.remove(&(at, p.id));
        }
        unname(&mut self.names, &p.name, &p.id);
    }

    /// Names peer `id` `name` (what its supernode's list says).
    pub(super) fn set_name(&mut self, id: &EdgeId, name: String) {
        let Some(p) = self.map.get_mut(id) else {
            return;
        };
        if p.name == name {
            return;
        }
        let old = std::mem::replace(&mut p.name, name.clone());
        unname(&mut self.names, &old, id);
        self.names.entry(name).or_default().push(*id);
    }

    /// The other peers named as peer `id`.
    pub(super) fn namesakes(&self, id: &EdgeId) -> Vec<EdgeId> {
        self.map
            .get(id)
            .and_then(|p| self.names.get(&p.name))
            .map(|v| v.iter().filter(|x| *x != id).copied().collect())
            .unwrap_or_default()
    }

    /// The earliest entry: when a poll must run next for the peers' sake.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.index.first().map(|e| e.0)
    }

    /// The peers whose entries are not later than `now` (the only ones with timers due).
    pub(super) fn due_by(&self, now: Instant, into: &mut Vec<EdgeId>) {
        into.clear();
        into.extend(self.index.range(..=(now, [u8::MAX; 8])).map(|(_, id)| *id));
    }

    /// Moves the entries of the peers touched since the last call earlier where their
    /// deadlines now are (and indexes new peers).
    pub(super) fn reindex(&mut self, c: &DeadlineCtx) {
        if self.all_touched {
            self.all_touched = false;
            self.touched.clear();
            let Self { map, index, .. } = self;
            for p in map.values_mut() {
                p.touched = false;
                lower(index, p, c);
            }
            return;
        }
        let mut touched = std::mem::take(&mut self.touched);
        for id in touched.drain(..) {
            if let Some(p) = self.map.get_mut(&id) {
                if std::mem::take(&mut p.touched) {
                    lower(&mut self.index, p, c);
                }
            }
        }
        self.touched = touched;
    }

    /// Sets the entries of `ids` (the peers a poll visited) to their deadlines, which
    /// takes their marks: [`PeerTable::reindex`] after it does not compute them again.
    pub(super) fn reindex_exact(&mut self, ids: &[EdgeId], c: &DeadlineCtx) {
        for id in ids {
            if let Some(p) = self.map.get_mut(id) {
                p.touched = false;
                let d = p.deadline(c);
                if p.indexed_at != Some(d) {
                    if let Some(at) = p.indexed_at {
                        self.index.remove(&(at, p.id));
                    }
                    self.index.insert((d, p.id));
                    p.indexed_at = Some(d);
                }
            }
        }
    }

    /// Checks the invariant against a full scan: every peer's entry is there and not
    /// later than its deadline, nothing else is indexed, and no peer waits for
    /// [`PeerTable::reindex`] (debug builds, between entry points).
    #[cfg(debug_assertions)]
    pub(super) fn check_index(&self, c: &DeadlineCtx) {
        debug_assert_eq!(self.index.len(), self.map.len(), "one entry per peer");
        debug_assert!(
            self.touched.is_empty() && !self.all_touched,
            "touched peers not reindexed"
        );
        for p in self.map.values() {
            debug_assert!(!p.touched, "a marked peer not reindexed");
            let at = p.indexed_at.expect("every peer is indexed");
            debug_assert!(self.index.contains(&(at, p.id)), "entry in the index");
            let d = p.deadline(c);
            debug_assert!(
                at <= d,
                "entry later than the peer's deadline: {at:?} > {d:?}"
            );
        }
    }
}

/// Marks `p` touched, listing it in `touched` the first time.
fn touch(touched: &mut Vec<EdgeId>, p: &mut Peer) {
    if !p.touched {
        p.touched = true;
        touched.push(p.id);
    }
}

/// Takes `id` off the peers named `name`.
fn unname(names: &mut Map<String, Vec<EdgeId>>, name: &str, id: &EdgeId) {
    if let Some(v) = names.get_mut(name) {
        v.retain(|x| x != id);
        if v.is_empty() {
            names.remove(name);
        }
    }
}

/// Moves `p`'s entry to its deadline if that is earlier (or indexes it).
fn lower(index: &mut BTreeSet<(Instant, EdgeId)>, p: &mut Peer, c: &DeadlineCtx) {
    let d = p.deadline(c);
    match p.indexed_at {
        Some(at) if at <= d => {}
        old => {
            if let Some(at) = old {
                index.remove(&(at, p.id));
            }
            index.insert((d, p.id));
            p.indexed_at = Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn table() -> PeerTable {
        PeerTable::new(7)
    }

    /// Peers listed by a supernode at different times expire at different times: the
    /// index yields exactly the ones due, and moves only when a deadline got earlier or
    /// the peer was visited.
    #[test]
    fn due_peers_are_exactly_those_whose_deadline_came() {
        let t0 = Instant::now();
        let timers = Timers::default();
        let c = DeadlineCtx {
            timers: &timers,
            me: [0; 8],
            due: t0,
        };
        let mut tab = table();
        for k in 1..=20u8 {
            // Nobody lists them and they have no session: only expiry is pending.
            let p = Peer::new([k; 8], t0 + Duration::from_secs(u64::from(k)));
            tab.insert(p);
        }
        tab.reindex(&c);
        let mut due = Vec::new();
        for k in 0..=20u64 {
            let at = t0 + timers.peer_expiry + Duration::from_secs(k);
            // Expired once strictly older than `peer_expiry`.
            tab.due_by(at, &mut due);
            assert_eq!(due.len(), k.saturating_sub(1) as usize, "at {k} s");
            tab.due_by(at + Duration::from_nanos(1), &mut due);
            let mut want: Vec<EdgeId> = (1..=k as u8).map(|i| [i; 8]).collect();
            want.sort();
            due.sort();
            assert_eq!(due, want, "due just after {k} s");
        }
        tab.check_index(&c);
        // Listed later: the entry stays early (a wasted visit at most) until visited.
        let first = t0 + Duration::from_secs(1) + timers.peer_expiry + Duration::from_nanos(1);
        assert_eq!(tab.next_deadline(), Some(first));
        tab.get_mut(&[1; 8]).unwrap().last_listed = Some(t0 + Duration::from_secs(50));
        tab.reindex(&c);
        assert_eq!(tab.next_deadline(), Some(first));
        tab.check_index(&c);
        tab.reindex_exact(&[[1; 8]], &c);
        assert_eq!(
            tab.next_deadline(),
            Some(first + Duration::from_secs(1)),
            "peer 2 is next"
        );
        // Listed again by a supernode (all touched): nothing moves earlier.
        for p in tab.values_mut() {
            p.last_listed = Some(t0 + Duration::from_secs(60));
        }
        tab.reindex(&c);
        tab.check_index(&c);
        assert_eq!(tab.next_deadline(), Some(first + Duration::from_secs(1)));
        // A change that makes a timer earlier moves the entry: a session is wanted at once.
        tab.get_mut(&[9; 8]).unwrap().listed_by = 1;
        tab.reindex(&c);
        tab.check_index(&c);
        assert_eq!(tab.next_deadline(), Some(t0));
        tab.due_by(t0, &mut due);
        assert_eq!(due, vec![[9; 8]]);
        // Removed peers leave the index.
        assert!(tab.remove(&[9; 8]).is_some());
        tab.check_index(&c);
        assert_eq!(tab.next_deadline(), Some(first + Duration::from_secs(1)));
    }

    /// A peer accessed several times in one entry point is listed once for
    /// [`PeerTable::reindex`] (its deadline computed once), and a poll's exact reindexing
    /// takes the marks of the peers it visited.
    #[test]
    fn a_peer_is_reindexed_once_per_entry_point() {
        let t0 = Instant::now();
        let timers = Timers::default();
        let c = DeadlineCtx::of(&timers, [0; 8], t0);
        let mut tab = table();
        tab.insert(Peer::new([1; 8], t0));
        tab.insert(Peer::new([2; 8], t0));
        for _ in 0..5 {
            tab.get_mut(&[1; 8]).unwrap().last_rx = Some(t0);
        }
        tab.get_mut(&[2; 8]).unwrap().last_rx = Some(t0);
        assert_eq!(tab.touched, vec![[1; 8], [2; 8]], "each peer listed once");
        tab.reindex(&c);
        tab.check_index(&c);
        tab.get_mut(&[1; 8]).unwrap().last_rx = Some(t0 + Duration::from_secs(1));
        tab.get_mut(&[2; 8]).unwrap().last_rx = Some(t0 + Duration::from_secs(1));
        tab.reindex_exact(&[[1; 8]], &c);
        assert!(!tab.get(&[1; 8]).unwrap().touched, "visited: mark taken");
        assert!(tab.get(&[2; 8]).unwrap().touched);
        tab.reindex(&c);
        tab.check_index(&c);
        assert!(tab.values().all(|p| !p.touched));
    }

    #[test]
    fn namesakes_follow_renames_and_removals() {
        let t0 = Instant::now();
        let mut tab = table();
        for k in 1..=3u8 {
            tab.insert(Peer::new([k; 8], t0));
        }
        assert!(
            tab.namesakes(&[1; 8]).is_empty(),
            "unnamed peers have no namesakes"
        );
        tab.set_name(&[1; 8], "a".into());
        tab.set_name(&[2; 8], "a".into());
        tab.set_name(&[3; 8], "b".into());
        assert_eq!(tab.namesakes(&[1; 8]), vec![[2; 8]]);
        assert!(tab.namesakes(&[3; 8]).is_empty());
        tab.set_name(&[3; 8], "a".into());
        let mut v = tab.namesakes(&[1; 8]);
        v.sort_unstable();
        assert_eq!(v, vec![[2; 8], [3; 8]]);
        tab.remove(&[2; 8]);
        assert_eq!(tab.namesakes(&[1; 8]), vec![[3; 8]]);
        tab.set_name(&[3; 8], "c".into());
        assert!(tab.namesakes(&[1; 8]).is_empty());
        assert_eq!(tab.get(&[3; 8]).map(|p| p.name.as_str()), Some("c"));
    }
}
