//! What-if edits: changes to a loaded [`Workload`] made on the command
//! line before a simulation, so "what if we add 200 H100s in eu-north1?"
//! is one command. Each edit parses from the text of one flag, is bounded,
//! and says what it did when applied (the report lists every applied edit).
//!
//! Forms (also in docs/simulate.md):
//! - `--add [NODESx]GPUSxMODEL@PROVIDER/REGION:$PRICE`: GPUs of a model at
//!   a price per GPU-hour. `20xH100-SXM-80GB@nebius/eu-north1:$2.90` adds
//!   20 GPUs as nodes of [`DEFAULT_GPUS_PER_NODE`] (the last one smaller);
//!   `3x4xA10G@gcp/us-central1:0.80` adds 3 nodes of 4 GPUs.
//! - `--remove NODE` or `--remove KEY=VALUE[,KEY=VALUE…][,count=N]`: nodes
//!   by id, or those matching every selector (`node`, `model`, `provider`,
//!   `region`, `generation`); with `count=N` only the last N matching nodes
//!   in fleet order.
//! - `--price MODEL[@PROVIDER[/REGION]]=$PRICE` (or `=+10%`, `=-25%`): the
//!   price per GPU-hour of the matching nodes; MODEL `*` is every model.
//! - `--load FACTOR`: arrivals come FACTOR times as fast (inter-arrival
//!   times divided by it); durations unchanged.
//!
//! A model in an edit is a full name (`V100-SXM2-32GB`, case-insensitive)
//! or, in selectors, a family (`V100` is every V100). Applied in a fixed
//! order whatever the order on the command line: removals, prices,
//! additions, load; so an added node keeps the price its `--add` gave.
//! An edit that matches nothing is an error, never silently a no-op.

use std::collections::HashSet;
use std::fmt;

use crate::domain::Generation;
use crate::sim::workload::{SimNode, Workload};

/// GPUs per added node when `--add` does not say (an HGX board).
pub const DEFAULT_GPUS_PER_NODE: u32 = 8;
/// At most this many GPUs per node (the simulator's per-node masks).
pub const MAX_GPUS_PER_NODE: u32 = 32;
/// At most this many GPUs added by all `--add` edits together: the
/// internet-scale fleet of the benchmarks, so a typo of a few zeros is
/// refused rather than allocating without bound.
pub const MAX_ADDED_GPUS: u64 = 1_000_000;
/// At most this many edits of each kind.
pub const MAX_EDITS: usize = 64;
/// Prices above this (USD per GPU-hour) are refused as typos.
pub const MAX_PRICE_USD: f64 = 1000.0;
/// `--load` factor bounds.
pub const LOAD_RANGE: (f64, f64) = (0.01, 100.0);

const ADD_FORM: &str =
    "[NODESx]GPUSxMODEL@PROVIDER/REGION:$PRICE, e.g. 20xH100-SXM-80GB@nebius/eu-north1:$2.90";
const REMOVE_FORM: &str = "NODE_ID or KEY=VALUE[,KEY=VALUE…][,count=N] with KEY one of node, model, provider, region, generation, e.g. model=V100,count=10";
const PRICE_FORM: &str = "MODEL[@PROVIDER[/REGION]]=$PRICE or =+10% / =-25%, e.g. A100-SXM-80GB@aws=$1.50 or *@lambda=-20%";
const LOAD_FORM: &str = "a factor from 0.01 to 100, e.g. 1.2";

/// A what-if edit that could not be parsed or applied: names the flag, the
/// text, what is wrong and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditError(pub String);

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EditError {}

fn bad(flag: &str, text: &str, why: impl fmt::Display, form: &str) -> EditError {
    EditError(format!("{flag} `{text}`: {why}; expected {form}"))
}

