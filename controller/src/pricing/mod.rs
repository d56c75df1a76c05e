//! Prices that move: what a GPU-hour costs on each node, from the node's own
//! config or from price sources the controller reads (files or URLs,
//! refreshed on a schedule), with every change kept as history.
//!
//! - [`table`] parses a source's document into a [`PriceTable`].
//! - [`source`] fetches documents (`file:` paths, `http(s)://` URLs).
//! - [`PriceBook`] merges the sources' tables (the first source listed wins
//!   a key two of them name), records each change, answers "what does this
//!   node cost now" for the scheduler and "what did it cost during each
//!   second of this allocation" for the ledger.
//!
//! A key's `provider`, `region` and `model` may be empty: it then applies
//! to any value. A node takes the most specific key that matches it (most
//! non-empty fields; ties by key order), and its own configured price when
//! none does. Pure: the caller passes the time and persists the changes.

pub mod source;
pub mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use gpufleet_proto::v1 as proto;

pub use self::table::{PriceTable, TableError};

/// Changes kept (oldest dropped first): at one change per key per refresh,
/// years of a few hundred keys.
pub const MAX_HISTORY: usize = 200_000;

/// What a price applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PriceKey {
    pub provider: String,
    pub region: String,
    /// A normalised GPU model (e.g. `H100-SXM-80GB`) or an instance type.
    pub model: String,
    pub spot: bool,
}

impl fmt::Display for PriceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any = |s: &str| {
            if s.is_empty() {
                "*".to_string()
            } else {
                s.to_string()
            }
        };
        write!(
            f,
            "{}/{}/{}/{}",
            any(&self.provider),
            any(&self.region),
            any(&self.model),
            if self.spot { "spot" } else { "on-demand" }
        )
    }
}

impl PriceKey {
    /// The store id: the display form (names never contain '/').
    pub fn id(&self) -> String {
        self.to_string()
    }

    fn specificity(&self) -> usize {
        [&self.provider, &self.region, &self.model]
            .iter()
            .filter(|s| !s.is_empty())
            .count()
    }

    /// The definition the indexed lookups ([`PriceBook::resolve`],
    /// [`PriceBook::timeline`]) are tested against.
    #[cfg(test)]
    fn matches(&self, node: &NodePriceKey) -> bool {
        self.spot == node.spot
            && (self.provider.is_empty() || self.provider == node.provider)
            && (self.region.is_empty() || self.region == node.region)
            && (self.model.is_empty()
                || self.model == node.model
                || (!node.instance_type.is_empty() && self.model == node.instance_type))
    }

    pub fn to_proto(&self) -> proto::PriceKey {
        proto::PriceKey {
            provider: self.provider.clone(),
            region: self.region.clone(),
            model: self.model.clone(),
            spot: self.spot,
        }
    }

    pub fn from_proto(key: &proto::PriceKey) -> Self {
        Self {
            provider: key.provider.clone(),
            region: key.region.clone(),
            model: key.model.clone(),
            spot: key.spot,
        }
    }
}

/// What a node is, as far as prices go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePriceKey {
    pub provider: String,
    pub region: String,
    /// The node's GPU model (its first GPU's).
    pub model: String,
    pub instance_type: String,
    pub spot: bool,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub at_ms: u64,
    pub key: PriceKey,
    pub old: Option<u64>,
    pub new: Option<u64>,
    pub source: String,
}

impl Change {
    pub fn to_proto(&self) -> proto::PriceChange {
        proto::PriceChange {
            at: Some(ms_ts(self.at_ms)),
            key: Some(self.key.to_proto()),
            old_price_per_gpu_hour_micro_usd: self.old,
            new_price_per_gpu_hour_micro_usd: self.new,
            source: self.source.clone(),
        }
    }

