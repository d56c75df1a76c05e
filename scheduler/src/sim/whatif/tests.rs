//! The what-if edits' parsers and their application: good and bad inputs,
//! errors that name the flag and the accepted form.

use super::*;
use crate::sim::workload::SimJob;

fn node(id: &str, model: &str, generation: Generation, provider: &str, region: &str) -> SimNode {
    SimNode {
        id: id.into(),
        model: model.into(),
        generation,
        gpus: 8,
        price_per_gpu_hour_micro_usd: 2_000_000,
        provider: provider.into(),
        region: region.into(),
    }
}

fn fleet() -> Workload {
    Workload {
        nodes: vec![
            node("a", "V100-SXM2-32GB", Generation::Volta, "aws", "us-east-1"),
            node("b", "V100-SXM2-16GB", Generation::Volta, "aws", "eu-west-1"),
            node(
                "c",
                "A100-SXM-80GB",
                Generation::Ampere,
                "lambda",
                "us-east-1",
            ),
            node("d", "A100-SXM-80GB", Generation::Ampere, "aws", "us-east-1"),
        ],
        jobs: [0, 10, 25, 100]
            .iter()
            .enumerate()
            .map(|(i, &arrival)| SimJob {
                id: format!("j{i}"),
                tenant: "t".into(),
                priority: 0,
                arrival,
                duration: 60,
                gpus: 1,
                gpu_milli: 0,
                models: Vec::new(),
                ..Default::default()
            })
            .collect(),
        notes: Default::default(),
    }
}

const CATALOGUE: [(&str, Generation); 3] = [
    ("H100-SXM-80GB", Generation::Hopper),
    ("H100-PCIE-80GB", Generation::Hopper),
    ("L4", Generation::Ada),
];

fn edits(
    add: &[&str],
    remove: &[&str],
    price: &[&str],
    load: Option<&str>,
) -> Result<Edits, EditError> {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    Edits::parse(&v(add), &v(remove), &v(price), load)
}

#[test]
fn add_parses_gpus_and_nodes_forms() {
    let a = parse_add("20xH100-SXM-80GB@nebius/eu-north1:$2.90").unwrap();
    assert_eq!((a.nodes, a.gpus_per_node, a.gpus), (3, 8, 20));
    assert_eq!(
        (a.provider.as_str(), a.region.as_str()),
        ("nebius", "eu-north1")
    );
    assert_eq!(a.price_micro_usd, 2_900_000);
    let b = parse_add("3x4xL4@gcp/us-central1:0.8").unwrap();
    assert_eq!(
        (b.nodes, b.gpus_per_node, b.gpus, b.model.as_str()),
        (3, 4, 12, "L4")
    );
    let c = parse_add("2xT4@x/y:$0").unwrap();
    assert_eq!((c.nodes, c.gpus_per_node), (1, 2));
}

#[test]
fn add_errors_name_the_flag_and_the_form() {
    for (text, why) in [
        ("20xH100@nebius/eu-north1", "no `:$PRICE`"),
        ("20xH100:$2", "no `@PROVIDER/REGION`"),
        ("20xH100@nebius:$2", "PROVIDER/REGION"),
        ("H100@a/b:$2", "GPUSxMODEL"),
        ("0xH100@a/b:$2", "GPU count 0 is out of range"),
        ("1000000001xH100@a/b:$2", "out of range 1..=1000000"),
        (
            "2x33xH100@a/b:$2",
            "GPUs per node 33 is out of range 1..=32",
        ),
        ("100000x100xH100@a/b:$2", "out of range"),
        ("2xH100@a/b:$two", "price `$two` is not a number"),
        ("2xH100@a/b:$-1", "out of range"),
        ("2xH100@a b/c:$1", "provider `a b`"),
        ("2x@a/b:$1", "no model"),
    ] {
        let err = parse_add(text).unwrap_err().0;
        assert!(err.starts_with(&format!("--add `{text}`")), "{err}");
        assert!(err.contains(why), "{text}: {err}");
        assert!(
            err.contains("expected [NODESx]GPUSxMODEL@PROVIDER/REGION:$PRICE"),
            "{err}"
        );
    }
}