/// Nodes to add.
#[derive(Debug, Clone, PartialEq)]
pub struct AddNodes {
    pub text: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    /// Total GPUs (`nodes × gpus_per_node`, or the `GPUSx` form's count).
    pub gpus: u32,
    pub model: String,
    pub provider: String,
    pub region: String,
    pub price_micro_usd: u64,
}

/// Which nodes a `--remove` or `--price` applies to; empty fields match all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    pub node: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub generation: Option<Generation>,
}

impl Selector {
    fn matches(&self, node: &SimNode) -> bool {
        let eq = |want: &Option<String>, have: &str| {
            want.as_ref().is_none_or(|w| w.eq_ignore_ascii_case(have))
        };
        eq(&self.node, &node.id)
            && self
                .model
                .as_ref()
                .is_none_or(|m| model_matches(m, &node.model))
            && eq(&self.provider, &node.provider)
            && eq(&self.region, &node.region)
            && self.generation.is_none_or(|g| g == node.generation)
    }
}

/// Nodes to remove.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoveNodes {
    pub text: String,
    pub selector: Selector,
    /// Only the last N matching nodes; None: all of them.
    pub count: Option<u32>,
}

/// How a price changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NewPrice {
    MicroUsd(u64),
    /// Percent change, e.g. -20.0.
    Percent(f64),
}

/// A price change.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceChange {
    pub text: String,
    pub selector: Selector,
    pub price: NewPrice,
}

/// Every what-if edit of one run, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edits {
    pub remove: Vec<RemoveNodes>,
    pub price: Vec<PriceChange>,
    pub add: Vec<AddNodes>,
    /// Arrival-rate factor in millionths (1.2 → 1_200_000).
    pub load_ppm: Option<u64>,
}

impl Edits {
    /// Parses each flag's values; errors name the flag and the form.
    pub fn parse(
        add: &[String],
        remove: &[String],
        price: &[String],
        load: Option<&str>,
    ) -> Result<Edits, EditError> {
        for (flag, values) in [("--add", add), ("--remove", remove), ("--price", price)] {
            if values.len() > MAX_EDITS {
                return Err(EditError(format!(
                    "{flag} is given {} times; at most {MAX_EDITS}",
                    values.len()
                )));
            }
        }
        let add = add
            .iter()
            .map(|t| parse_add(t))
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = add.iter().map(|a| u64::from(a.gpus)).sum();
        if total > MAX_ADDED_GPUS {
            return Err(EditError(format!(
                "--add: {total} GPUs in all; at most {MAX_ADDED_GPUS} may be added"
            )));
        }
        Ok(Edits {
            remove: remove
                .iter()
                .map(|t| parse_remove(t))
                .collect::<Result<_, _>>()?,
            price: price
                .iter()
                .map(|t| parse_price(t))
                .collect::<Result<_, _>>()?,
            add,
            load_ppm: load.map(parse_load).transpose()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.price.is_empty()
            && self.add.is_empty()
            && self.load_ppm.is_none()
    }

    /// Applies the edits in the documented order and returns one line per
    /// edit saying what it did. `catalogue` lists the models an `--add` may
    /// name besides those already in the fleet (name, generation).
    pub fn apply(
        &self,
        workload: &mut Workload,
        catalogue: &[(&str, Generation)],
    ) -> Result<Vec<String>, EditError> {
        let mut applied = Vec::new();
        for edit in &self.remove {
            applied.push(remove(workload, edit)?);
        }
        for edit in &self.price {
            applied.push(reprice(workload, edit)?);
        }
        for edit in &self.add {
            applied.push(add_nodes(workload, edit, catalogue)?);
        }
        if let Some(ppm) = self.load_ppm {
            for job in &mut workload.jobs {
                // Integer arithmetic: the same input always gives the same
                // arrivals; the order of jobs is kept (monotone map).
                let scaled = u128::from(job.arrival) * 1_000_000 / u128::from(ppm);
                job.arrival = u64::try_from(scaled).unwrap_or(u64::MAX);
            }
            let factor = ppm as f64 / 1e6;
            applied.push(format!(
                "--load {factor}: arrivals {factor:.2}× as fast (inter-arrival times ÷ {factor:.2}), {} jobs",
                workload.jobs.len()
            ));
        }
        Ok(applied)
    }
}

/// `pattern` names `model` exactly or is its family (the part before the
/// first `-`: `V100` for `V100-SXM2-32GB`), case-insensitively.
pub fn model_matches(pattern: &str, model: &str) -> bool {
    pattern == "*"
        || pattern.eq_ignore_ascii_case(model)
        || model
            .split_once('-')
            .is_some_and(|(family, _)| family.eq_ignore_ascii_case(pattern))
}

fn parse_count(
    flag: &str,
    text: &str,
    what: &str,
    n: &str,
    max: u64,
    form: &str,
) -> Result<u32, EditError> {
    let value: u64 = n.parse().map_err(|_| {
        bad(
            flag,
            text,
            format!("{what} `{n}` is not a whole number"),
            form,
        )
    })?;
    if value == 0 || value > max {
        return Err(bad(
            flag,
            text,
            format!("{what} {value} is out of range 1..={max}"),
            form,
        ));
    }
    Ok(value as u32)
}

/// `$2.90`, `2.90` → micro-USD.
fn parse_price_usd(flag: &str, text: &str, price: &str, form: &str) -> Result<u64, EditError> {
    let digits = price.trim().trim_start_matches('$');
    let usd: f64 = digits
        .parse()
        .ok()
        .filter(|p: &f64| p.is_finite())
        .ok_or_else(|| bad(flag, text, format!("price `{price}` is not a number"), form))?;
    if !(0.0..=MAX_PRICE_USD).contains(&usd) {
        return Err(bad(
            flag,
            text,
            format!("price {usd} is out of range 0..={MAX_PRICE_USD} USD per GPU-hour"),
            form,
        ));
    }
    Ok((usd * 1e6).round() as u64)
}

fn label(flag: &str, text: &str, what: &str, value: &str, form: &str) -> Result<String, EditError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(bad(
            flag,
            text,
            format!("{what} `{value}` must be 1-64 of A-Z a-z 0-9 . _ -"),
            form,
        ));
    }
    Ok(value.to_string())
}

