//! The deployment files are what they claim to be: every document of every YAML file in
//! `deploy/daemonset/` and `deploy/examples/` deserialises into its `k8s-openapi` type with no
//! field the type does not know; the DaemonSet runs `aegis-agent run` with flags that exist and
//! with exactly the capabilities it declares (the agent started with only those enforces); the
//! RBAC grants reading pods and nothing more; the policies ConfigMap is the shipped policies and
//! loads the way the kubelet mounts it; the Grafana dashboard's queries parse and name only
//! metrics (and labels) the agent exports.
//!
//! Only `daemonset_capabilities_are_enough_to_enforce` needs root (it starts a world); the others
//! read files and run the agent binary's CLI.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use aegis_tests::world::{DnsRecord, HttpServer, World, agent_bin, describe, workspace_root};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use promql_parser::parser::{Expr, LabelModifier};
use serde::{Deserialize as _, de::DeserializeOwned};

/// One document of a manifest file, typed by its `kind`.
#[derive(Debug)]
enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
    DaemonSet(Box<DaemonSet>),
    Service(Box<Service>),
    Pod(Box<Pod>),
}

impl Object {
    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
        }
    }

    /// Whether objects of this kind live in a namespace.
    fn namespaced(&self) -> bool {
        !matches!(
            self,
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_)
        )
    }
}

/// Deserialises `value` as `T`, failing on any field `T` ignores (k8s-openapi's types skip
/// unknown fields silently; serde_ignored reports them).
fn strict<T: DeserializeOwned>(value: serde_norway::Value, at: &str) -> Result<T, String> {
    let mut unknown = Vec::new();
    let typed: T = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
        .map_err(|e| format!("{at}: {e}"))?;
    if !unknown.is_empty() {
        return Err(format!("{at}: unknown fields {unknown:?}"));
    }
    Ok(typed)
}

fn try_parse_documents(path: &Path) -> Result<Vec<Object>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut objects = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let at = format!("{} document {}", path.display(), i + 1);
        let value = serde_norway::Value::deserialize(doc).map_err(|e| format!("{at}: {e}"))?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| format!("{at}: no kind"))?
            .to_owned();
        let at = format!("{at} ({kind})");
        objects.push(match kind.as_str() {
            "Namespace" => Object::Namespace(strict(value, &at)?),
            "ServiceAccount" => Object::ServiceAccount(strict(value, &at)?),
            "ClusterRole" => Object::ClusterRole(strict(value, &at)?),
            "ClusterRoleBinding" => Object::ClusterRoleBinding(strict(value, &at)?),
            "ConfigMap" => Object::ConfigMap(strict(value, &at)?),
            "DaemonSet" => Object::DaemonSet(strict(value, &at)?),
            "Service" => Object::Service(strict(value, &at)?),
            "Pod" => Object::Pod(strict(value, &at)?),
            other => return Err(format!("{at}: unknown kind {other} (add it to this test)")),
        });
    }
    if objects.is_empty() {
        return Err(format!("{}: no documents", path.display()));
    }
    Ok(objects)
}

fn parse_documents(path: &Path) -> Vec<Object> {
    try_parse_documents(path).unwrap_or_else(|e| panic!("{e}"))
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = workspace_root().join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn daemonset_objects() -> Vec<Object> {
    yaml_files("deploy/daemonset")
        .iter()
        .flat_map(|p| parse_documents(p))
        .collect()
}

fn the_daemonset() -> DaemonSet {
    let mut found = daemonset_objects().into_iter().filter_map(|o| match o {
        Object::DaemonSet(d) => Some(*d),
        _ => None,
    });
    let ds = found.next().expect("a DaemonSet in deploy/daemonset/");
    assert!(found.next().is_none(), "one DaemonSet");
    ds
}

fn agent_container(ds: &DaemonSet) -> k8s_openapi::api::core::v1::Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1, "one container");
    spec.containers[0].clone()
}

#[test]
fn every_manifest_is_a_known_kubernetes_object_without_unknown_fields() {
    let mut kinds = BTreeSet::new();
    for dir in ["deploy/daemonset", "deploy/examples"] {
        let files = yaml_files(dir);
        assert!(!files.is_empty(), "{dir}: no YAML files");
        for file in files {
            for object in parse_documents(&file) {
                let kind = format!("{object:?}");
                let kind = kind.split('(').next().unwrap().to_owned();
                let meta = object.metadata();
                assert!(
                    meta.name.is_some(),
                    "{}: a {kind} without a name",
                    file.display()
                );
                assert_eq!(
                    meta.namespace.is_some(),
                    object.namespaced(),
                    "{}: {kind} {:?} namespace",
                    file.display(),
                    meta.name
                );
                kinds.insert(kind);
            }
        }
    }
    for want in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "Pod",
    ] {
        assert!(kinds.contains(want), "no {want} in deploy/: {kinds:?}");
    }
}