#[test]
fn added_gpus_are_bounded_in_all() {
    let err = edits(&["600000xL4@a/b:1", "600000xL4@a/c:1"], &[], &[], None)
        .unwrap_err()
        .0;
    assert!(
        err.contains("1200000 GPUs in all; at most 1000000"),
        "{err}"
    );
    let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
    let err = Edits::parse(&[], &many, &[], None).unwrap_err().0;
    assert!(
        err.contains("--remove is given 65 times; at most 64"),
        "{err}"
    );
}

#[test]
fn add_resolves_models_from_the_fleet_then_the_catalogue() {
    let mut w = fleet();
    let e = edits(
        &[
            "20xH100-SXM-80GB@nebius/eu-north1:$2.90",
            "1xa100-sxm-80gb@x/y:1",
            "4xL4@gcp/r:0.8",
        ],
        &[],
        &[],
        None,
    )
    .unwrap();
    let applied = e.apply(&mut w, &CATALOGUE).unwrap();
    assert_eq!(w.nodes.len(), 4 + 3 + 1 + 1);
    let added: Vec<&SimNode> = w.nodes[4..7].iter().collect();
    assert_eq!(added.iter().map(|n| n.gpus).collect::<Vec<_>>(), [8, 8, 4]);
    assert!(added.iter().all(|n| n.generation == Generation::Hopper
        && n.provider == "nebius"
        && n.price_per_gpu_hour_micro_usd == 2_900_000));
    assert_eq!(w.nodes[7].model, "A100-SXM-80GB", "the fleet's spelling");
    assert_eq!(w.nodes[8].generation, Generation::Ada);
    assert_eq!(w.nodes[4].id, "whatif-nebius-eu-north1-000000");
    assert!(
        applied[0]
            .contains("added 20 × H100-SXM-80GB (Hopper) on 3 node(s) at nebius/eu-north1, $2.90"),
        "{applied:?}"
    );
    // A family resolves only when one model is of it.
    let e = edits(&["1xV100@a/b:1"], &[], &[], None).unwrap();
    let err = e.apply(&mut fleet(), &CATALOGUE).unwrap_err().0;
    assert!(
        err.contains("could be V100-SXM2-32GB or V100-SXM2-16GB; name one"),
        "{err}"
    );
    let e = edits(&["1xH100@a/b:1"], &[], &[], None).unwrap();
    let err = e.apply(&mut fleet(), &CATALOGUE).unwrap_err().0;
    assert!(err.contains("H100-SXM-80GB or H100-PCIE-80GB"), "{err}");
    let e = edits(&["1xA100@a/b:1"], &[], &[], None).unwrap();
    e.apply(&mut w, &CATALOGUE).unwrap();
    assert_eq!(w.nodes.last().unwrap().model, "A100-SXM-80GB");
    let e = edits(&["1xZ9@a/b:1"], &[], &[], None).unwrap();
    let err = e.apply(&mut fleet(), &CATALOGUE).unwrap_err().0;
    assert!(
        err.contains("unknown model `Z9`; known: V100-SXM2-32GB"),
        "{err}"
    );
}