pub fn parse_add(text: &str) -> Result<AddNodes, EditError> {
    const FLAG: &str = "--add";
    let t = text.trim();
    let (what, price) = t
        .rsplit_once(':')
        .ok_or_else(|| bad(FLAG, text, "no `:$PRICE`", ADD_FORM))?;
    let (shape, place) = what
        .split_once('@')
        .ok_or_else(|| bad(FLAG, text, "no `@PROVIDER/REGION`", ADD_FORM))?;
    let (provider, region) = place
        .split_once('/')
        .ok_or_else(|| bad(FLAG, text, "the place must be PROVIDER/REGION", ADD_FORM))?;
    let parts: Vec<&str> = shape.splitn(3, ['x', 'X']).collect();
    let max_gpus = MAX_ADDED_GPUS;
    let (nodes, gpus_per_node, gpus, model) = match parts.as_slice() {
        [n, per, model]
            if n.bytes().all(|b| b.is_ascii_digit()) && per.bytes().all(|b| b.is_ascii_digit()) =>
        {
            let nodes = parse_count(FLAG, text, "node count", n, max_gpus, ADD_FORM)?;
            let per = parse_count(
                FLAG,
                text,
                "GPUs per node",
                per,
                u64::from(MAX_GPUS_PER_NODE),
                ADD_FORM,
            )?;
            let gpus = u64::from(nodes) * u64::from(per);
            if gpus > max_gpus {
                return Err(bad(
                    FLAG,
                    text,
                    format!("{gpus} GPUs; at most {max_gpus}"),
                    ADD_FORM,
                ));
            }
            (nodes, per, gpus as u32, *model)
        }
        [n, rest @ ..] if !rest.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            let gpus = parse_count(FLAG, text, "GPU count", n, max_gpus, ADD_FORM)?;
            // The model is everything after the first `x` (a model name
            // never contains one, but keep it whole anyway).
            let model = &shape[n.len() + 1..];
            (
                gpus.div_ceil(DEFAULT_GPUS_PER_NODE),
                DEFAULT_GPUS_PER_NODE.min(gpus),
                gpus,
                model,
            )
        }
        _ => {
            return Err(bad(
                FLAG,
                text,
                "the size must be GPUSxMODEL or NODESxGPUSxMODEL",
                ADD_FORM,
            ));
        }
    };
    if model.is_empty() {
        return Err(bad(FLAG, text, "no model", ADD_FORM));
    }
    Ok(AddNodes {
        text: text.to_string(),
        nodes,
        gpus_per_node,
        gpus,
        model: label(FLAG, text, "model", model, ADD_FORM)?,
        provider: label(FLAG, text, "provider", provider, ADD_FORM)?,
        region: label(FLAG, text, "region", region, ADD_FORM)?,
        price_micro_usd: parse_price_usd(FLAG, text, price, ADD_FORM)?,
    })
}

