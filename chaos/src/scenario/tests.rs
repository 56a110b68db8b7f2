use super::*;

#[test]
fn every_built_in_scenario_parses() {
    for (name, text) in BUILT_IN {
        let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.name, name);
    }
}

#[test]
fn bad_scenarios_get_precise_errors() {
    let base = "name = \"x\"\nduration = \"5s\"\n";
    let cases = [
        ("", "missing field `name`"),
        ("name = \"x\"\nduration = \"five\"\n", "duration = \"five\": not a duration"),
        (&format!("{base}[topology]\ncells = 9\n"), "topology.cells = 9"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"kill\"\ntarget = \"cell-z\"\n"), "step 1 (kill): target = \"cell-z\": no such cell"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"kill\"\ntarget = \"cell-a/red\"\n"), "the colour is blue or green"),
        (&format!("{base}[[step]]\nat = \"4s\"\nfor = \"2s\"\naction = \"kill\"\ntarget = \"cell-a\"\n"), "ends after the drill's duration"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"freeze\"\ntarget = \"cell-a\"\n"), "needs for"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"link\"\nlink = \"cell-a->cell-a\"\nfault = \"reset\"\n"), "no link to itself"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"link\"\nlink = \"gateway->cell-a/blue\"\nfault = \"slow\"\n"), "one of latency, blackhole, reset"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"switchover\"\ncell = \"cell-a\"\nto = \"cell-b\"\ntarget = \"gateway\"\n"), "target does not apply"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"explode\"\n"), "action = \"explode\""),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"split\"\ncell = \"cell-a\"\ngreen = \"200%\"\n"), "green = \"200%\""),
        (&format!("{base}bogus = 1\n"), "unknown field `bogus`"),
        (&format!("{base}expect = \"fail\"\n"), "needs expect_reason"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"partition\"\ncell = \"cell-a\"\n"), "needs the cells in network namespaces: set topology.network = \"namespaces\""),
        (&format!("{base}[topology]\nnetwork = \"namespaces\"\n[[step]]\nat = \"1s\"\naction = \"link\"\nlink = \"cell-a->cell-b\"\nfault = \"reset\"\n"), "which a topology in network namespaces does not have"),
        (&format!("{base}[topology]\nnetwork = \"namespaces\"\n[[step]]\nat = \"1s\"\naction = \"partition\"\n"), "step 1 (partition): needs cell"),
        (&format!("{base}[topology]\nnetwork = \"namespaces\"\n[[step]]\nat = \"1s\"\naction = \"partition\"\ncell = \"cell-a\"\nfault = \"reset\"\n"), "fault does not apply"),
        (&format!("{base}[topology]\nnetwork = \"tunnels\"\n"), "unknown variant `tunnels`"),
        (&format!("{base}[topology]\ngateways = 5\n"), "topology.gateways = 5: must be 1..=4"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"kill\"\ntarget = \"gateway-2\"\n"), "target = \"gateway-2\": no such gateway"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"rules-apply\"\n"), "needs merge"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"rules-apply\"\nmerge = \"[cells\"\n"), "merge: not TOML"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"rules-apply\"\nmerge = \"revision = 3\"\n"), "merge sets `revision`"),
        (&format!("{base}[[step]]\nat = \"1s\"\nfor = \"1s\"\naction = \"rules-apply\"\nmerge = \"slots = 7\"\n"), "for does not apply"),
        (&format!("{base}[[step]]\nat = \"1s\"\naction = \"kill\"\ntarget = \"gateway\"\nmerge = \"slots = 7\"\n"), "merge does not apply"),
    ];
    for (text, want) in cases {
        let e = Scenario::parse(text).unwrap_err();
        assert!(e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn split_steps_repeat_and_duration_is_checked() {
    let s = Scenario::parse(
        "name = \"x\"\nduration = \"5s\"\n[[step]]\nat = \"1s\"\nevery = \"1s\"\ntimes = 3\naction = \"split\"\ncell = \"cell-b\"\ngreen = \"0%,50%\"\n",
    )
    .unwrap();
    let shares: Vec<_> = s
        .steps
        .iter()
        .map(|s| (s.at.as_millis(), s.action.clone()))
        .collect();
    assert_eq!(shares.len(), 3);
    assert_eq!(shares[2].0, 3000);
    assert_eq!(
        shares[1].1,
        Action::Split {
            cell: "cell-b".into(),
            green_bp: 5000
        }
    );
    assert!(s.clone().with_duration(Duration::from_secs(2)).is_err());
    assert_eq!(
        s.with_duration(Duration::from_secs(4)).unwrap().duration,
        Duration::from_secs(4)
    );
}

#[test]
fn a_partition_affects_its_cell_and_the_cell_it_is_the_standby_of() {
    let s = Scenario::parse(
        "name = \"x\"\nduration = \"5s\"\n[topology]\nnetwork = \"namespaces\"\n[[step]]\nat = \"1s\"\nfor = \"2s\"\naction = \"partition\"\ncell = \"cell-b\"\n",
    )
    .unwrap();
    assert_eq!(s.topology.network, Network::Namespaces);
    let step = &s.steps[0];
    assert_eq!(step.for_, Some(Duration::from_secs(2)));
    assert_eq!(
        step.action,
        Action::Partition {
            cell: "cell-b".into()
        }
    );
    assert_eq!(step.action.affected(&s.cells()), ["cell-b", "cell-a"]);
}