#[test]
fn remove_by_id_selector_and_count() {
    let r = parse_remove("b").unwrap();
    assert_eq!(r.selector.node.as_deref(), Some("b"));
    let mut w = fleet();
    let e = edits(&[], &["b"], &[], None).unwrap();
    assert_eq!(
        e.apply(&mut w, &[]).unwrap(),
        ["--remove b: removed 1 node(s), 8 GPUs"]
    );
    assert_eq!(
        w.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "c", "d"]
    );

    let mut w = fleet();
    edits(&[], &["model=V100"], &[], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(
        w.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["c", "d"]
    );

    let mut w = fleet();
    edits(&[], &["region=us-east-1,count=2"], &[], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(
        w.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "the last two"
    );

    let mut w = fleet();
    edits(&[], &["generation=ampere,provider=aws"], &[], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(
        w.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
}

#[test]
fn remove_errors() {
    for (text, why) in [
        ("model=V100,colour=red", "unknown key `colour`"),
        ("count=3", "no selector besides count"),
        ("model=V100,count=0", "count 0 is out of range"),
        ("model=V100,model=A100", "`model` is given twice"),
        (
            "generation=kepler",
            "generation `kepler` is not one of Pascal",
        ),
        ("model=V100,oops", "`oops` is not KEY=VALUE"),
        ("bad id!", "node id `bad id!`"),
    ] {
        let err = parse_remove(text).unwrap_err().0;
        assert!(err.starts_with(&format!("--remove `{text}`")), "{err}");
        assert!(err.contains(why), "{text}: {err}");
        assert!(err.contains("expected NODE_ID or KEY=VALUE"), "{err}");
    }
    let err = edits(&[], &["nope"], &[], None)
        .unwrap()
        .apply(&mut fleet(), &[])
        .unwrap_err()
        .0;
    assert_eq!(err, "--remove `nope`: no node matches");
    let err = edits(&[], &["model=A100,count=3"], &[], None)
        .unwrap()
        .apply(&mut fleet(), &[])
        .unwrap_err()
        .0;
    assert_eq!(
        err,
        "--remove `model=A100,count=3`: count=3 but only 2 nodes match"
    );
}

#[test]
fn price_absolute_relative_and_scoped() {
    let mut w = fleet();
    let applied = edits(&[], &[], &["A100@aws=$1.50", "V100=-25%"], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    let prices: Vec<u64> = w
        .nodes
        .iter()
        .map(|n| n.price_per_gpu_hour_micro_usd)
        .collect();
    assert_eq!(prices, [1_500_000, 1_500_000, 2_000_000, 1_500_000]);
    assert_eq!(
        applied[0],
        "--price A100@aws=$1.50: 1 node(s) repriced, mean $2.00 → $1.50 per GPU-hour"
    );
    let mut w = fleet();
    edits(&[], &[], &["*@aws/us-east-1=+10%"], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    let prices: Vec<u64> = w
        .nodes
        .iter()
        .map(|n| n.price_per_gpu_hour_micro_usd)
        .collect();
    assert_eq!(prices, [2_200_000, 2_000_000, 2_000_000, 2_200_000]);
    // Prices apply before additions: an added node keeps its own price.
    let mut w = fleet();
    edits(&["8xA100-SXM-80GB@aws/x:$3"], &[], &["A100=$1"], None)
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(w.nodes[4].price_per_gpu_hour_micro_usd, 3_000_000);
}

#[test]
fn price_errors() {
    for (text, why) in [
        ("A100", "no `=PRICE`"),
        ("A100=abc", "price `abc` is not a number"),
        ("A100=-200%", "is not a change from -100% to +1000%"),
        ("A100=$5000", "out of range 0..=1000"),
        ("A 100=$1", "model `A 100`"),
    ] {
        let err = parse_price(text).unwrap_err().0;
        assert!(err.starts_with(&format!("--price `{text}`")), "{err}");
        assert!(err.contains(why), "{text}: {err}");
        assert!(
            err.contains("expected MODEL[@PROVIDER[/REGION]]=$PRICE"),
            "{err}"
        );
    }
    let err = edits(&[], &[], &["H100=$1"], None)
        .unwrap()
        .apply(&mut fleet(), &[])
        .unwrap_err()
        .0;
    assert_eq!(err, "--price `H100=$1`: no node matches");
}

#[test]
fn load_compresses_arrivals_deterministically() {
    assert_eq!(parse_load("1.2"), Ok(1_200_000));
    assert_eq!(parse_load("2x"), Ok(2_000_000));
    for text in ["0", "-1", "abc", "1000", "NaN", "inf"] {
        let err = parse_load(text).unwrap_err().0;
        assert!(err.starts_with(&format!("--load `{text}`")), "{err}");
        assert!(err.contains("expected a factor from 0.01 to 100"), "{err}");
    }
    let mut w = fleet();
    let applied = edits(&[], &[], &[], Some("2"))
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(
        w.jobs.iter().map(|j| j.arrival).collect::<Vec<_>>(),
        [0, 5, 12, 50]
    );
    assert!(
        applied[0].starts_with("--load 2: arrivals 2.00× as fast"),
        "{applied:?}"
    );
    let mut w = fleet();
    edits(&[], &[], &[], Some("0.5"))
        .unwrap()
        .apply(&mut w, &[])
        .unwrap();
    assert_eq!(
        w.jobs.iter().map(|j| j.arrival).collect::<Vec<_>>(),
        [0, 20, 50, 200]
    );
    assert!(edits(&[], &[], &[], None).unwrap().is_empty());
}