/// The checker itself: a misspelt field, a field at the wrong level and an unknown kind fail.
#[test]
fn the_manifest_checker_rejects_unknown_fields_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let ds = fs::read_to_string(workspace_root().join("deploy/daemonset/daemonset.yaml")).unwrap();
    for (name, text, why) in [
        (
            "typo",
            ds.replace("readinessProbe:", "readynessProbe:"),
            "containers.?.0.readynessProbe\"]",
        ),
        (
            "level",
            ds.replace(
                "      hostNetwork: true",
                "      hostNetwork: true\n      hostNetworking: true",
            ),
            "spec.?.hostNetworking\"]",
        ),
        (
            "kind",
            "apiVersion: v1\nkind: Secrett\nmetadata:\n  name: x\n".to_owned(),
            "unknown kind Secrett",
        ),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        fs::write(&path, text).unwrap();
        let err = try_parse_documents(&path).expect_err(name);
        assert!(err.contains(why), "{name}: {err}");
        assert!(name == "kind" || err.contains("unknown fields"), "{err}");
    }
}

/// `run --help`'s long flags.
fn run_flags() -> BTreeSet<String> {
    let out = Command::new(agent_bin())
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", agent_bin().display()));
    assert!(out.status.success(), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let flags: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .collect();
    assert!(flags.contains("--policies"), "{help}");
    flags
}

#[test]
fn daemonset_args_are_flags_of_aegis_agent_run() {
    let ds = the_daemonset();
    let c = agent_container(&ds);
    let args = c.args.clone().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    assert!(c.command.is_none(), "the image's entrypoint is aegis-agent");
    let flags = run_flags();
    let env: BTreeSet<String> = c.env.iter().flatten().map(|e| e.name.clone()).collect();
    for arg in &args[1..] {
        assert!(arg.starts_with("--"), "{arg}: only --flag=value arguments");
        let name = arg.split('=').next().unwrap();
        assert!(
            flags.contains(name),
            "{name} is not a flag of `aegis-agent run`: {flags:?}"
        );
        // $(VAR) is expanded by the kubelet from the container's environment only.
        for var in arg.split("$(").skip(1) {
            let var = var.split(')').next().unwrap();
            assert!(
                env.contains(var),
                "{arg}: {var} is not in the container's env"
            );
        }
    }
    let metrics = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-address="))
        .expect("--metrics-address");
    let port: u16 = metrics.rsplit(':').next().unwrap().parse().unwrap();
    // With hostNetwork a declared container port becomes a hostPort, which would stop the
    // scheduler from placing the upgrade's surge pod next to the old one: none is declared.
    assert!(
        c.ports.as_ref().is_none_or(Vec::is_empty),
        "no container ports on a hostNetwork DaemonSet that surges"
    );
    let liveness = c
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("an HTTP liveness probe");
    assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    assert_eq!(
        liveness.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port)),
        "liveness on the metrics port"
    );
    // Readiness is this container's own --ready-file (both pods of an upgrade share the ports).
    let ready_file = args
        .iter()
        .find_map(|a| a.strip_prefix("--ready-file="))
        .expect("--ready-file");
    let exec = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.clone())
        .and_then(|e| e.command)
        .expect("an exec readiness probe");
    assert_eq!(exec, ["test", "-f", ready_file]);
    let surge = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_surge.clone());
    assert_eq!(
        surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
        "upgrades hand over to a surge pod"
    );
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(
        node_name.as_deref(),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    let strategy = ds.spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
}

