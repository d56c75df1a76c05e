use super::*;

fn key(provider: &str, region: &str, model: &str, spot: bool) -> PriceKey {
    PriceKey {
        provider: provider.into(),
        region: region.into(),
        model: model.into(),
        spot,
    }
}

fn node(provider: &str, region: &str, model: &str, spot: bool) -> NodePriceKey {
    NodePriceKey {
        provider: provider.into(),
        region: region.into(),
        model: model.into(),
        instance_type: String::new(),
        spot,
    }
}

fn table(rows: &[(PriceKey, u64)]) -> PriceTable {
    rows.iter().cloned().collect()
}

#[test]
fn refresh_records_appear_move_and_leave() {
    let mut book = PriceBook::new(vec!["file:a".into()], BTreeMap::new(), Vec::new());
    let h100 = key("aws", "us-east-1", "H100", false);
    let l4 = key("aws", "us-east-1", "L4", false);
    let (changes, _) = book.refreshed(
        0,
        table(&[(h100.clone(), 3_000_000), (l4.clone(), 800_000)]),
        1_000,
    );
    assert_eq!(changes.len(), 2);
    assert!(
        changes
            .iter()
            .all(|c| c.old.is_none() && c.at_ms == 1_000 && c.source == "file:a")
    );
    // Same table again: nothing changed, nothing recorded.
    let (changes, _) = book.refreshed(
        0,
        table(&[(h100.clone(), 3_000_000), (l4.clone(), 800_000)]),
        2_000,
    );
    assert!(changes.is_empty());
    let (changes, _) = book.refreshed(0, table(&[(h100.clone(), 3_500_000)]), 3_000);
    assert_eq!(
        changes,
        vec![
            Change {
                at_ms: 3_000,
                key: h100.clone(),
                old: Some(3_000_000),
                new: Some(3_500_000),
                source: "file:a".into()
            },
            Change {
                at_ms: 3_000,
                key: l4.clone(),
                old: Some(800_000),
                new: None,
                source: "file:a".into()
            },
        ]
    );
    assert_eq!(
        book.current()[&h100],
        Current {
            price: 3_500_000,
            source: "file:a".into(),
            since_ms: 3_000
        }
    );
    assert!(!book.current().contains_key(&l4));
    assert_eq!(book.history().count(), 4);
}

#[test]
fn a_failed_refresh_keeps_the_last_prices() {
    let mut book = PriceBook::new(vec!["a".into(), "b".into()], BTreeMap::new(), Vec::new());
    let k = key("aws", "r", "H100", false);
    book.refreshed(1, table(&[(k.clone(), 2_000_000)]), 1_000);
    book.refresh_failed(1, "connection refused".into());
    assert_eq!(book.current()[&k].price, 2_000_000);
    assert_eq!(
        book.sources()[1].last_error.as_deref(),
        Some("connection refused")
    );
    // The first source listed wins a key both name.
    let (changes, _) = book.refreshed(0, table(&[(k.clone(), 2_500_000)]), 2_000);
    assert_eq!(changes[0].new, Some(2_500_000));
    assert_eq!(book.current()[&k].source, "a");
}

#[test]
fn stored_prices_of_a_source_not_yet_refreshed_stay() {
    let k_a = key("aws", "r", "H100", false);
    let k_b = key("gcp", "r", "H100", false);
    let stored: BTreeMap<PriceKey, Current> = [
        (
            k_a.clone(),
            Current {
                price: 1,
                source: "a".into(),
                since_ms: 5,
            },
        ),
        (
            k_b.clone(),
            Current {
                price: 2,
                source: "b".into(),
                since_ms: 5,
            },
        ),
    ]
    .into_iter()
    .collect();
    let mut book = PriceBook::new(vec!["a".into(), "b".into()], stored, Vec::new());
    // "a" refreshes without its key: it leaves; "b"'s key stays until "b" answers.
    let (changes, _) = book.refreshed(0, PriceTable::new(), 10);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key, k_a);
    assert_eq!(book.current()[&k_b].price, 2);
}

#[test]
fn the_most_specific_key_wins() {
    let mut book = PriceBook::new(vec!["a".into()], BTreeMap::new(), Vec::new());
    book.refreshed(
        0,
        table(&[
            (key("", "", "H100", false), 4_000_000),
            (key("aws", "", "H100", false), 3_500_000),
            (key("aws", "us-east-1", "H100", false), 3_000_000),
            (key("aws", "us-east-1", "p5.48xlarge", true), 1_500_000),
        ]),
        0,
    );
    assert_eq!(
        book.resolve(&node("aws", "us-east-1", "H100", false)),
        Some(3_000_000)
    );
    assert_eq!(
        book.resolve(&node("aws", "eu-west-1", "H100", false)),
        Some(3_500_000)
    );
    assert_eq!(
        book.resolve(&node("azure", "eastus", "H100", false)),
        Some(4_000_000)
    );
    assert_eq!(book.resolve(&node("aws", "us-east-1", "H100", true)), None);
    let mut p5 = node("aws", "us-east-1", "H100", true);
    p5.instance_type = "p5.48xlarge".into();
    assert_eq!(book.resolve(&p5), Some(1_500_000));
    assert_eq!(book.resolve(&node("aws", "us-east-1", "L4", false)), None);
}

