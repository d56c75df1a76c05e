//! Price sources applied to the fleet: each refresh's changes are written
//! (prices in force and their history) before the scheduler or the ledger
//! sees them, and queries over current and past prices.

use std::collections::BTreeMap;

use gpufleet_proto::v1::{MarketPricesResponse, Node, PriceEntry};

use super::*;
use crate::error::Result;
use crate::pricing::{self, Change, Current, NodePriceKey, PriceBook, PriceKey};
use crate::store::{IdRange, WriteBatch};

/// Changes one `MarketPrices` answer lists by default, and at most.
pub const DEFAULT_PRICE_HISTORY_LIMIT: usize = 1_000;
pub const MAX_PRICE_HISTORY_LIMIT: usize = 10_000;

/// A query over prices; empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct PriceQuery {
    pub provider: String,
    pub region: String,
    pub model: String,
    pub since_ms: u64,
    pub limit: usize,
}

impl PriceQuery {
    fn matches(&self, key: &PriceKey) -> bool {
        let field = |want: &str, have: &str| want.is_empty() || have.is_empty() || want == have;
        field(&self.provider, &key.provider)
            && field(&self.region, &key.region)
            && field(&self.model, &key.model)
    }
}

/// A node's first GPU (lowest index): what names its model and generation
/// where a node is counted as one kind.
pub fn first_gpu(node: &Node) -> Option<&gpufleet_proto::v1::GpuInfo> {
    node.gpus
        .iter()
        .filter_map(|g| g.info.as_ref())
        .min_by_key(|i| i.index)
}

/// What prices a node: its provider, region, first GPU's model, instance
/// type and capacity.
pub fn node_price_key(node: &Node) -> NodePriceKey {
    let identity = node.identity.clone().unwrap_or_default();
    let model = first_gpu(node).map(|i| i.model.clone()).unwrap_or_default();
    NodePriceKey {
        provider: identity.provider,
        region: identity.region,
        model,
        instance_type: identity.instance_type,
        spot: identity.spot,
    }
}

/// The price book as the store holds it.
pub(super) fn load_book(store: &dyn Store, sources: Vec<String>) -> Result<PriceBook> {
    let mut current = BTreeMap::new();
    for entry in load_all::<PriceEntry>(store, Keyspace::Prices)? {
        let Some(key) = entry.key.as_ref() else {
            continue;
        };
        current.insert(
            PriceKey::from_proto(key),
            Current {
                price: entry.price_per_gpu_hour_micro_usd,
                source: entry.source.clone(),
                since_ms: entry.since.as_ref().map_or(0, usage::ts_ms),
            },
        );
    }
    let mut history = Vec::new();
    crate::store::visit::<gpufleet_proto::v1::PriceChange>(
        store,
        Keyspace::PriceHistory,
        IdRange::default(),
        |_, change| {
            history.push(Change::from_proto(&change));
            Ok(true)
        },
    )?;
    Ok(PriceBook::new(sources, current, history))
}

impl Controller {
    /// Applies one fetch of price source `index` (its document, or why it
    /// could not be read). Returns how many prices changed.
    pub fn apply_price_refresh(
        &self,
        index: usize,
        fetched: std::result::Result<String, String>,
    ) -> Result<usize> {
        let parsed =
            fetched.and_then(|text| pricing::table::parse(&text).map_err(|e| e.to_string()));
        let mut state = self.lock();
        let name = state
            .prices
            .sources()
            .get(index)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let table = match parsed {
            Ok(table) => table,
            Err(error) => {
                tracing::warn!(source = %name, %error, "price source not refreshed; its last prices stay in force");
                state.prices.refresh_failed(index, error);
                return Ok(0);
            }
        };
        let now_ms = self.inner.clock.unix_millis();
        let (changes, dropped) = state.prices.refreshed(index, table, now_ms);
        if changes.is_empty() && dropped.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        for change in &changes {
            batch.put(Keyspace::PriceHistory, &change.id(), &change.to_proto());
            match change.new {
                Some(price) => batch.put(
                    Keyspace::Prices,
                    &change.key.id(),
                    &PriceEntry {
                        key: Some(change.key.to_proto()),
                        price_per_gpu_hour_micro_usd: price,
                        source: change.source.clone(),
                        since: Some(usage::ms_ts(change.at_ms)),
                    },
                ),
                None => batch.delete(Keyspace::Prices, &change.key.id()),
            }
        }
        for old in &dropped {
            batch.delete(Keyspace::PriceHistory, &old.id());
        }
        // Queued under the lock: a placement that reads the new prices is
        // written after them.
        self.inner.store.write(batch);
        drop(state);
        for change in &changes {
            tracing::info!(
                key = %change.key,
                old = ?change.old,
                new = ?change.new,
                source = %change.source,
                "price changed"
            );
        }
        if !changes.is_empty() {
            self.request_schedule();
        }
        Ok(changes.len())
    }

    /// Prices in force, their changes since `query.since_ms` (newest
    /// `limit`, oldest first), each source's state, and the time-weighted
    /// price of each key over the window.
    pub fn market_prices(&self, query: &PriceQuery) -> MarketPricesResponse {
        let state = self.lock();
        let now_ms = self.inner.clock.unix_millis();
        let limit = match query.limit {
            0 => DEFAULT_PRICE_HISTORY_LIMIT,
            n => n.min(MAX_PRICE_HISTORY_LIMIT),
        };
        let book = &state.prices;
        let mut current = Vec::new();
        let mut weighted = Vec::new();
        for (key, c) in book.current().iter().filter(|(k, _)| query.matches(k)) {
            current.push(PriceEntry {
                key: Some(key.to_proto()),
                price_per_gpu_hour_micro_usd: c.price,
                source: c.source.clone(),
                since: Some(usage::ms_ts(c.since_ms)),
            });
            // From the window's start, or the key's first known price.
            let first = book
                .history()
                .find(|h| &h.key == key)
                .map_or(c.since_ms, |h| h.at_ms);
            let from = query.since_ms.max(first).min(now_ms);
            weighted.push(
                book.time_weighted(key, from, now_ms)
                    .unwrap_or(c.price as f64),
            );
        }
        let mut history: Vec<gpufleet_proto::v1::PriceChange> = book
            .history()
            .rev()
            .filter(|c| c.at_ms >= query.since_ms && query.matches(&c.key))
            .take(limit)
            .map(Change::to_proto)
            .collect();
        history.reverse();
        let sources = book
            .sources()
            .iter()
            .map(|s| {
                let prices = s.table.as_ref().map_or(0, |t| t.len());
                match (&s.last_error, s.last_ok_ms) {
                    (Some(e), Some(ok)) => format!(
                        "{}: refresh failed ({e}); {prices} prices of {} stay in force",
                        s.name,
                        format_ms(ok)
                    ),
                    (Some(e), None) => format!("{}: never read ({e})", s.name),
                    (None, Some(ok)) => {
                        format!("{}: {prices} prices, read {}", s.name, format_ms(ok))
                    }
                    (None, None) => format!("{}: not read yet", s.name),
                }
            })
            .collect();
        MarketPricesResponse {
            current,
            history,
            sources,
            time_weighted_price_per_gpu_hour_micro_usd: weighted,
        }
    }
}

fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}
