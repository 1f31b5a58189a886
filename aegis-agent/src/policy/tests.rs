use super::*;

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

const FINANCE: &str = "agent: finance-agent\nversion: 3\negress:\n  - fqdn: api.stripe.com\n    ports: [443]\n  - fqdn: \"*.slack.com\"\n  - cidr: 198.18.5.7/24\n    ports: [443, 8443]\n";

#[test]
fn loads_a_valid_policy() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "finance.yaml", FINANCE);
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let p = set.for_identity("finance-agent", "acme").unwrap();
    assert_eq!(p.version, 3);
    assert_eq!(p.mode, Mode::Enforce);
    assert!(p.deny_raw_sockets);
    assert_eq!(
        p.fqdn_ports("api.stripe.com"),
        Some(Ports::Only([443].into()))
    );
    assert_eq!(p.fqdn_ports("files.eu.slack.com"), Some(Ports::Any));
    assert_eq!(p.fqdn_ports("slack.com"), None);
    assert_eq!(p.fqdn_ports("api.stripe.com.evil.test"), None);
    assert_eq!(p.fqdn_ports("evilslack.com"), None);
    let cidrs: Vec<_> = p.cidrs().collect();
    // The host bits are truncated: 198.18.5.7/24 means 198.18.5.0/24.
    assert_eq!(cidrs[0].0, "198.18.5.0/24".parse::<IpNet>().unwrap());
}

#[test]
fn tenant_policy_wins_over_agent_policy() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "agent: a\nversion: 1\n");
    write(dir.path(), "b.yaml", "agent: a\ntenant: t1\nversion: 2\n");
    let set = PolicySet::load_dir(dir.path()).unwrap();
    assert_eq!(set.for_identity("a", "t1").unwrap().version, 2);
    assert_eq!(set.for_identity("a", "t2").unwrap().version, 1);
    assert!(set.for_identity("b", "t1").is_none());
}

fn load_err(text: &str) -> PolicyError {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bad.yaml", text);
    let mut errs = PolicySet::load_dir(dir.path()).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.remove(0)
}

#[test]
fn errors_name_file_line_and_field() {
    let e = load_err(
        "agent: a\nversion: 1\negress:\n  - fqdn: ok.example.com\n  - fqdn: \"bad..name\"\n",
    );
    assert!(e.file.ends_with("bad.yaml"));
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("bad label"), "{e}");
    let shown = e.to_string();
    assert!(shown.contains("bad.yaml:5:"), "{shown}");

    // The unknown field is reported on its own line.
    let e = load_err("agent: a\nversion: 1\negress:\n  - fqdn: a.example.com\n    port: [443]\n");
    assert_eq!(e.line, 5, "{e}");
    assert!(
        !e.message.contains("at line"),
        "the location is not repeated: {e}"
    );
    assert!(e.message.contains("unknown field `port`"), "{e}");

    let e = load_err("agent: a\nversion: 1\negress:\n  - cidr: 10.0.0.0/33\n");
    assert_eq!(e.line, 4, "{e}");

    let e = load_err("agent: A_Bad\nversion: 1\n");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("invalid name"), "{e}");

    let e = load_err("agent: a\nversion: 1\nmode: loud\n");
    assert_eq!(e.line, 3, "{e}");

    let e =
        load_err("agent: a\nversion: 1\negress:\n  - fqdn: a.example.com\n    cidr: 10.0.0.0/8\n");
    assert!(e.message.contains("exactly one of"), "{e}");

    let e = load_err("agent: a\n");
    assert!(e.message.contains("missing field `version`"), "{e}");
}

#[test]
fn rejects_wildcards_in_the_wrong_place_and_too_many_ports() {
    for bad in [
        "\"*\"",
        "\"*.com\"",
        "\"a.*.com\"",
        "\"*a.example.com\"",
        "\"-a.example.com\"",
    ] {
        let e = load_err(&format!("agent: a\nversion: 1\negress:\n  - fqdn: {bad}\n"));
        assert_eq!(e.line, 4, "{bad}: {e}");
    }
    let e = load_err(
        "agent: a\nversion: 1\negress:\n  - fqdn: a.example.com\n    ports: [1,2,3,4,5]\n  - fqdn: b.example.com\n    ports: [6,7,8,9]\n",
    );
    assert_eq!(e.line, 3, "{e}");
    assert!(e.message.contains("9 distinct ports"), "{e}");
}

#[test]
fn duplicate_identity_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "one.yaml", "agent: a\nversion: 1\n");
    write(dir.path(), "two.yaml", "# comment\nagent: a\nversion: 2\n");
    let errs = PolicySet::load_dir(dir.path()).unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert!(errs[0].file.ends_with("two.yaml"));
    assert_eq!(errs[0].line, 2);
    assert!(errs[0].message.contains("one.yaml"), "{}", errs[0]);
}

#[test]
fn fqdn_patterns_are_case_insensitive_and_ignore_the_root_dot() {
    let p = FqdnPattern::try_from("API.Stripe.COM.".to_owned()).unwrap();
    assert!(p.matches("api.stripe.com"));
    let w = FqdnPattern::try_from("*.Slack.com".to_owned()).unwrap();
    assert!(w.matches("a.b.slack.com"));
    assert!(!w.matches("slack.com"));
    assert_eq!(w.to_string(), "*.slack.com");
}

#[test]
fn shipped_example_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(!set.is_empty());
}