#[test]
fn rbac_grants_reading_pods_and_nothing_more() {
    let objects = daemonset_objects();
    let roles: Vec<&ClusterRole> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ClusterRole(r) => Some(&**r),
            _ => None,
        })
        .collect();
    assert_eq!(roles.len(), 1, "one ClusterRole, no Role");
    let role = roles[0];
    assert!(role.aggregation_rule.is_none());
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1, "{rules:?}");
    let rule = &rules[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
    let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
    assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));
    assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());

    let ds = the_daemonset();
    let sa = ds
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let namespace = ds.metadata.namespace.clone().unwrap();
    let bindings: Vec<&ClusterRoleBinding> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ClusterRoleBinding(b) => Some(&**b),
            _ => None,
        })
        .collect();
    assert_eq!(bindings.len(), 1);
    let b = bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace.as_deref(), Some(namespace.as_str()));
    assert!(
        objects.iter().any(|o| matches!(o, Object::ServiceAccount(s)
            if s.metadata.name.as_deref() == Some(sa.as_str())
                && s.metadata.namespace.as_deref() == Some(namespace.as_str()))),
        "the ServiceAccount {sa} is shipped"
    );
}

#[test]
fn policies_configmap_is_the_shipped_policies_and_loads_as_mounted() {
    let objects = daemonset_objects();
    let cm = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("aegis-policies") => Some(c),
            _ => None,
        })
        .expect("ConfigMap aegis-policies");
    let data = cm.data.clone().unwrap_or_default();
    let policies = workspace_root().join("policies");
    let mut shipped = BTreeMap::new();
    for entry in fs::read_dir(&policies).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str());
        if path.is_file() && matches!(ext, Some("yaml" | "yml" | "rego")) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            shipped.insert(name, fs::read_to_string(&path).unwrap());
        }
    }
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        shipped.keys().collect::<Vec<_>>(),
        "regenerate deploy/daemonset/configmap-policies.yaml (command in its header)"
    );
    for (name, text) in &shipped {
        assert_eq!(
            &data[name], text,
            "{name} differs from policies/{name}: regenerate"
        );
    }
    // The kubelet's layout: files are symlinks into a `..data` directory swapped atomically.
    let dir = tempfile::tempdir().unwrap();
    let versioned = dir.path().join("..2026_11_22_00_00_00.000000001");
    fs::create_dir(&versioned).unwrap();
    for (name, text) in &data {
        fs::write(versioned.join(name), text).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(name), dir.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink(versioned.file_name().unwrap(), dir.path().join("..data")).unwrap();
    let out = Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let yaml = data.keys().filter(|n| !n.ends_with(".rego")).count();
    assert!(
        text.contains(&format!("{yaml} policies OK")),
        "every policy loaded through the symlinks: {text}"
    );
}

/// Families `aegis-agent metrics` lists: name → (type, labels).
fn exported_families() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let out = Command::new(agent_bin()).arg("metrics").output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 4, "{line}");
            let labels = f[2]
                .split(',')
                .filter(|l| *l != "-")
                .map(str::to_owned)
                .collect();
            (f[0].to_owned(), (f[1].to_owned(), labels))
        })
        .collect()
}

/// Sample name → labels it carries, from the families.
fn exported_samples() -> BTreeMap<String, BTreeSet<String>> {
    let mut samples = BTreeMap::new();
    for (name, (kind, labels)) in exported_families() {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            _ => &[""],
        };
        for s in suffixes {
            let mut labels = labels.clone();
            if *s == "_bucket" {
                labels.insert("le".into());
            }
            samples.insert(format!("{name}{s}"), labels);
        }
    }
    samples
}

