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

/// A ConfigMap volume as kubelet writes it: the keys are symbolic links through `..data` to a
/// timestamped directory; kubelet's own `..` entries are never read as policies.
#[test]
fn loads_a_configmap_volume_and_skips_kubelet_entries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..2026_11_22_05_00_00.000000001");
    fs::create_dir(&data).unwrap();
    write(&data, "a.yaml", "agent: a\nversion: 4\n");
    std::os::unix::fs::symlink(data.file_name().unwrap(), dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/a.yaml", dir.path().join("a.yaml")).unwrap();
    // Not something kubelet makes, but a `..` name kubelet may reserve: never a policy.
    write(dir.path(), "..data_tmp.yaml", "not: [valid");
    let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.len(), 1);
    assert_eq!(set.for_identity("a", "default").unwrap().version, 4);
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

// === L7 ===

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// A generous limit: tests check decisions, not speed, on a shared, unoptimized build.
const TEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

fn example_engine() -> L7Engine {
    let set = PolicySet::load_dir(&examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap_or_else(|e| panic!("{e}"))
}

/// Every case of `policies/tests/*.yaml` (what `aegis-agent policy test policies/` runs).
#[test]
fn shipped_policy_cases_pass() {
    let engine = example_engine();
    let outcomes = run_cases(&engine, &examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.failure
                .as_ref()
                .map(|f| format!("{}: {}: {f}", o.file.display(), o.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        outcomes.len(),
        failures.join("\n")
    );
    // Every example policy has cases.
    for policy in engine.policies().iter() {
        assert!(
            outcomes.iter().any(|o| fs::read_to_string(&o.file)
                .unwrap()
                .contains(&format!("agent: {}", policy.agent))),
            "no case for {}",
            policy.source.display()
        );
    }
}

/// `policies/compiled/` is what `aegis-agent policy compile policies/` writes today.
#[test]
fn committed_bundle_is_up_to_date() {
    let set = PolicySet::load_dir(&examples_dir()).unwrap();
    let compiled = examples_dir().join("compiled");
    for (name, text) in compile_bundle(&set).modules {
        let committed = fs::read_to_string(compiled.join(&name)).unwrap_or_default();
        assert!(
            committed == text,
            "policies/compiled/{name} is stale: run `aegis-agent policy compile policies/`"
        );
    }
}

#[test]
fn inspects_follows_inspect_entries() {
    let set = PolicySet::load_dir(&examples_dir()).unwrap();
    let finance = set.for_identity("finance-agent", "acme").unwrap();
    assert!(finance.inspects("api.stripe.com"));
    assert!(finance.inspects("Hooks.Slack.com."));
    assert!(!finance.inspects("slack.com"));
    assert!(!finance.inspects("evil.example"));
    let support = set.for_identity("support-agent", "default").unwrap();
    assert!(support.inspects("slack.com"));
    // `*.slack.com` is allowed for support-agent but not inspected.
    assert!(!support.inspects("files.slack.com"));
    assert_eq!(
        support.fqdn_ports("files.slack.com"),
        Some(Ports::Only([443].into()))
    );
    // The egress the demo needs stays allowed.
    assert_eq!(
        finance.fqdn_ports("api.stripe.com"),
        Some(Ports::Only([443].into()))
    );
    assert!(finance.fqdn_ports("hooks.slack.com").is_some());
}

const L7_HEAD: &str = "agent: a\nversion: 1\negress:\n  - fqdn: api.example.com\n    inspect: true\n  - fqdn: other.example.com\ntools:\n  - name: t\n    host: api.example.com\n    actions:\n";

#[test]
fn l7_errors_name_file_line_and_field() {
    let action = |rest: &str| {
        format!("{L7_HEAD}      - name: act\n        method: POST\n        path: /x\n{rest}")
    };
    // Line 14 is the first line after `path:`.
    let e = load_err(&action(
        "        params:\n          id: { regex: \"a(b\" }\n",
    ));
    assert_eq!(e.line, 15, "{e}");
    assert!(e.message.contains("invalid regex"), "{e}");
    let e = load_err(&action(
        "        hours: { tz: Mars/Olympus, from: \"09:00\", to: \"17:00\" }\n",
    ));
    assert_eq!(e.line, 14, "{e}");
    assert!(e.message.contains("unknown time zone"), "{e}");
    let e = load_err(&action(
        "        hours: { tz: UTC, from: \"18:00\", to: \"09:00\" }\n",
    ));
    assert!(e.message.contains("across midnight"), "{e}");
    let e = load_err(&action("        params:\n          amount: { maxx: 5 }\n"));
    assert_eq!(e.line, 15, "{e}");
    assert!(e.message.contains("unknown field `maxx`"), "{e}");
    let e = load_err(&action(
        "        params:\n          amount: { max: 5000, approval_needed_over: 5000 }\n",
    ));
    assert!(e.message.contains("must be below `max`"), "{e}");
    let e = load_err(&action("        decision: sanitize\n"));
    assert!(e.message.contains("needs a `sanitize` list"), "{e}");
    let e = load_err(&action(
        "        decision: sanitize\n        sanitize: [email, passport]\n",
    ));
    assert_eq!(e.line, 15, "{e}");
    assert!(
        e.message.contains("unknown DLP detector \"passport\""),
        "{e}"
    );
    let e = load_err(&format!(
        "{L7_HEAD}      - name: act\n        method: post\n        path: /x\n"
    ));
    assert_eq!(e.line, 12, "{e}");
    let e = load_err(&format!(
        "{L7_HEAD}      - name: act\n        method: GET\n        path: /x/**/y\n"
    ));
    assert_eq!(e.line, 13, "{e}");
    // A tool host that is not inspected.
    let e = load_err(
        &L7_HEAD
            .replace("    host: api.example.com", "    host: other.example.com")
            .replace(
                "    actions:\n",
                "    actions:\n      - { name: a, method: GET, path: / }\n",
            ),
    );
    assert_eq!(e.line, 9, "{e}");
    assert!(
        e.message
            .contains("not covered by an egress entry with `inspect: true`"),
        "{e}"
    );
    // `inspect` on a CIDR.
    let e = load_err("agent: a\nversion: 1\negress:\n  - cidr: 10.0.0.0/8\n    inspect: true\n");
    assert!(
        e.message
            .contains("`inspect` applies to `fqdn` entries only"),
        "{e}"
    );
}

#[test]
fn raw_rego_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!("{L7_HEAD}      - {{ name: act, method: GET, path: / }}\n"),
    );
    write(
        dir.path(),
        "a.rego",
        "package aegis.ext.a\n\nimport rego.v1\n\ndeny contains \"x\" if {\n\tinput.path ==\n}\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let errs = L7Engine::build(&set).err().expect("a parse error").0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].file.ends_with("a.rego"), "{}", errs[0]);
    assert_eq!(errs[0].line, 7, "{}", errs[0]);
    assert!(
        errs[0].message.contains("expecting expression"),
        "{}",
        errs[0]
    );

    write(
        dir.path(),
        "a.rego",
        "package aegis.ext.b\n\nimport rego.v1\n\ndeny contains \"x\" if true\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let errs = L7Engine::build(&set).err().expect("wrong package").0;
    assert_eq!(errs[0].line, 1, "{}", errs[0]);
    assert!(errs[0].message.contains("aegis.ext.a"), "{}", errs[0]);

    // A hook module adds a deny reason.
    write(
        dir.path(),
        "a.rego",
        "package aegis.ext.a\n\nimport rego.v1\n\ndeny contains \"custom: no trailing slash\" if endswith(input.path, \"/\")\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let engine = L7Engine::build(&set).unwrap_or_else(|e| panic!("{e}"));
    let d = engine
        .decide(&request("a", "api.example.com", "GET", "/", b""))
        .unwrap();
    assert_eq!(d.verdict, L7Verdict::Deny);
    assert_eq!(d.reason, "custom: no trailing slash");
}

fn request<'a>(
    agent: &'a str,
    host: &'a str,
    method: &'a str,
    path: &'a str,
    body: &'a [u8],
) -> L7Request<'a> {
    L7Request {
        agent,
        tenant: "default",
        host,
        method,
        path,
        query: None,
        content_type: Some("application/json"),
        body,
        json: None,
        time: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_736_175_600),
    }
}

#[test]
fn decisions_carry_version_mode_and_cost() {
    let engine = example_engine();
    let body = br#"{"model": "gpt-4o", "max_tokens": 10}"#;
    let d = engine
        .decide(&request(
            "llm-agent",
            "api.openai.com",
            "POST",
            "/v1/chat/completions",
            body,
        ))
        .unwrap();
    assert_eq!(d.verdict, L7Verdict::Deny);
    assert_eq!(d.would, None);
    assert_eq!(d.policy_version, 3);
    assert_eq!(d.mode, Mode::Enforce);
    assert_eq!(d.tool.as_deref(), Some("openai-api"));
    assert_eq!(d.action.as_deref(), Some("chat_completions"));
    // Priced by tokens (`llm`): the enforcer reserves and settles; the decision has no price.
    assert_eq!(d.estimated_cost_usd, None);
    assert_eq!(d.reason, "constraint_violated: model not in [gpt-4o-mini]");

    let mut shadow = request(
        "support-agent",
        "slack.com",
        "POST",
        "/api/chat.postMessage",
        br##"{"channel": "#general"}"##,
    );
    shadow.tenant = "trial";
    let d = engine.decide(&shadow).unwrap();
    assert_eq!(
        (d.verdict, d.would, d.mode),
        (L7Verdict::Allow, Some(L7Verdict::Deny), Mode::Shadow)
    );
}

#[test]
fn a_fixed_price_is_the_decisions_cost_and_llm_pricing_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let priced = "agent: a\nversion: 1\negress:\n  - fqdn: api.test\n    inspect: true\ntools:\n  - name: t\n    host: api.test\n    budget: { daily_usd: 2, on_exceed: approval_needed }\n    rate_limit: { requests_per_second: 1 }\n    actions:\n      - name: x\n        method: GET\n        path: /x\n        price_usd: 0.25\n";
    write(dir.path(), "a.yaml", priced);
    let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let tool = &set.for_identity("a", "default").unwrap().tools[0];
    assert_eq!(
        tool.budget.map(|b| (b.daily_usd, b.on_exceed)),
        Some((Some(2.0), OnExceed::ApprovalNeeded))
    );
    let engine = L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap();
    let d = engine
        .decide(&request("a", "api.test", "GET", "/x", b""))
        .unwrap();
    assert_eq!(d.estimated_cost_usd, Some(0.25));
    // Both a fixed and a token price, or a token price without models, are refused.
    for bad in [
        "        price_usd: 0.25\n        llm: { max_output_tokens: 10, models: { m: { input_usd_per_mtok: 1, output_usd_per_mtok: 1 } } }\n",
        "        llm: { max_output_tokens: 10, models: {} }\n",
        "        llm: { max_output_tokens: 10, models: { m: { input_usd_per_mtok: -1, output_usd_per_mtok: 1 } } }\n",
    ] {
        let text = priced.replace("        price_usd: 0.25\n", bad);
        write(dir.path(), "a.yaml", &text);
        let err = PolicySet::load_dir(dir.path()).expect_err(bad).to_string();
        assert!(err.contains("a.yaml:") && err.contains("action x"), "{err}");
    }
}

