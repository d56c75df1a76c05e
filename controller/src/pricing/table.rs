//! Price tables as sources publish them: CSV or JSON, one row per
//! (provider, region, GPU model or instance type, capacity) with a price per
//! GPU-hour in USD. Parsing is strict and bounded: a bad row is an error
//! that names its line (or index) and field, and an oversized document is
//! refused before it is read further.
//!
//! CSV: a header naming the columns (any order), `#` comments:
//!
//! ```text
//! provider,region,model,capacity,price_per_gpu_hour_usd
//! aws,us-east-1,H100-SXM-80GB,on-demand,3.93
//! aws,us-east-1,H100-SXM-80GB,spot,2.10
//! ```
//!
//! JSON: `{"prices": [{"provider": "aws", "region": "us-east-1", "model":
//! "H100-SXM-80GB", "capacity": "spot", "price_per_gpu_hour_usd": 2.1}]}`
//! or the bare array. `provider`, `region` and `model` may be empty (or
//! `*`): the row then applies to any value of that field.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::PriceKey;

/// Largest price document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// Most rows in one document.
pub const MAX_ROWS: usize = 20_000;
/// Longest provider, region or model name.
pub const MAX_NAME_LEN: usize = 64;
/// Highest price accepted, USD per GPU-hour (a typo guard: no GPU rents
/// for more).
pub const MAX_PRICE_USD: f64 = 10_000.0;

/// One source's prices, by key.
pub type PriceTable = BTreeMap<PriceKey, u64>;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TableError {
    #[error("the document is {0} bytes; at most {MAX_DOCUMENT_BYTES} are accepted")]
    TooLarge(usize),
    #[error("more than {MAX_ROWS} rows; split the source")]
    TooManyRows,
    #[error("{at}: {message}")]
    Row { at: String, message: String },
    #[error("not a price document: {0}")]
    Format(String),
}

fn row_error(at: impl Into<String>, message: impl Into<String>) -> TableError {
    TableError::Row {
        at: at.into(),
        message: message.into(),
    }
}

/// Parses a document, CSV unless it starts with `{` or `[`.
pub fn parse(text: &str) -> Result<PriceTable, TableError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(TableError::TooLarge(text.len()));
    }
    match text.trim_start().chars().next() {
        Some('{') | Some('[') => parse_json(text),
        _ => parse_csv(text),
    }
}

fn name(at: &str, field: &str, value: &str) -> Result<String, TableError> {
    let value = value.trim();
    if value == "*" {
        return Ok(String::new());
    }
    if value.len() > MAX_NAME_LEN {
        return Err(row_error(
            at,
            format!("{field} is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(row_error(
            at,
            format!(
                "{field} {value:?} contains {bad:?}; use letters, digits, '-', '_', '.' or ':'"
            ),
        ));
    }
    Ok(value.to_string())
}

fn capacity(at: &str, value: &str) -> Result<bool, TableError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "spot" | "preemptible" => Ok(true),
        "on-demand" | "ondemand" | "on_demand" | "" => Ok(false),
        other => Err(row_error(
            at,
            format!("capacity {other:?} is neither \"on-demand\" nor \"spot\""),
        )),
    }
}

/// USD per GPU-hour → micro-USD, exactly for up to six decimals.
fn micro_usd(at: &str, usd: f64) -> Result<u64, TableError> {
    if !usd.is_finite() || !(0.0..=MAX_PRICE_USD).contains(&usd) {
        return Err(row_error(
            at,
            format!("price_per_gpu_hour_usd {usd} is not between 0 and {MAX_PRICE_USD}"),
        ));
    }
    Ok((usd * 1e6).round() as u64)
}

fn insert(table: &mut PriceTable, at: &str, key: PriceKey, price: u64) -> Result<(), TableError> {
    if table.insert(key.clone(), price).is_some() {
        return Err(row_error(
            at,
            format!("{key} appears twice; keep one row per key"),
        ));
    }
    if table.len() > MAX_ROWS {
        return Err(TableError::TooManyRows);
    }
    Ok(())
}

const COLUMNS: [&str; 5] = [
    "provider",
    "region",
    "model",
    "capacity",
    "price_per_gpu_hour_usd",
];