fn parse_generation(
    flag: &str,
    text: &str,
    value: &str,
    form: &str,
) -> Result<Generation, EditError> {
    Generation::ALL
        .into_iter()
        .filter(|g| *g != Generation::Unspecified)
        .find(|g| g.label().eq_ignore_ascii_case(value))
        .ok_or_else(|| {
            let names: Vec<&str> = Generation::ALL[1..].iter().map(|g| g.label()).collect();
            bad(
                flag,
                text,
                format!("generation `{value}` is not one of {}", names.join(", ")),
                form,
            )
        })
}

pub fn parse_remove(text: &str) -> Result<RemoveNodes, EditError> {
    const FLAG: &str = "--remove";
    let t = text.trim();
    if !t.contains('=') {
        let node = label(FLAG, text, "node id", t, REMOVE_FORM)?;
        return Ok(RemoveNodes {
            text: text.to_string(),
            selector: Selector {
                node: Some(node),
                ..Default::default()
            },
            count: None,
        });
    }
    let mut selector = Selector::default();
    let mut count = None;
    let mut seen = HashSet::new();
    for pair in t.split(',') {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            bad(
                FLAG,
                text,
                format!("`{pair}` is not KEY=VALUE"),
                REMOVE_FORM,
            )
        })?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if !seen.insert(key.clone()) {
            return Err(bad(
                FLAG,
                text,
                format!("`{key}` is given twice"),
                REMOVE_FORM,
            ));
        }
        match key.as_str() {
            "node" => selector.node = Some(label(FLAG, text, "node id", value, REMOVE_FORM)?),
            "model" => selector.model = Some(label(FLAG, text, "model", value, REMOVE_FORM)?),
            "provider" => {
                selector.provider = Some(label(FLAG, text, "provider", value, REMOVE_FORM)?)
            }
            "region" => selector.region = Some(label(FLAG, text, "region", value, REMOVE_FORM)?),
            "generation" => {
                selector.generation = Some(parse_generation(FLAG, text, value, REMOVE_FORM)?)
            }
            "count" => {
                count = Some(parse_count(
                    FLAG,
                    text,
                    "count",
                    value,
                    u64::from(u32::MAX),
                    REMOVE_FORM,
                )?)
            }
            other => {
                return Err(bad(
                    FLAG,
                    text,
                    format!("unknown key `{other}`"),
                    REMOVE_FORM,
                ));
            }
        }
    }
    if selector == Selector::default() {
        return Err(bad(FLAG, text, "no selector besides count", REMOVE_FORM));
    }
    Ok(RemoveNodes {
        text: text.to_string(),
        selector,
        count,
    })
}

