//! Tenants' quotas and weights from the command line (`--quota`,
//! `--weight`), into the scheduler configuration a simulation passes to
//! each pass, as the controller's `[tenants.NAME]` tables do.
//!
//! Forms: `--quota TENANT=N[,GENERATION=N…]` (N: most GPUs held at once, in
//! all and per generation; `TENANT=unlimited,Hopper=8` for a generation
//! quota only) and `--weight TENANT=W` (0 < W ≤ 1000, as the controller).

use std::collections::HashMap;

use crate::config::TenantPolicy;
use crate::domain::Generation;

/// Most `--quota` plus `--weight` flags in one run.
pub const MAX_TENANT_FLAGS: usize = 1000;
/// Most GPUs a quota may name (a bound, not a fleet limit).
pub const MAX_QUOTA_GPUS: u32 = 10_000_000;

/// Applies `--quota` then `--weight` flags on top of `tenants` (e.g. those
/// of a controller configuration file). Errors name the flag and the form.
pub fn apply(
    tenants: &mut HashMap<String, TenantPolicy>,
    quotas: &[String],
    weights: &[String],
) -> Result<(), String> {
    if quotas.len() + weights.len() > MAX_TENANT_FLAGS {
        return Err(format!(
            "--quota and --weight: at most {MAX_TENANT_FLAGS} in all (got {})",
            quotas.len() + weights.len()
        ));
    }
    let mut seen: Vec<String> = Vec::new();
    for text in quotas {
        let (tenant, policy) = parse_quota(text)?;
        if seen.contains(&tenant) {
            return Err(format!(
                "--quota `{text}`: tenant `{tenant}` has a quota already; give each tenant one --quota"
            ));
        }
        seen.push(tenant.clone());
        let entry = tenants.entry(tenant).or_insert_with(|| TenantPolicy {
            weight: 1.0,
            ..Default::default()
        });
        entry.max_gpus = policy.max_gpus;
        entry.max_gpus_per_generation = policy.max_gpus_per_generation;
    }
    let mut seen: Vec<String> = Vec::new();
    for text in weights {
        let form = "use --weight TENANT=W with 0 < W ≤ 1000, e.g. --weight ml=2";
        let (tenant, value) = text
            .split_once('=')
            .ok_or_else(|| format!("--weight `{text}`: {form}"))?;
        let tenant = tenant_name("--weight", text, tenant)?;
        let weight: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("--weight `{text}`: `{value}` is not a number; {form}"))?;
        if !(weight.is_finite() && weight > 0.0 && weight <= 1000.0) {
            return Err(format!(
                "--weight `{text}`: {weight} is out of range; {form}"
            ));
        }
        if seen.contains(&tenant) {
            return Err(format!(
                "--weight `{text}`: tenant `{tenant}` has a weight already"
            ));
        }
        seen.push(tenant.clone());
        tenants
            .entry(tenant)
            .or_insert_with(|| TenantPolicy {
                weight: 1.0,
                ..Default::default()
            })
            .weight = weight;
    }
    Ok(())
}

/// One `--quota TENANT=N[,GENERATION=N…]`.
fn parse_quota(text: &str) -> Result<(String, TenantPolicy), String> {
    let form = "use --quota TENANT=N[,GENERATION=N…] (N GPUs, or `unlimited` for the total), \
                e.g. --quota ml=16,Hopper=8";
    let mut parts = text.split(',');
    let (tenant, total) = parts
        .next()
        .and_then(|p| p.split_once('='))
        .ok_or_else(|| format!("--quota `{text}`: {form}"))?;
    let tenant = tenant_name("--quota", text, tenant)?;
    let mut policy = TenantPolicy {
        weight: 1.0,
        ..Default::default()
    };
    if !total.trim().eq_ignore_ascii_case("unlimited") {
        policy.max_gpus = Some(gpus(text, total, form)?);
    }
    for part in parts {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("--quota `{text}`: `{part}` is not GENERATION=N; {form}"))?;
        let generation = Generation::ALL
            .into_iter()
            .skip(1)
            .find(|g| g.label().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = Generation::ALL[1..].iter().map(|g| g.label()).collect();
                format!(
                    "--quota `{text}`: `{}` is not a GPU generation; accepted: {}",
                    name.trim(),
                    names.join(", ")
                )
            })?;
        if policy
            .max_gpus_per_generation
            .insert(generation, gpus(text, value, form)?)
            .is_some()
        {
            return Err(format!(
                "--quota `{text}`: {} is given twice",
                generation.label()
            ));
        }
    }
    Ok((tenant, policy))
}