    pub fn from_proto(change: &proto::PriceChange) -> Self {
        Self {
            at_ms: change.at.as_ref().map_or(0, ts_ms),
            key: change
                .key
                .as_ref()
                .map(PriceKey::from_proto)
                .unwrap_or_else(|| PriceKey {
                    provider: String::new(),
                    region: String::new(),
                    model: String::new(),
                    spot: false,
                }),
            old: change.old_price_per_gpu_hour_micro_usd,
            new: change.new_price_per_gpu_hour_micro_usd,
            source: change.source.clone(),
        }
    }

    /// The store id: time-ordered, unique with the key.
    pub fn id(&self) -> String {
        format!("{:013}/{}", self.at_ms, self.key.id())
    }
}

/// A price in force, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub price: u64,
    pub source: String,
    pub since_ms: u64,
}

/// The last refresh of one source.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub name: String,
    /// Its last good table (kept through failed refreshes: a source that is
    /// down does not make its prices vanish).
    pub table: Option<PriceTable>,
    pub last_ok_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// One key's change: (at ms, old, new).
type KeyChange = (u64, Option<u64>, Option<u64>);

/// Merged prices of every source, with their history.
#[derive(Debug, Default)]
pub struct PriceBook {
    current: BTreeMap<PriceKey, Current>,
    /// Oldest first.
    history: VecDeque<Change>,
    /// The same changes by key, oldest first: what a node's prices over
    /// time are read from (a node matches at most 12 keys), so a lookup
    /// never walks the whole history or table.
    by_key: HashMap<PriceKey, VecDeque<KeyChange>>,
    sources: Vec<SourceStatus>,
}

impl PriceBook {
    /// A book for `sources` (in priority order), starting from what the
    /// store held: the prices in force and their history.
    pub fn new(
        sources: Vec<String>,
        current: BTreeMap<PriceKey, Current>,
        mut history: Vec<Change>,
    ) -> Self {
        history.sort_by(|a, b| a.at_ms.cmp(&b.at_ms).then_with(|| a.key.cmp(&b.key)));
        let skip = history.len().saturating_sub(MAX_HISTORY);
        let history: VecDeque<Change> = history.into_iter().skip(skip).collect();
        let mut by_key: HashMap<PriceKey, VecDeque<KeyChange>> = HashMap::new();
        for c in &history {
            by_key
                .entry(c.key.clone())
                .or_default()
                .push_back((c.at_ms, c.old, c.new));
        }
        Self {
            current,
            history,
            by_key,
            sources: sources
                .into_iter()
                .map(|name| SourceStatus {
                    name,
                    ..Default::default()
                })
                .collect(),
        }
    }

    pub fn sources(&self) -> &[SourceStatus] {
        &self.sources
    }

    pub fn current(&self) -> &BTreeMap<PriceKey, Current> {
        &self.current
    }

    pub fn history(&self) -> impl DoubleEndedIterator<Item = &Change> {
        self.history.iter()
    }

    /// Marks a failed refresh; the source's last table stays in force.
    pub fn refresh_failed(&mut self, source: usize, error: String) {
        if let Some(s) = self.sources.get_mut(source) {
            s.last_error = Some(error);
        }
    }