pub fn parse_price(text: &str) -> Result<PriceChange, EditError> {
    const FLAG: &str = "--price";
    let t = text.trim();
    let (target, price) = t
        .rsplit_once('=')
        .ok_or_else(|| bad(FLAG, text, "no `=PRICE`", PRICE_FORM))?;
    let (model, place) = match target.split_once('@') {
        Some((m, p)) => (m, Some(p)),
        None => (target, None),
    };
    let mut selector = Selector::default();
    if model != "*" {
        selector.model = Some(label(FLAG, text, "model", model, PRICE_FORM)?);
    }
    if let Some(place) = place {
        let (provider, region) = match place.split_once('/') {
            Some((p, r)) => (p, Some(r)),
            None => (place, None),
        };
        selector.provider = Some(label(FLAG, text, "provider", provider, PRICE_FORM)?);
        if let Some(region) = region {
            selector.region = Some(label(FLAG, text, "region", region, PRICE_FORM)?);
        }
    }
    let price = price.trim();
    let new = if let Some(pct) = price.strip_suffix('%') {
        let value: f64 = pct
            .parse()
            .ok()
            .filter(|p: &f64| p.is_finite() && (-100.0..=1000.0).contains(p))
            .ok_or_else(|| {
                bad(
                    FLAG,
                    text,
                    format!("`{price}` is not a change from -100% to +1000%"),
                    PRICE_FORM,
                )
            })?;
        NewPrice::Percent(value)
    } else {
        NewPrice::MicroUsd(parse_price_usd(FLAG, text, price, PRICE_FORM)?)
    };
    Ok(PriceChange {
        text: text.to_string(),
        selector,
        price: new,
    })
}

/// `1.2` → 1_200_000 millionths.
pub fn parse_load(text: &str) -> Result<u64, EditError> {
    let value: f64 = text
        .trim()
        .trim_end_matches(['x', '×'])
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| bad("--load", text, "not a number", LOAD_FORM))?;
    if !(LOAD_RANGE.0..=LOAD_RANGE.1).contains(&value) {
        return Err(bad(
            "--load",
            text,
            format!("{value} is out of range"),
            LOAD_FORM,
        ));
    }
    Ok((value * 1e6).round() as u64)
}

fn usd(micro: u64) -> String {
    format!("${:.2}", micro as f64 / 1e6)
}

fn remove(workload: &mut Workload, edit: &RemoveNodes) -> Result<String, EditError> {
    let matching: Vec<usize> = (0..workload.nodes.len())
        .filter(|&i| edit.selector.matches(&workload.nodes[i]))
        .collect();
    if matching.is_empty() {
        return Err(EditError(format!(
            "--remove `{}`: no node matches",
            edit.text
        )));
    }
    let take = match edit.count {
        Some(n) if n as usize > matching.len() => {
            return Err(EditError(format!(
                "--remove `{}`: count={n} but only {} nodes match",
                edit.text,
                matching.len()
            )));
        }
        Some(n) => n as usize,
        None => matching.len(),
    };
    // The last N in fleet order, so the first nodes (often the oldest) stay.
    let gone: HashSet<usize> = matching[matching.len() - take..].iter().copied().collect();
    let gpus: u64 = gone
        .iter()
        .map(|&i| u64::from(workload.nodes[i].gpus))
        .sum();
    let mut index = 0;
    workload.nodes.retain(|_| {
        let keep = !gone.contains(&index);
        index += 1;
        keep
    });
    Ok(format!(
        "--remove {}: removed {take} node(s), {gpus} GPUs",
        edit.text
    ))
}