/// Every (metric name, labels it uses) in a PromQL expression.
fn selectors(expr: &Expr, out: &mut Vec<(String, BTreeSet<String>)>) {
    match expr {
        Expr::VectorSelector(vs) => out.push((
            vs.name.clone().unwrap_or_default(),
            vs.matchers
                .matchers
                .iter()
                .map(|m| m.name.clone())
                .filter(|n| n != "__name__")
                .collect(),
        )),
        Expr::MatrixSelector(ms) => selectors(&Expr::VectorSelector(ms.vs.clone()), out),
        Expr::Aggregate(a) => {
            let mut inner = Vec::new();
            selectors(&a.expr, &mut inner);
            // Grouping labels must exist on what is aggregated.
            if let Some(LabelModifier::Include(l) | LabelModifier::Exclude(l)) = &a.modifier {
                for (_, labels) in &mut inner {
                    labels.extend(l.labels.iter().cloned());
                }
            }
            out.extend(inner);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selectors(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Grafana's variables replaced by values PromQL accepts.
fn without_grafana_variables(expr: &str) -> String {
    let mut s = expr.to_owned();
    for v in ["$__rate_interval", "$__interval", "$__range"] {
        s = s.replace(v, "5m");
    }
    replace_template_variables(&s)
}

/// `$name` and `${name}` → `.+` (they only appear inside regex matchers).
fn replace_template_variables(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push_str(".+");
    }
    out
}

fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            for v in map.values() {
                dashboard_queries(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_name_only_exported_metrics_and_labels() {
    let path = workspace_root().join("deploy/grafana/aegis-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let samples = exported_samples();
    let mut exprs = Vec::new();
    dashboard_queries(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    // Template variables query label values of a metric.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("template query {q}"));
            let (metric, label) = inner.split_once(',').unwrap();
            exprs.push(format!("count by ({}) ({})", label.trim(), metric.trim()));
        }
    }
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let parsed = promql_parser::parser::parse(&without_grafana_variables(expr))
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut found = Vec::new();
        selectors(&parsed, &mut found);
        assert!(!found.is_empty(), "{expr}: no metric");
        for (name, labels) in found {
            let known = samples
                .get(&name)
                .unwrap_or_else(|| panic!("{expr}: {name} is not exported: {:?}", samples.keys()));
            let unknown: Vec<&String> = labels.difference(known).collect();
            assert!(
                unknown.is_empty(),
                "{expr}: {name} has no labels {unknown:?}"
            );
            used.insert(name);
        }
    }
    // The FinOps and SOC views: spend, prevented spend, blocked events, egress violations,
    // DNS denials, approvals, enforcer latency.
    for want in [
        "aegis_l7_spend_usd_total",
        "aegis_l7_prevented_spend_usd_total",
        "aegis_l7_decisions_total",
        "aegis_kernel_denies_total",
        "aegis_dns_queries_total",
        "aegis_approvals_pending",
        "aegis_l7_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(want), "the dashboard does not show {want}");
    }
}

#[test]
fn metrics_doc_lists_every_exported_family() {
    let doc = fs::read_to_string(workspace_root().join("docs/metrics.md")).unwrap();
    for (name, (kind, labels)) in exported_families() {
        let shown = match kind.as_str() {
            "counter" => format!("{name}_total"),
            _ => name.clone(),
        };
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{shown}` ")))
            .unwrap_or_else(|| panic!("docs/metrics.md has no row for `{shown}`"));
        assert!(row.contains(&format!("| {kind} |")), "{row}: type {kind}");
        for label in &labels {
            assert!(row.contains(&format!("`{label}`")), "{row}: label {label}");
        }
    }
}

/// The DaemonSet's capability set is enough: the agent started with exactly those (every
/// other dropped from its bounding set) loads and attaches its programs, denies in the kernel,
/// answers DNS and enforces L7 over TLS.
#[test]
fn daemonset_capabilities_are_enough_to_enforce() {
    const STRIPE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
    const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
    let c = agent_container(&the_daemonset());
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let add: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(!add.contains(&"SYS_ADMIN"), "{add:?}");
    let mut w = World::builder()
        .pods(1)
        .record(DnsRecord::new("api.stripe.com", Some(STRIPE), None, 60))
        .http_server(HttpServer::new("api.stripe.com", Some(STRIPE), None, &[443]).with_tls())
        .http_server(HttpServer::new("evil", Some(EVIL), None, &[80]))
        .policy(
            "finance.yaml",
            "agent: finance-agent\nversion: 1\negress:\n  - fqdn: api.stripe.com\n    ports: [443]\n    inspect: true\ntools:\n  - name: stripe\n    host: api.stripe.com\n    actions:\n      - name: read\n        method: GET\n        path: /**\n",
        )
        .agent_capabilities(&add)
        .build();
    w.start_agent();
    let agent = Some(("finance-agent", None));
    let denied = w.pod_exec(
        1,
        agent,
        &["curl", "-sS", "-m", "5", &format!("http://{EVIL}/")],
    );
    assert_eq!(denied.status.code(), Some(7), "{}", describe(&denied));
    let ca = w.node_ca().to_string_lossy().into_owned();
    let allowed = w.pod_exec(
        1,
        agent,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &ca,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://api.stripe.com/v1/balance",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "200",
        "{}\n{}",
        describe(&allowed),
        w.diagnostics()
    );
    // The L7 decision is recorded (a plain allow is in the audit log; its log line is debug).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !w
        .audit_records()
        .iter()
        .any(|r| r["kind"] == "l7_decision" && r["decision"] == "allow")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no L7 decision recorded\n{}",
            w.diagnostics()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    w.wait_for_event("the kernel deny", std::time::Duration::from_secs(5), |e| {
        e["event"] == "egress_denied" && e["dst"] == EVIL.to_string()
    });
}