/// `rate_limit` is per second or per minute, never both or neither; errors name the mapping's
/// own line.
#[test]
fn a_rate_limit_is_per_second_or_per_minute_and_errors_name_its_line() {
    use std::{num::NonZeroU32, time::Duration};
    let dir = tempfile::tempdir().unwrap();
    let policy = |rate: &str| {
        format!("agent: a\nversion: 1\nrate_limit: {rate}\negress:\n  - fqdn: api.test\n")
    };
    let n = |v: u32| NonZeroU32::new(v).unwrap();
    for (rate, interval, burst) in [
        (
            "{ requests_per_second: 4 }",
            Duration::from_millis(250),
            n(4),
        ),
        (
            "{ requests_per_second: 1, burst: 3 }",
            Duration::from_secs(1),
            n(3),
        ),
        ("{ requests_per_minute: 30 }", Duration::from_secs(2), n(30)),
        (
            "{ requests_per_minute: 1, burst: 5 }",
            Duration::from_secs(60),
            n(5),
        ),
    ] {
        write(dir.path(), "a.yaml", &policy(rate));
        let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{rate}: {e}"));
        let got = set.for_identity("a", "default").unwrap().rate_limit;
        assert_eq!(got, Some(RateLimit { interval, burst }), "{rate}");
    }
    for (rate, message) in [
        (
            "{ requests_per_second: 1, requests_per_minute: 60 }",
            "exactly one of",
        ),
        ("{ burst: 2 }", "exactly one of"),
        (
            "{ requests_per_hour: 2 }",
            "unknown field `requests_per_hour`",
        ),
        ("{ requests_per_minute: 0 }", "nonzero"),
        ("10", "invalid type"),
    ] {
        write(dir.path(), "a.yaml", &policy(rate));
        let err = PolicySet::load_dir(dir.path()).expect_err(rate).to_string();
        assert!(
            err.contains("a.yaml:3:") && err.contains(message),
            "{rate}: {err}"
        );
    }
}