fn reprice(workload: &mut Workload, edit: &PriceChange) -> Result<String, EditError> {
    let mut changed = 0u64;
    let (mut before, mut after) = (0u128, 0u128);
    for node in workload
        .nodes
        .iter_mut()
        .filter(|n| edit.selector.matches(n))
    {
        let old = node.price_per_gpu_hour_micro_usd;
        let new = match edit.price {
            NewPrice::MicroUsd(p) => p,
            NewPrice::Percent(pct) => (old as f64 * (1.0 + pct / 100.0)).round().max(0.0) as u64,
        };
        node.price_per_gpu_hour_micro_usd = new;
        changed += 1;
        before += u128::from(old);
        after += u128::from(new);
    }
    if changed == 0 {
        return Err(EditError(format!(
            "--price `{}`: no node matches",
            edit.text
        )));
    }
    let mean = |sum: u128| usd((sum / u128::from(changed)) as u64);
    Ok(format!(
        "--price {}: {changed} node(s) repriced, mean {} → {} per GPU-hour",
        edit.text,
        mean(before),
        mean(after)
    ))
}

/// The model an `--add` names: one already in the fleet, else one in the
/// catalogue, by full name (case-insensitive); a family (`H100`) only when
/// exactly one model of the fleet, else of the catalogue, is of it.
fn resolve_model(
    workload: &Workload,
    catalogue: &[(&str, Generation)],
    name: &str,
    text: &str,
) -> Result<(String, Generation), EditError> {
    let mut known: Vec<(String, Generation)> = Vec::new();
    for node in &workload.nodes {
        if !known
            .iter()
            .any(|(m, _)| m.eq_ignore_ascii_case(&node.model))
        {
            known.push((node.model.clone(), node.generation));
        }
    }
    let fleet_models = known.len();
    for &(m, g) in catalogue {
        if !known.iter().any(|(k, _)| k.eq_ignore_ascii_case(m)) {
            known.push((m.to_string(), g));
        }
    }
    if let Some(found) = known.iter().find(|(m, _)| m.eq_ignore_ascii_case(name)) {
        return Ok(found.clone());
    }
    for scope in [&known[..fleet_models], &known[fleet_models..]] {
        let family: Vec<&(String, Generation)> = scope
            .iter()
            .filter(|(m, _)| model_matches(name, m))
            .collect();
        match family.as_slice() {
            [] => {}
            [one] => return Ok((*one).clone()),
            many => {
                let names: Vec<&str> = many.iter().map(|(m, _)| m.as_str()).collect();
                return Err(bad(
                    "--add",
                    text,
                    format!("model `{name}` could be {}; name one", names.join(" or ")),
                    ADD_FORM,
                ));
            }
        }
    }
    let names: Vec<&str> = known.iter().map(|(m, _)| m.as_str()).collect();
    Err(bad(
        "--add",
        text,
        format!("unknown model `{name}`; known: {}", names.join(", ")),
        ADD_FORM,
    ))
}

fn add_nodes(
    workload: &mut Workload,
    edit: &AddNodes,
    catalogue: &[(&str, Generation)],
) -> Result<String, EditError> {
    let (model, generation) = resolve_model(workload, catalogue, &edit.model, &edit.text)?;
    let ids: HashSet<String> = workload.nodes.iter().map(|n| n.id.clone()).collect();
    let prefix = format!("whatif-{}-{}", edit.provider, edit.region);
    let mut serial = 0u64;
    let mut left = edit.gpus;
    workload.nodes.reserve(edit.nodes as usize);
    while left > 0 {
        let gpus = left.min(edit.gpus_per_node);
        left -= gpus;
        let id = loop {
            let id = format!("{prefix}-{serial:06}");
            serial += 1;
            if !ids.contains(&id) {
                break id;
            }
        };
        workload.nodes.push(SimNode {
            id,
            model: model.clone(),
            generation,
            gpus,
            price_per_gpu_hour_micro_usd: edit.price_micro_usd,
            provider: edit.provider.clone(),
            region: edit.region.clone(),
        });
    }
    Ok(format!(
        "--add {}: added {} × {model} ({}) on {} node(s) at {}/{}, {} per GPU-hour",
        edit.text,
        edit.gpus,
        generation.label(),
        edit.nodes,
        edit.provider,
        edit.region,
        usd(edit.price_micro_usd)
    ))
}

#[cfg(test)]
mod tests;