    /// Takes a source's new table at `now_ms`; returns the changes of the
    /// merged prices (to persist, oldest first) and the history entries
    /// dropped to stay within [`MAX_HISTORY`] (to delete).
    pub fn refreshed(
        &mut self,
        source: usize,
        table: PriceTable,
        now_ms: u64,
    ) -> (Vec<Change>, Vec<Change>) {
        let Some(status) = self.sources.get_mut(source) else {
            return (Vec::new(), Vec::new());
        };
        status.table = Some(table);
        status.last_ok_ms = Some(now_ms);
        status.last_error = None;
        // Merge: the first source that names a key wins it. Before a
        // source's first good refresh after a restart, the stored prices of
        // its keys stay (they are what was last known).
        let mut merged: BTreeMap<PriceKey, (u64, String)> = BTreeMap::new();
        let unfetched: BTreeSet<&str> = self
            .sources
            .iter()
            .filter(|s| s.table.is_none())
            .map(|s| s.name.as_str())
            .collect();
        for s in &self.sources {
            if let Some(table) = &s.table {
                for (key, price) in table {
                    merged
                        .entry(key.clone())
                        .or_insert_with(|| (*price, s.name.clone()));
                }
            }
        }
        for (key, current) in &self.current {
            if unfetched.contains(current.source.as_str()) {
                merged
                    .entry(key.clone())
                    .or_insert_with(|| (current.price, current.source.clone()));
            }
        }
        let mut changes = Vec::new();
        let keys: BTreeSet<PriceKey> = self.current.keys().chain(merged.keys()).cloned().collect();
        for key in keys {
            let old = self.current.get(&key).map(|c| c.price);
            let new = merged.get(&key);
            if old == new.map(|(p, _)| *p) {
                continue;
            }
            let source = match (new, self.current.get(&key)) {
                (Some((_, s)), _) | (None, Some(Current { source: s, .. })) => s.clone(),
                (None, None) => String::new(),
            };
            changes.push(Change {
                at_ms: now_ms,
                key: key.clone(),
                old,
                new: new.map(|(p, _)| *p),
                source,
            });
        }
        for change in &changes {
            match change.new {
                Some(price) => {
                    self.current.insert(
                        change.key.clone(),
                        Current {
                            price,
                            source: change.source.clone(),
                            since_ms: now_ms,
                        },
                    );
                }
                None => {
                    self.current.remove(&change.key);
                }
            }
            self.history.push_back(change.clone());
            self.by_key
                .entry(change.key.clone())
                .or_default()
                .push_back((change.at_ms, change.old, change.new));
        }
        let mut dropped = Vec::new();
        while self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                // The oldest change overall is its key's oldest too.
                if let Some(changes) = self.by_key.get_mut(&old.key) {
                    changes.pop_front();
                    if changes.is_empty() {
                        self.by_key.remove(&old.key);
                    }
                }
                dropped.push(old);
            }
        }
        (changes, dropped)
    }

    /// Every key that could match `node` and is known (in force now or in
    /// the history): at most 12 lookups, however large the table.
    fn candidates(&self, node: &NodePriceKey) -> Vec<PriceKey> {
        let mut models = vec![node.model.as_str(), ""];
        if !node.instance_type.is_empty() {
            models.insert(1, node.instance_type.as_str());
        }
        let mut out = Vec::new();
        for provider in [node.provider.as_str(), ""] {
            for region in [node.region.as_str(), ""] {
                for model in &models {
                    let key = PriceKey {
                        provider: provider.to_string(),
                        region: region.to_string(),
                        model: model.to_string(),
                        spot: node.spot,
                    };
                    if (self.current.contains_key(&key) || self.by_key.contains_key(&key))
                        && !out.contains(&key)
                    {
                        out.push(key);
                    }
                }
            }
        }
        out
    }

    /// The price in force for `node` now; None when no key matches (the
    /// node's configured price applies).
    pub fn resolve(&self, node: &NodePriceKey) -> Option<u64> {
        if self.current.is_empty() {
            return None;
        }
        let keys = self.candidates(node);
        best(
            keys.iter()
                .filter_map(|k| self.current.get(k).map(|c| (k, c.price))),
        )
    }

    /// The price of `key` at `at_ms`, from the history (a change at
    /// exactly `at_ms` is in force at `at_ms`).
    fn value_at(&self, key: &PriceKey, at_ms: u64) -> Option<u64> {
        let Some(changes) = self.by_key.get(key) else {
            return self.current.get(key).map(|c| c.price);
        };
        let after = changes.partition_point(|(at, _, _)| *at <= at_ms);
        match after.checked_sub(1).and_then(|i| changes.get(i)) {
            Some((_, _, new)) => *new,
            // The key's first known change is later: before it, its old value.
            None => changes.front().and_then(|(_, old, _)| *old),
        }
    }

    fn resolve_at(&self, keys: &[&PriceKey], at_ms: u64) -> Option<u64> {
        best(
            keys.iter()
                .filter_map(|k| self.value_at(k, at_ms).map(|p| (*k, p))),
        )
    }

    /// The prices in force for `node` over `[start_ms, end_ms)`: the first
    /// entry at `start_ms`, one more at each change; `fallback` (the node's
    /// configured price) where no source prices it.
    pub fn timeline(
        &self,
        node: &NodePriceKey,
        start_ms: u64,
        end_ms: u64,
        fallback: u64,
    ) -> Vec<(u64, u64)> {
        let candidates = self.candidates(node);
        let keys: Vec<&PriceKey> = candidates.iter().collect();
        let mut timeline = vec![(
            start_ms,
            self.resolve_at(&keys, start_ms).unwrap_or(fallback),
        )];
        if keys.is_empty() {
            return timeline;
        }
        let points: BTreeSet<u64> = keys
            .iter()
            .filter_map(|k| self.by_key.get(*k))
            .flat_map(|changes| changes.iter().map(|(at, _, _)| *at))
            .filter(|at| *at > start_ms && *at < end_ms)
            .collect();
        for at in points {
            let price = self.resolve_at(&keys, at).unwrap_or(fallback);
            if timeline.last().is_some_and(|(_, p)| *p != price) {
                timeline.push((at, price));
            }
        }
        timeline
    }

    /// The time-weighted mean price of `key` over `[from_ms, to_ms)`; None
    /// where the key had no price for part of it.
    pub fn time_weighted(&self, key: &PriceKey, from_ms: u64, to_ms: u64) -> Option<f64> {
        if to_ms <= from_ms {
            return None;
        }
        let mut points: Vec<u64> = self
            .by_key
            .get(key)
            .into_iter()
            .flatten()
            .map(|(at, _, _)| *at)
            .filter(|at| *at > from_ms && *at < to_ms)
            .collect();
        points.dedup();
        let mut total = 0.0;
        let mut at = from_ms;
        let mut price = self.value_at(key, from_ms)?;
        for next in points {
            total += price as f64 * (next - at) as f64;
            at = next;
            price = self.value_at(key, next)?;
        }
        total += price as f64 * (to_ms - at) as f64;
        Some(total / (to_ms - from_ms) as f64)
    }
}