fn gpus(text: &str, value: &str, form: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(n) if n <= MAX_QUOTA_GPUS => Ok(n),
        _ => Err(format!(
            "--quota `{text}`: `{value}` is not a GPU count from 0 to {MAX_QUOTA_GPUS}; {form}"
        )),
    }
}

/// Tenant names as the controller accepts them: 1–64 letters, digits, `-`,
/// `_` or `.`.
fn tenant_name(flag: &str, text: &str, name: &str) -> Result<String, String> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{flag} `{text}`: tenant `{name}`: tenant names use 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(quotas: &[&str], weights: &[&str]) -> Result<HashMap<String, TenantPolicy>, String> {
        let mut tenants = HashMap::new();
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        apply(&mut tenants, &own(quotas), &own(weights))?;
        Ok(tenants)
    }

    #[test]
    fn quotas_and_weights_parse() {
        let t = parsed(
            &["ml=16,Hopper=8,ampere=4", "web=unlimited,Ada=2"],
            &["ml=2.5"],
        )
        .unwrap();
        let ml = &t["ml"];
        assert_eq!(ml.max_gpus, Some(16));
        assert_eq!(ml.max_gpus_per_generation[&Generation::Hopper], 8);
        assert_eq!(ml.max_gpus_per_generation[&Generation::Ampere], 4);
        assert_eq!(ml.weight, 2.5);
        let web = &t["web"];
        assert_eq!(web.max_gpus, None);
        assert_eq!(web.max_gpus_per_generation[&Generation::Ada], 2);
        assert_eq!(web.weight, 1.0);
    }

    #[test]
    fn flags_override_a_file_s_tenant_but_keep_its_other_settings() {
        let mut tenants = HashMap::from([(
            "ml".to_string(),
            TenantPolicy {
                weight: 3.0,
                max_gpus: Some(100),
                ..Default::default()
            },
        )]);
        apply(&mut tenants, &["ml=8".to_string()], &[]).unwrap();
        assert_eq!(
            (tenants["ml"].weight, tenants["ml"].max_gpus),
            (3.0, Some(8))
        );
    }

    #[test]
    fn errors_name_the_flag_and_the_form() {
        for (quotas, weights, needle) in [
            (vec!["ml"], vec![], "--quota `ml`: use --quota TENANT=N"),
            (vec!["ml=x"], vec![], "`x` is not a GPU count"),
            (vec!["ml=99999999999"], vec![], "is not a GPU count"),
            (
                vec!["ml=4,Kepler=2"],
                vec![],
                "`Kepler` is not a GPU generation; accepted: Pascal",
            ),
            (vec!["ml=4,Hopper"], vec![], "`Hopper` is not GENERATION=N"),
            (
                vec!["ml=4,Hopper=1,hopper=2"],
                vec![],
                "Hopper is given twice",
            ),
            (vec!["ml=4", "ml=5"], vec![], "has a quota already"),
            (vec!["a b=4"], vec![], "tenant names use 1-64"),
            (vec![], vec!["ml"], "--weight `ml`: use --weight TENANT=W"),
            (vec![], vec!["ml=0"], "out of range"),
            (vec![], vec!["ml=NaN"], "out of range"),
            (vec![], vec!["ml=2", "ml=3"], "has a weight already"),
        ] {
            let err = parsed(&quotas, &weights).unwrap_err();
            assert!(err.contains(needle), "{err} (wanted {needle})");
        }
        let many: Vec<String> = (0..=MAX_TENANT_FLAGS).map(|i| format!("t{i}=1")).collect();
        let err = apply(&mut HashMap::new(), &many, &[]).unwrap_err();
        assert!(err.contains("at most 1000"), "{err}");
    }
}
