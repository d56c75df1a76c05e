//! How `gpufleet market prices` and `market interruptions` read in a
//! terminal: tables, and a chart per price of how it moved.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::{MarketInterruptionsResponse, MarketPricesResponse, PriceKey};

use super::usage::generation_label;
use crate::output;

/// Columns of a price chart.
const CHART_WIDTH: usize = 60;
const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn key_text(key: Option<&PriceKey>) -> String {
    let Some(key) = key else {
        return "-".to_string();
    };
    let any = |s: &str| {
        if s.is_empty() {
            "*".to_string()
        } else {
            s.to_string()
        }
    };
    format!(
        "{}/{}/{} {}",
        any(&key.provider),
        any(&key.region),
        any(&key.model),
        if key.spot { "spot" } else { "on-demand" }
    )
}

fn time_text(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or("-".to_string(), |t| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.seconds.max(0) as u64))
            .to_string()
    })
}

fn price(p: Option<u64>) -> String {
    p.map_or("-".to_string(), output::usd)
}

/// A step chart of one key's price from `since` to now: the price in
/// force at each column, scaled between the lowest and highest.
fn chart(points: &[(u64, Option<u64>)], since: u64, now: u64) -> String {
    let span = now.saturating_sub(since).max(1);
    let at = |t: u64| -> Option<u64> {
        points
            .iter()
            .take_while(|(when, _)| *when <= t)
            .last()
            .and_then(|(_, p)| *p)
    };
    let columns: Vec<Option<u64>> = (0..CHART_WIDTH)
        .map(|i| at(since + span * (i as u64 + 1) / CHART_WIDTH as u64))
        .collect();
    let known: Vec<u64> = columns.iter().flatten().copied().collect();
    let (Some(lo), Some(hi)) = (known.iter().min(), known.iter().max()) else {
        return " ".repeat(CHART_WIDTH);
    };
    columns
        .iter()
        .map(|c| match c {
            None => ' ',
            Some(_) if hi == lo => LEVELS[3],
            Some(p) => LEVELS[((p - lo) * 7 / (hi - lo)) as usize],
        })
        .collect()
}

pub fn print(response: &MarketPricesResponse, since_secs: u64) {
    if !response.sources.is_empty() {
        for source in &response.sources {
            say!("source {source}");
        }
    }
    let mut table = output::table(&[
        "PRICE KEY",
        "NOW /GPU-H",
        "SINCE",
        "TIME-WEIGHTED",
        "SOURCE",
    ]);
    for (i, entry) in response.current.iter().enumerate() {
        let weighted = response
            .time_weighted_price_per_gpu_hour_micro_usd
            .get(i)
            .map_or("-".to_string(), |w| output::usd(w.round() as u64));
        table.add_row(vec![
            key_text(entry.key.as_ref()),
            output::usd(entry.price_per_gpu_hour_micro_usd),
            time_text(entry.since.as_ref()),
            weighted,
            entry.source.clone(),
        ]);
    }
    output::print_table(&table);
    if response.current.is_empty() {
        eprintln!(
            "no prices from price sources: nodes cost what their agents are configured with (set price_sources on the controller)"
        );
    }
    if response.history.is_empty() {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    say!();
    say!(
        "how each price moved since {} (▁ lowest … █ highest, blank: no price):",
        time_text(Some(&prost_types::Timestamp {
            seconds: since_secs as i64,
            nanos: 0
        }))
    );
    let mut keys: Vec<String> = response
        .history
        .iter()
        .map(|c| key_text(c.key.as_ref()))
        .collect();
    keys.sort();
    keys.dedup();
    for key in &keys {
        let changes: Vec<_> = response
            .history
            .iter()
            .filter(|c| &key_text(c.key.as_ref()) == key)
            .collect();
        // The price before the window's first change is its old value.
        let mut points: Vec<(u64, Option<u64>)> = vec![(
            since_secs,
            changes
                .first()
                .and_then(|c| c.old_price_per_gpu_hour_micro_usd),
        )];
        points.extend(changes.iter().map(|c| {
            (
                c.at.as_ref().map_or(0, |t| t.seconds.max(0) as u64),
                c.new_price_per_gpu_hour_micro_usd,
            )
        }));
        let known: Vec<u64> = points.iter().filter_map(|(_, p)| *p).collect();
        say!(
            "  {key:<44} {} {} … {}",
            chart(&points, since_secs, now),
            price(known.iter().min().copied()),
            price(known.iter().max().copied())
        );
    }
    say!();
    let mut table = output::table(&["AT", "PRICE KEY", "OLD", "NEW", "SOURCE"]);
    for change in &response.history {
        table.add_row(vec![
            time_text(change.at.as_ref()),
            key_text(change.key.as_ref()),
            price(change.old_price_per_gpu_hour_micro_usd),
            price(change.new_price_per_gpu_hour_micro_usd),
            change.source.clone(),
        ]);
    }
    output::print_table(&table);
}

pub fn print_interruptions(response: &MarketInterruptionsResponse) {
    let mut table = output::table(&[
        "PROVIDER",
        "REGION",
        "GENERATION",
        "INTERRUPTIONS",
        "SPOT NODE-HOURS",
        "PER NODE-HOUR",
    ]);
    for rate in &response.rates {
        table.add_row(vec![
            rate.provider.clone(),
            rate.region.clone(),
            generation_label(rate.generation),
            rate.interruptions.to_string(),
            format!("{:.2}", rate.spot_node_hours),
            rate.interruptions_per_node_hour
                .map_or("-".to_string(), |r| format!("{r:.3}")),
        ]);
    }
    output::print_table(&table);
    say!();
    let mut table = output::table(&[
        "NOTICED", "NODE", "PROVIDER", "REGION", "SOURCE", "ACTION", "DEADLINE", "REQUEUED",
    ]);
    for i in &response.interruptions {
        table.add_row(vec![
            time_text(i.noticed_at.as_ref()),
            i.node_id.clone(),
            i.provider.clone(),
            i.region.clone(),
            i.source.clone(),
            i.action.clone(),
            time_text(i.deadline.as_ref()),
            i.allocation_ids.join(","),
        ]);
    }
    output::print_table(&table);
    if response.interruptions.is_empty() {
        eprintln!("no spot interruptions in the window");
    }
}
