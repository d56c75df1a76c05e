//! Catalog of NVIDIA data-centre GPU models with their real properties.
//!
//! The agent's simulated backend builds GPUs from it, its NVML backend maps
//! a driver device name onto it, and the controller and CLI use the model
//! facts and the generation names for validation and display.

use gpufleet_proto::v1::GpuGeneration;

const GIB: u64 = 1024 * 1024 * 1024;

/// Static properties of one GPU model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    /// Normalised model name, e.g. `H100-SXM-80GB`.
    pub model: &'static str,
    /// Device name as NVML reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub nvml_name: &'static str,
    pub generation: GpuGeneration,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    /// Board power limit (TDP), watts.
    pub tdp_watts: u32,
    /// Typical power draw when idle, watts.
    pub idle_watts: u32,
    pub max_sm_clock_mhz: u32,
    pub max_mem_clock_mhz: u32,
}

macro_rules! model {
    ($model:literal, $nvml:literal, $gen:ident, $gib:expr, ($maj:literal, $min:literal), $tdp:literal, $idle:literal, $sm:literal, $mem:literal) => {
        ModelSpec {
            model: $model,
            nvml_name: $nvml,
            generation: GpuGeneration::$gen,
            memory_bytes: $gib * GIB,
            compute_capability: ($maj, $min),
            tdp_watts: $tdp,
            idle_watts: $idle,
            max_sm_clock_mhz: $sm,
            max_mem_clock_mhz: $mem,
        }
    };
}

/// Every model the agent knows, oldest generation first.
pub static MODELS: &[ModelSpec] = &[
    model!(
        "P100-PCIE-16GB",
        "Tesla P100-PCIE-16GB",
        Pascal,
        16,
        (6, 0),
        250,
        30,
        1328,
        715
    ),
    model!(
        "P100-SXM2-16GB",
        "Tesla P100-SXM2-16GB",
        Pascal,
        16,
        (6, 0),
        300,
        35,
        1480,
        715
    ),
    model!(
        "V100-SXM2-16GB",
        "Tesla V100-SXM2-16GB",
        Volta,
        16,
        (7, 0),
        300,
        40,
        1530,
        877
    ),
    model!(
        "V100-SXM2-32GB",
        "Tesla V100-SXM2-32GB",
        Volta,
        32,
        (7, 0),
        300,
        40,
        1530,
        877
    ),
    model!("T4", "Tesla T4", Turing, 16, (7, 5), 70, 10, 1590, 5001),
    model!("A10", "NVIDIA A10", Ampere, 24, (8, 6), 150, 20, 1695, 6251),
    model!(
        "A10G",
        "NVIDIA A10G",
        Ampere,
        24,
        (8, 6),
        300,
        25,
        1710,
        6251
    ),
    model!(
        "A100-PCIE-40GB",
        "NVIDIA A100-PCIE-40GB",
        Ampere,
        40,
        (8, 0),
        250,
        35,
        1410,
        1215
    ),
    model!(
        "A100-SXM-40GB",
        "NVIDIA A100-SXM4-40GB",
        Ampere,
        40,
        (8, 0),
        400,
        55,
        1410,
        1215
    ),
    model!(
        "A100-PCIE-80GB",
        "NVIDIA A100 80GB PCIe",
        Ampere,
        80,
        (8, 0),
        300,
        45,
        1410,
        1512
    ),
    model!(
        "A100-SXM-80GB",
        "NVIDIA A100-SXM4-80GB",
        Ampere,
        80,
        (8, 0),
        400,
        60,
        1410,
        1593
    ),
    model!("L4", "NVIDIA L4", Ada, 24, (8, 9), 72, 16, 2040, 6251),
    model!("L40S", "NVIDIA L40S", Ada, 48, (8, 9), 350, 35, 2520, 9001),
    model!(
        "H100-PCIE-80GB",
        "NVIDIA H100 PCIe",
        Hopper,
        80,
        (9, 0),
        350,
        50,
        1755,
        1593
    ),
    model!(
        "H100-SXM-80GB",
        "NVIDIA H100 80GB HBM3",
        Hopper,
        80,
        (9, 0),
        700,
        70,
        1980,
        2619
    ),
    model!(
        "H200-SXM-141GB",
        "NVIDIA H200",
        Hopper,
        141,
        (9, 0),
        700,
        75,
        1980,
        3201
    ),
    model!(
        "B200-SXM-180GB",
        "NVIDIA B200",
        Blackwell,
        180,
        (10, 0),
        1000,
        140,
        1965,
        3996
    ),
    model!(
        "GB200-186GB",
        "NVIDIA GB200",
        Blackwell,
        186,
        (10, 0),
        1200,
        160,
        2062,
        3996
    ),
];