#[test]
fn timeline_and_cost_follow_each_change() {
    let mut book = PriceBook::new(vec!["a".into()], BTreeMap::new(), Vec::new());
    let k = key("aws", "r", "H100", false);
    let n = node("aws", "r", "H100", false);
    book.refreshed(0, table(&[(k.clone(), 2_000_000)]), 1_000);
    book.refreshed(0, table(&[(k.clone(), 3_000_000)]), 61_000);
    book.refreshed(0, PriceTable::new(), 121_000);
    // Before the first change the key had no price: the fallback.
    assert_eq!(
        book.timeline(&n, 0, 200_000, 9_000_000),
        vec![
            (0, 9_000_000),
            (1_000, 2_000_000),
            (61_000, 3_000_000),
            (121_000, 9_000_000)
        ]
    );
    assert_eq!(
        book.timeline(&n, 30_000, 60_000, 9),
        vec![(30_000, 2_000_000)]
    );
    // 2 GPUs from 31 s to 91 s: 30 s at $2, 30 s at $3, per GPU-hour.
    let timeline = book.timeline(&n, 31_000, 91_000, 0);
    let exact = cost_exact(&timeline, 31_000, 91_000, 2_000);
    assert_eq!(exact, 2_000_000 * 30_000 * 2 + 3_000_000 * 30_000 * 2);
    // = $0.0417 (2 × 30 s × $2/h + 2 × 30 s × $3/h = 2 × (1/120 h) × 5).
    assert_eq!(crate::usage::rollup::micro_usd(exact), 83_333);
    // Time-weighted price over the minute around the first move.
    let twp = book.time_weighted(&k, 31_000, 91_000).unwrap();
    assert!((twp - 2_500_000.0).abs() < 1e-6, "{twp}");
    assert_eq!(book.time_weighted(&k, 100_000, 130_000), None);
}

#[test]
fn history_is_bounded_and_reloads_in_order() {
    let k = key("p", "r", "m", false);
    let history: Vec<Change> = (0..(MAX_HISTORY as u64 + 10))
        .rev()
        .map(|i| Change {
            at_ms: i,
            key: k.clone(),
            old: Some(i),
            new: Some(i + 1),
            source: "a".into(),
        })
        .collect();
    let book = PriceBook::new(vec!["a".into()], BTreeMap::new(), history);
    assert_eq!(book.history().count(), MAX_HISTORY);
    assert_eq!(book.history().next().map(|c| c.at_ms), Some(10));
    let change = book.history().next().unwrap();
    assert_eq!(Change::from_proto(&change.to_proto()), *change);
    assert_eq!(change.id(), "0000000000010/p/r/m/on-demand");
}

#[test]
fn indexed_resolution_agrees_with_the_definition() {
    let providers = ["aws", "gcp", ""];
    let regions = ["r1", "r2", ""];
    let models = ["H100", "p5.48xlarge", "L4", ""];
    let mut rows = Vec::new();
    let mut price = 1_000_000;
    for (i, provider) in providers.iter().enumerate() {
        for (j, region) in regions.iter().enumerate() {
            for (k, model) in models.iter().enumerate() {
                for spot in [false, true] {
                    // A sparse, deterministic table.
                    if (i + 2 * j + 3 * k + usize::from(spot)) % 3 == 0 {
                        price += 10_000;
                        rows.push((key(provider, region, model, spot), price));
                    }
                }
            }
        }
    }
    let mut book = PriceBook::new(vec!["a".into()], BTreeMap::new(), Vec::new());
    book.refreshed(0, table(&rows), 0);
    for provider in ["aws", "gcp", "azure"] {
        for region in ["r1", "r2", "r3"] {
            for model in ["H100", "L4", "A100"] {
                for instance_type in ["", "p5.48xlarge"] {
                    for spot in [false, true] {
                        let n = NodePriceKey {
                            provider: provider.into(),
                            region: region.into(),
                            model: model.into(),
                            instance_type: instance_type.into(),
                            spot,
                        };
                        let brute = best(
                            book.current()
                                .iter()
                                .filter(|(k, _)| k.matches(&n))
                                .map(|(k, c)| (k, c.price)),
                        );
                        assert_eq!(book.resolve(&n), brute, "{n:?}");
                    }
                }
            }
        }
    }
}