/// The most specific of the matching keys' prices.
fn best<'a>(matches: impl Iterator<Item = (&'a PriceKey, u64)>) -> Option<u64> {
    matches
        .max_by(|(a, _), (b, _)| a.specificity().cmp(&b.specificity()).then(b.cmp(a)))
        .map(|(_, p)| p)
}

/// Cost of `milli_gpus` thousandths of GPUs (1000 per whole GPU, or a
/// share) over `[from_ms, to_ms)` on a timeline, in micro-USD per GPU-hour ×
/// GPU-ms (see [`crate::usage::rollup::micro_usd`]). Exact for whole GPUs;
/// a share's GPU-ms per price segment round down, as its GPU-time does.
pub fn cost_exact(timeline: &[(u64, u64)], from_ms: u64, to_ms: u64, milli_gpus: u64) -> u128 {
    let segment = |price: u64, lo: u64, hi: u64| -> u128 {
        price as u128 * ((hi - lo) as u128 * milli_gpus as u128 / 1000)
    };
    let mut total = 0u128;
    for (i, &(at, price)) in timeline.iter().enumerate() {
        let next = timeline.get(i + 1).map_or(u64::MAX, |(t, _)| *t);
        let lo = at.max(from_ms);
        let hi = next.min(to_ms);
        if hi > lo {
            total += segment(price, lo, hi);
        }
    }
    // Before the timeline's first point (never, for a record's own span).
    if let Some(&(first, price)) = timeline.first()
        && from_ms < first
    {
        total += segment(price, from_ms, first.min(to_ms));
    }
    total
}

fn ms_ts(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn ts_ms(ts: &prost_types::Timestamp) -> u64 {
    ts.seconds.max(0) as u64 * 1000 + (ts.nanos.max(0) as u64) / 1_000_000
}

#[cfg(test)]
mod tests;