/// Why a GPU declaration such as `8xH100-SXM-80GB` was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("invalid GPU declaration {0:?}: expected COUNTxMODEL, e.g. 8xH100-SXM-80GB")]
    BadDeclaration(String),
    #[error("invalid GPU count in {0:?}: expected a number from 1 to 64")]
    BadCount(String),
    #[error("unknown GPU model {model:?}; known models: {known}")]
    UnknownModel { model: String, known: String },
}

/// Looks a model up by its normalised name, case-insensitively.
pub fn lookup(model: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.model.eq_ignore_ascii_case(model))
}

/// Comma-separated list of every known model name, for error messages.
pub fn known_models() -> String {
    MODELS
        .iter()
        .map(|m| m.model)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `COUNTxMODEL` (e.g. `8xH100-SXM-80GB`, case-insensitive) into a
/// count and a catalog model. A bare model means one GPU. Model names are
/// matched exactly (no aliases) so that a typo never silently picks another
/// model; the error lists every accepted name.
pub fn parse_gpu_declaration(s: &str) -> Result<(u32, &'static ModelSpec), CatalogError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(CatalogError::BadDeclaration(s.to_string()));
    }
    let (count, model) = match s.split_once(['x', 'X']) {
        // Only treat the prefix as a count when it is all digits: model names
        // themselves never contain an `x`, but be strict anyway.
        Some((n, model)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            let count: u32 = n
                .parse()
                .map_err(|_| CatalogError::BadCount(s.to_string()))?;
            if !(1..=64).contains(&count) {
                return Err(CatalogError::BadCount(s.to_string()));
            }
            (count, model)
        }
        Some(_) => return Err(CatalogError::BadDeclaration(s.to_string())),
        None => (1, s),
    };
    let spec = lookup(model).ok_or_else(|| CatalogError::UnknownModel {
        model: model.to_string(),
        known: known_models(),
    })?;
    Ok((count, spec))
}

/// Maps an NVML device name (and its total memory) onto a catalog model.
///
/// Exact names match first; otherwise the family token (`H100`, `A10G`, …)
/// must appear as a word, the PCIe/SXM form factor is taken from the name,
/// and the model with the closest memory size wins. Memory more than 10%
/// off means a variant the catalog does not know (e.g. H100 NVL), so `None`.
pub fn model_from_nvml_name(name: &str, memory_bytes: u64) -> Option<&'static ModelSpec> {
    if let Some(m) = MODELS
        .iter()
        .find(|m| m.nvml_name.eq_ignore_ascii_case(name.trim()))
    {
        return Some(m);
    }
    let tokens: Vec<String> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_uppercase())
        .collect();
    let family_of = |m: &ModelSpec| m.model.split('-').next().unwrap_or(m.model);
    let mut candidates: Vec<&'static ModelSpec> = MODELS
        .iter()
        .filter(|m| tokens.iter().any(|t| t == family_of(m)))
        .collect();
    let is_pcie = |m: &ModelSpec| m.model.contains("PCIE");
    if candidates.iter().any(|m| is_pcie(m)) && candidates.iter().any(|m| !is_pcie(m)) {
        let name_pcie = tokens.iter().any(|t| t == "PCIE");
        candidates.retain(|m| is_pcie(m) == name_pcie);
    }
    let best = candidates
        .into_iter()
        .min_by_key(|m| m.memory_bytes.abs_diff(memory_bytes))?;
    if memory_bytes == 0 || best.memory_bytes.abs_diff(memory_bytes) <= best.memory_bytes / 10 {
        Some(best)
    } else {
        None
    }
}

/// Every generation, oldest first (not `Unspecified`).
pub fn all_generations() -> impl Iterator<Item = GpuGeneration> {
    (1..).map_while(|v| GpuGeneration::try_from(v).ok())
}

/// Lowercase name of a generation: `hopper`, `ampere`, …; `unspecified`
/// for the proto default. The one spelling flags, config and output use.
pub fn generation_name(generation: GpuGeneration) -> &'static str {
    match generation {
        GpuGeneration::Unspecified => "unspecified",
        GpuGeneration::Pascal => "pascal",
        GpuGeneration::Volta => "volta",
        GpuGeneration::Turing => "turing",
        GpuGeneration::Ampere => "ampere",
        GpuGeneration::Ada => "ada",
        GpuGeneration::Hopper => "hopper",
        GpuGeneration::Blackwell => "blackwell",
    }
}