fn parse_csv(text: &str) -> Result<PriceTable, TableError> {
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let Some((header_line, header)) = rows.next() else {
        return Ok(PriceTable::new());
    };
    let header: Vec<String> = header
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let mut position = [0usize; 5];
    for (slot, column) in position.iter_mut().zip(COLUMNS) {
        *slot = header.iter().position(|h| h == column).ok_or_else(|| {
            row_error(
                format!("line {header_line}"),
                format!(
                    "the header has no {column:?} column; it needs {}",
                    COLUMNS.join(",")
                ),
            )
        })?;
    }
    let mut table = PriceTable::new();
    for (line, row) in rows {
        let at = format!("line {line}");
        let cells: Vec<&str> = row.split(',').collect();
        if cells.len() != header.len() {
            return Err(row_error(
                &at,
                format!("{} fields, the header has {}", cells.len(), header.len()),
            ));
        }
        let cell = |i: usize| cells[position[i]];
        let usd: f64 = cell(4).trim().parse().map_err(|_| {
            row_error(
                &at,
                format!(
                    "price_per_gpu_hour_usd {:?} is not a number like 3.93",
                    cell(4).trim()
                ),
            )
        })?;
        let key = PriceKey {
            provider: name(&at, "provider", cell(0))?,
            region: name(&at, "region", cell(1))?,
            model: name(&at, "model", cell(2))?,
            spot: capacity(&at, cell(3))?,
        };
        let price = micro_usd(&at, usd)?;
        insert(&mut table, &at, key, price)?;
    }
    Ok(table)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    #[serde(default)]
    provider: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    capacity: String,
    price_per_gpu_hour_usd: f64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonDocument {
    Wrapped { prices: Vec<JsonRow> },
    Bare(Vec<JsonRow>),
}

fn parse_json(text: &str) -> Result<PriceTable, TableError> {
    let document: JsonDocument = serde_json::from_str(text).map_err(|e| {
        TableError::Format(format!(
            "{e}; expected {{\"prices\": [{{\"provider\", \"region\", \"model\", \"capacity\", \"price_per_gpu_hour_usd\"}}]}}"
        ))
    })?;
    let rows = match document {
        JsonDocument::Wrapped { prices } => prices,
        JsonDocument::Bare(rows) => rows,
    };
    if rows.len() > MAX_ROWS {
        return Err(TableError::TooManyRows);
    }
    let mut table = PriceTable::new();
    for (i, row) in rows.into_iter().enumerate() {
        let at = format!("prices[{i}]");
        let key = PriceKey {
            provider: name(&at, "provider", &row.provider)?,
            region: name(&at, "region", &row.region)?,
            model: name(&at, "model", &row.model)?,
            spot: capacity(&at, &row.capacity)?,
        };
        let price = micro_usd(&at, row.price_per_gpu_hour_usd)?;
        insert(&mut table, &at, key, price)?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(provider: &str, region: &str, model: &str, spot: bool) -> PriceKey {
        PriceKey {
            provider: provider.into(),
            region: region.into(),
            model: model.into(),
            spot,
        }
    }

    #[test]
    fn csv_with_any_column_order_comments_and_wildcards() {
        let table = parse(
            "# prices of 2026-12-05\n\
             capacity,provider,region,model,price_per_gpu_hour_usd\n\
             on-demand,aws,us-east-1,H100-SXM-80GB,3.93\n\
             spot,aws,us-east-1,H100-SXM-80GB,2.1\n\
             \n\
             on-demand,lambda,*,A100-SXM4-80GB,1.29\n",
        )
        .unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(
            table[&key("aws", "us-east-1", "H100-SXM-80GB", false)],
            3_930_000
        );
        assert_eq!(
            table[&key("aws", "us-east-1", "H100-SXM-80GB", true)],
            2_100_000
        );
        assert_eq!(
            table[&key("lambda", "", "A100-SXM4-80GB", false)],
            1_290_000
        );
    }

    #[test]
    fn json_wrapped_and_bare() {
        let wrapped = parse(
            r#"{"prices": [{"provider": "nebius", "region": "eu-north1", "model": "H200-SXM-141GB",
                "capacity": "spot", "price_per_gpu_hour_usd": 2.5}]}"#,
        )
        .unwrap();
        let bare = parse(
            r#"[{"provider": "nebius", "region": "eu-north1", "model": "H200-SXM-141GB",
                "capacity": "spot", "price_per_gpu_hour_usd": 2.5}]"#,
        )
        .unwrap();
        assert_eq!(wrapped, bare);
        assert_eq!(
            wrapped[&key("nebius", "eu-north1", "H200-SXM-141GB", true)],
            2_500_000
        );
    }

    #[test]
    fn errors_name_the_row_and_the_field() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            err("provider,region,model,capacity\n"),
            "line 1: the header has no \"price_per_gpu_hour_usd\" column; it needs provider,region,model,capacity,price_per_gpu_hour_usd"
        );
        assert!(
            err("provider,region,model,capacity,price_per_gpu_hour_usd\naws,us-east-1,H100,on-demand,cheap\n")
                .starts_with("line 2: price_per_gpu_hour_usd \"cheap\" is not a number")
        );
        assert!(
            err("provider,region,model,capacity,price_per_gpu_hour_usd\naws,us east,H100,on-demand,1\n")
                .starts_with("line 2: region \"us east\" contains ' '")
        );
        assert!(
            err("provider,region,model,capacity,price_per_gpu_hour_usd\naws,r,H100,reserved,1\n")
                .contains("capacity \"reserved\" is neither")
        );
        assert!(
            err("provider,region,model,capacity,price_per_gpu_hour_usd\naws,r,H100,spot,-1\n")
                .contains("is not between 0 and")
        );
        assert!(
            err("provider,region,model,capacity,price_per_gpu_hour_usd\naws,r,H100,spot,1\naws,r,H100,spot,2\n")
                .contains("line 3: aws/r/H100/spot appears twice")
        );
        assert!(err(r#"[{"provider": "aws", "price": 1}]"#).starts_with("not a price document"));
        assert_eq!(
            parse(&"x".repeat(MAX_DOCUMENT_BYTES + 1)),
            Err(TableError::TooLarge(MAX_DOCUMENT_BYTES + 1))
        );
    }

    #[test]
    fn too_many_rows_is_refused() {
        let mut text = String::from("provider,region,model,capacity,price_per_gpu_hour_usd\n");
        for i in 0..=MAX_ROWS {
            text.push_str(&format!("p,r{i},m,spot,1\n"));
        }
        assert_eq!(parse(&text), Err(TableError::TooManyRows));
    }
}