#[test]
fn the_engine_is_shareable() {
    fn shareable<T: Send + Sync>() {}
    shareable::<L7Engine>();
}

/// The interpreter, the reference implementation of Rego, reaches every shipped case's expected
/// decision too (the RVM is checked by `shipped_policy_cases_pass`).
#[test]
fn shipped_policy_cases_pass_on_the_interpreter() {
    let engine = example_engine();
    let outcomes = run_cases_timed(&engine, &examples_dir(), 0, Backend::Interpreter)
        .unwrap_or_else(|e| panic!("{e}"));
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure.as_ref().map(|f| format!("{}: {f}", o.name)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// RVM and interpreter agree on whole decisions, beyond the shipped cases: path patterns at
/// their edges (exact, `**` at the root and below, `*` segments), numbers that are not plain
/// decimals, enums, regexes, hooks, hours, shadow mode. The interpreter's input holds every
/// parameter, the VM's only those the policy reads: the filter changes no decision.
#[test]
fn the_vm_and_the_interpreter_agree() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!(
            "{L7_HEAD}      - {{ name: exact, method: POST, path: /v1/pay }}\n      - name: num\n        method: POST\n        path: /v1/num\n        params:\n          n: {{ required: true, min: -5, max: 100, approval_needed_over: 50 }}\n          c: {{ enum: [a, 5, true] }}\n          r: {{ regex: \"x[0-9]+\" }}\n      - {{ name: seg, method: [GET, PUT], path: /v1/*/item/* }}\n      - {{ name: under, method: GET, path: /v1/** }}\n      - {{ name: root, method: \"*\", path: /** , decision: approval_needed }}\n"
        ),
    );
    write(
        dir.path(),
        "a.rego",
        "package aegis.ext.a\n\nimport rego.v1\n\ndeny contains \"hook: n is 13\" if 13 in input.numbers.n\n",
    );
    write(
        dir.path(),
        "b.yaml",
        "agent: b\nversion: 4\nmode: shadow\negress:\n  - fqdn: \"*.example.org\"\n    inspect: true\ntools:\n  - name: w\n    host: \"*.example.org\"\n    actions:\n      - name: post\n        method: POST\n        path: /post\n        hours: { days: [mon-fri], from: \"09:00\", to: \"17:00\", tz: Europe/Paris }\n        params:\n          channel: { enum: [\"#a\"] }\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let engine = L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let paths = [
        "/",
        "/v1",
        "/v1/",
        "/v1x",
        "/v1/pay",
        "/v1/pay/",
        "/v1/num",
        "/v1/a/item/b",
        "/v1/a/item/b/c",
        "/v1//item/b",
        "/x/y",
        "/v1/%61",
        "/post",
    ];
    let bodies: [&[u8]; 12] = [
        b"",
        // A required parameter present only through a field below it.
        br#"{"n": {"deep": 1}}"#,
        br#"{"n": 7}"#,
        br#"{"n": "7"}"#,
        br#"{"n": 70}"#,
        br#"{"n": "NaN"}"#,
        br#"{"n": 1e3}"#,
        br#"{"n": [1, "2", "1e2"], "c": 5, "r": "x12"}"#,
        br#"{"n": 13, "c": "5", "r": 12}"#,
        br##"{"channel": "#a", "n": -6}"##,
        br##"{"channel": "#b", "c": "z", "other": 1}"##,
        b"{not json",
    ];
    let mut compared = 0;
    let mut reasons = std::collections::BTreeSet::new();
    for agent in ["a", "b", "nobody"] {
        for host in ["api.example.com", "API.example.com:443", "x.example.org"] {
            for method in ["GET", "POST", "PUT"] {
                for path in paths {
                    for body in bodies {
                        for secs in [1_736_175_600u64, 1_736_200_000] {
                            let mut req = request(agent, host, method, path, body);
                            req.time = std::time::SystemTime::UNIX_EPOCH
                                + std::time::Duration::from_secs(secs);
                            let vm = engine
                                .decide_with(&req, Backend::Vm)
                                .map_err(|e| e.to_string());
                            // The reference: the interpreter, on an input holding every
                            // parameter (the VM's holds only those the policy reads).
                            let interp = engine
                                .decide_with_every_param(&req, Backend::Interpreter)
                                .map_err(|e| e.to_string());
                            assert_eq!(
                                vm,
                                interp,
                                "{agent} {host} {method} {path} {}",
                                String::from_utf8_lossy(body)
                            );
                            if let Ok(d) = vm {
                                reasons.insert(format!("{} {}", d.verdict, d.reason));
                            }
                            compared += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(compared, 3 * 3 * 3 * paths.len() * bodies.len() * 2);
    // The inputs reach every kind of outcome, not one error or one verdict over and over.
    for expected in [
        "allow allowed",
        "approval_needed approval_needed: n > 50",
        "approval_needed approval_required: root",
        "deny constraint_violated: n is not a number",
        "deny constraint_violated: n < min -5",
        "deny hook: n is 13",
        "deny constraint_violated: n is required; malformed_body",
        "deny constraint_violated: c not in [a, 5, true]; constraint_violated: r does not match",
        "deny no_policy",
        "deny host_not_inspected",
        "allow no_matching_action",
        "allow constraint_violated: outside business hours",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(expected)),
            "no decision like {expected:?} among {reasons:#?}"
        );
    }
}

/// A hook that never ends is stopped by the instruction limit and surfaces as an error (which
/// the enforcer turns into a deny), not as an allow.
#[test]
fn a_runaway_evaluation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!("{L7_HEAD}      - {{ name: act, method: GET, path: / }}\n"),
    );
    write(
        dir.path(),
        "a.rego",
        "package aegis.ext.a\n\nimport rego.v1\n\ndeny contains \"big\" if {\n\tcount([x | some i in numbers.range(1, 3000000); x := i * 2]) > 0\n}\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let engine = L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let err = engine
        .decide(&request("a", "api.example.com", "GET", "/", b""))
        .expect_err("the limit stops it");
    assert!(matches!(err, L7Error::Limit { .. }), "{err}");
}

/// The Rego route conditions (equality, `lib.path_under`, segment comparisons) pick the same
/// first action as the path patterns' anchored regexes would.
#[test]
fn path_patterns_route_as_their_regex() {
    let patterns = [
        "/",
        "/a",
        "/a/b",
        "/a/*",
        "/a/*/c",
        "/a/*/**",
        "/a/**",
        "/*",
        "/*/*/**",
        "/b/c.d/**",
        "/**",
    ];
    let paths = [
        "/", "/a", "/a/", "/a/b", "/a/b/", "/a/x", "/a//c", "/a/x/c", "/a/x/c/", "/a/x/y/z", "/ab",
        "/b", "/b/c.d", "/b/c.d/e", "/b/cxd/e", "/x/y", "/x//", "//", "/a/b/c/d",
    ];
    for start in 0..patterns.len() {
        // Each rotation puts another pattern first, so every pattern gets to win somewhere.
        let order: Vec<&str> = patterns[start..]
            .iter()
            .chain(&patterns[..start])
            .copied()
            .collect();
        let actions: String = order
            .iter()
            .enumerate()
            .map(|(i, p)| format!("      - {{ name: p{i}, method: GET, path: \"{p}\" }}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &format!("{L7_HEAD}{actions}"));
        let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let engine = L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap_or_else(|e| panic!("{e}"));
        let policy = set.for_identity("a", "default").unwrap();
        let regexes: Vec<regex::Regex> = policy.tools[0]
            .actions
            .iter()
            .map(|a| regex::Regex::new(&a.path.regex).unwrap())
            .collect();
        for path in paths {
            let expected = regexes
                .iter()
                .position(|r| r.is_match(path))
                .map(|i| format!("p{i}"));
            for backend in [Backend::Vm, Backend::Interpreter] {
                let d = engine
                    .decide_with(&request("a", "api.example.com", "GET", path, b""), backend)
                    .unwrap();
                assert_eq!(d.action, expected, "{path} with {order:?} ({backend:?})");
            }
        }
    }
}

/// The decision documents the compiler writes out as literals (actions no violation can apply
/// to) equal what `lib.decide` computes for them: over the shipped policies and extra ones in
/// both modes, with prices, every request routed to every action, on the interpreter.
#[test]
fn literal_decisions_equal_lib_decide() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    write(
        dir.path(),
        "x.yaml",
        "agent: x\nversion: 9\nmode: shadow\negress:\n  - fqdn: \"*.example.org\"\n    inspect: true\ntools:\n  - name: w\n    host: \"*.example.org\"\n    actions:\n      - { name: get, method: GET, path: /v1/** , price_usd: 0.25 }\n      - { name: del, method: DELETE, path: /v1/*/x, decision: deny }\n      - { name: put, method: [PUT, PATCH], path: /p, decision: approval_needed }\n      - { name: post, method: POST, path: /s, decision: sanitize, sanitize: [email] }\n",
    );
    write(
        dir.path(),
        "y.yaml",
        "agent: y\nversion: 2\negress:\n  - fqdn: api.example.com\n    inspect: true\ntools:\n  - name: t\n    host: api.example.com\n    actions:\n      - { name: a, method: \"*\", path: /a, price_usd: 1.5 }\n      - { name: b, method: GET, path: /** , decision: approval_needed }\n",
    );
    let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let engine = |literals: bool| {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(super::rego::LIB_FILE.into(), super::rego::LIB.into())
            .unwrap();
        for m in set.rego_modules() {
            engine
                .add_policy(m.source.display().to_string(), m.text.clone())
                .unwrap();
        }
        for policy in set.sorted() {
            let has_ext = set.rego_modules().iter().any(|m| {
                super::engine::declared_package(&m.text) == Some(super::rego::ext_package(policy))
            });
            let text = super::rego::compile_policy_with(policy, has_ext, literals);
            engine
                .add_policy(format!("{}.rego", policy.source.display()), text)
                .unwrap();
        }
        engine
    };
    let (mut literal, mut reference) = (engine(true), engine(false));
    let mut compared = 0;
    let mut literal_routes = 0;
    // Decisions of constrained actions with violations: the deny and approval branches.
    let mut violated = 0;
    for policy in set.sorted() {
        let rule = super::rego::decision_rule(policy);
        let compiled = super::rego::compile_policy(policy, false);
        for tool in &policy.tools {
            let host = match &tool.host {
                super::FqdnPattern::Exact(h) => h.clone(),
                super::FqdnPattern::Wildcard(suffix) => format!("a{suffix}"),
            };
            for action in &tool.actions {
                let methods: Vec<String> = match &action.methods {
                    super::l7::Methods::Any => vec!["GET".into(), "TRACE".into()],
                    super::l7::Methods::Only(list) => list.clone(),
                };
                let path = action
                    .path
                    .pattern
                    .replace("/**", "/deep/er")
                    .replace('*', "seg");
                literal_routes += usize::from(compiled.contains(&format!(
                    "\"action\": {}, \"sanitize\"",
                    serde_json::to_string(action.name.as_str()).unwrap()
                )));
                for method in &methods {
                    for body in [
                        &b""[..],
                        br##"{"amount": 12, "channel": "#support"}"##,
                        br##"{"amount": 50000, "currency": "xxx", "channel": "#ops"}"##,
                        br##"{"amount": "NaN", "ticket": {"status": "gone", "priority": "urgent"}}"##,
                        br#"{"model": "gpt-4o", "max_tokens": 0, "n": 3, "ref": "main"}"#,
                        b"{not json",
                    ] {
                        let mut req = request(policy.agent.as_str(), &host, method, &path, body);
                        if let Some(t) = &policy.tenant {
                            req.tenant = t.as_str();
                        }
                        let input = super::input::build(&req, &host, &path, None);
                        let eval = |e: &mut regorus::Engine| {
                            e.set_input(input.clone());
                            e.eval_rule(rule.clone()).unwrap()
                        };
                        let (got, want) = (eval(&mut literal), eval(&mut reference));
                        assert_eq!(got, want, "{rule} {method} {host}{path}");
                        assert_ne!(got, regorus::Value::Undefined, "{rule} {method} {path}");
                        if let Ok(reason) = got["reason"].as_string()
                            && ["constraint_violated", "approval_needed", "malformed_body"]
                                .iter()
                                .any(|p| reason.contains(p))
                        {
                            violated += 1;
                        }
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 40, "{compared}");
    assert!(
        violated > 10,
        "decisions with violations compared: {violated}"
    );
    assert!(
        literal_routes >= 8,
        "literal decisions compared: {literal_routes}"
    );
}

/// A policy with more actions than one RVM rule has registers for (255 per rule) loads: its
/// `route` and `decision` chains are split into parts tried in order, and the first matching
/// action still decides, on the VM as on the interpreter.
#[test]
fn a_policy_with_many_actions_loads_and_routes_in_order() {
    use std::fmt::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut actions = String::new();
    for i in 0..120 {
        if i % 3 == 0 {
            let _ = writeln!(
                actions,
                "      - {{ name: a{i}, method: POST, path: /p{i}/*/x, params: {{ n: {{ required: true, max: {i} }} }} }}"
            );
        } else {
            let _ = writeln!(
                actions,
                "      - {{ name: a{i}, method: POST, path: /p{i}/*/x }}"
            );
        }
    }
    // A catch-all last: everything not matched earlier lands here, nothing earlier does.
    actions.push_str("      - { name: rest, method: \"*\", path: /** , decision: deny }\n");
    write(dir.path(), "a.yaml", &format!("{L7_HEAD}{actions}"));
    let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let compiled = super::rego::compile_policy(set.sorted()[0], false);
    assert!(compiled.contains("decision_part_1"), "the chain was split");
    let engine = L7Engine::build_with_limit(&set, TEST_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    for (path, body, action, verdict) in [
        ("/p0/s/x", &br#"{"n": 0}"#[..], "a0", L7Verdict::Allow),
        ("/p1/s/x", b"", "a1", L7Verdict::Allow),
        ("/p99/s/x", br#"{"n": 100}"#, "a99", L7Verdict::Deny),
        ("/p117/s/x", br#"{"n": 5}"#, "a117", L7Verdict::Allow),
        ("/p119/s/x", b"", "a119", L7Verdict::Allow),
        ("/p119/s/y", b"", "rest", L7Verdict::Deny),
    ] {
        let req = request("a", "api.example.com", "POST", path, body);
        let vm = engine.decide_with(&req, Backend::Vm).unwrap();
        let interp = engine
            .decide_with_every_param(&req, Backend::Interpreter)
            .unwrap();
        assert_eq!(vm, interp, "{path}");
        assert_eq!(
            (vm.action.as_deref(), vm.verdict),
            (Some(action), verdict),
            "{path}: {vm:?}"
        );
    }
}