/// The accepted generation names, for error messages.
pub fn generation_names() -> Vec<&'static str> {
    all_generations().map(generation_name).collect()
}

/// Parses a generation name (`hopper`, `Ampere`, `ADA`, `ada-lovelace`,
/// also the proto spelling `GPU_GENERATION_HOPPER`), case-insensitively.
/// `None` for anything else, `unspecified` included.
pub fn parse_generation(s: &str) -> Option<GpuGeneration> {
    let lower = s.trim().to_ascii_lowercase();
    let name = lower.strip_prefix("gpu_generation_").unwrap_or(&lower);
    let generation = match name {
        "pascal" => GpuGeneration::Pascal,
        "volta" => GpuGeneration::Volta,
        "turing" => GpuGeneration::Turing,
        "ampere" => GpuGeneration::Ampere,
        "ada" | "ada-lovelace" | "ada_lovelace" | "lovelace" => GpuGeneration::Ada,
        "hopper" => GpuGeneration::Hopper,
        "blackwell" => GpuGeneration::Blackwell,
        _ => return None,
    };
    Some(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_parse_case_insensitively() {
        let (n, m) = parse_gpu_declaration("8xH100-SXM-80GB").unwrap();
        assert_eq!((n, m.model), (8, "H100-SXM-80GB"));
        let (n, m) = parse_gpu_declaration("2xl4").unwrap();
        assert_eq!((n, m.model), (2, "L4"));
        let (n, m) = parse_gpu_declaration(" T4 ").unwrap();
        assert_eq!((n, m.model), (1, "T4"));
        assert_eq!(m.generation, GpuGeneration::Turing);
    }

    #[test]
    fn bad_declarations_are_rejected_with_the_accepted_names() {
        let err = parse_gpu_declaration("8xH100").unwrap_err().to_string();
        assert!(
            err.contains("H100-SXM-80GB") && err.contains("L40S"),
            "{err}"
        );
        assert!(matches!(
            parse_gpu_declaration("0xT4"),
            Err(CatalogError::BadCount(_))
        ));
        assert!(matches!(
            parse_gpu_declaration("100xT4"),
            Err(CatalogError::BadCount(_))
        ));
        assert!(parse_gpu_declaration("axT4").is_err());
        assert!(parse_gpu_declaration("").is_err());
    }

    #[test]
    fn nvml_names_map_to_models() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", 80, "H100-SXM-80GB"),
            ("NVIDIA H100 PCIe", 80, "H100-PCIE-80GB"),
            ("NVIDIA A100-SXM4-80GB", 80, "A100-SXM-80GB"),
            ("NVIDIA A100-SXM4-40GB", 40, "A100-SXM-40GB"),
            ("NVIDIA A100 80GB PCIe", 80, "A100-PCIE-80GB"),
            ("Tesla V100-SXM2-32GB", 32, "V100-SXM2-32GB"),
            ("NVIDIA A10G", 24, "A10G"),
            ("NVIDIA A10", 24, "A10"),
            ("NVIDIA L4", 22, "L4"),
            ("Tesla T4", 15, "T4"),
        ];
        for (name, gib, want) in cases {
            let got = model_from_nvml_name(name, gib * GIB).map(|m| m.model);
            assert_eq!(got, Some(want), "{name}");
        }
        // H100 NVL has 94 GB: not a catalog model.
        assert_eq!(model_from_nvml_name("NVIDIA H100 NVL", 94 * GIB), None);
        assert_eq!(model_from_nvml_name("Some Other GPU", 8 * GIB), None);
    }

    #[test]
    fn generations_round_trip() {
        for m in MODELS {
            let name = generation_name(m.generation);
            assert_eq!(parse_generation(name), Some(m.generation));
            assert_eq!(parse_generation(&name.to_uppercase()), Some(m.generation));
        }
        assert_eq!(
            parse_generation("GPU_GENERATION_HOPPER"),
            Some(GpuGeneration::Hopper)
        );
        assert_eq!(parse_generation("kepler"), None);
        assert_eq!(parse_generation("unspecified"), None);
        assert_eq!(generation_name(GpuGeneration::Unspecified), "unspecified");
        assert!(generation_names().contains(&"blackwell"));
        assert_eq!(generation_names().len(), 7);
    }
}
