//! The harness itself, without the agent: a world builds, its pieces talk to each other, and
//! dropping it removes everything it created.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aegis_tests::world::{DnsRecord, HttpServer, World, describe};

#[test]
fn world_builds_and_tears_down() {
    let v4 = Ipv4Addr::new(198, 18, 1, 10);
    let v6: Ipv6Addr = "fd00:ae61:1::10".parse().unwrap();
    let world = World::builder()
        .pods(2)
        .record(DnsRecord::new("hello.test", Some(v4), Some(v6), 5))
        .http_server(HttpServer::new("hello", Some(v4), Some(v6), &[80]))
        .build();
    let id = world.id().to_string();
    let namespaces = [
        world.node_ns(),
        world.inet_ns(),
        world.pod_ns(1),
        world.pod_ns(2),
    ];
    for ns in &namespaces {
        assert!(Path::new("/run/netns").join(ns).exists(), "{ns} missing");
        assert!(ns.len() <= 15, "{ns} longer than 15 chars");
    }

    for k in 1..=2 {
        let out = world.pod_exec(
            k,
            None,
            &["curl", "-sS", "--max-time", "10", &format!("http://{v4}/")],
        );
        assert!(out.status.success(), "pod{k} curl v4: {}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from hello\n");

        let out = world.pod_exec(
            k,
            None,
            &[
                "curl",
                "-sS",
                "-6",
                "--max-time",
                "10",
                &format!("http://[{v6}]/"),
            ],
        );
        assert!(out.status.success(), "pod{k} curl v6: {}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from hello\n");

        let out = world.pod_exec(k, None, &["getent", "ahosts", "hello.test"]);
        assert!(
            out.status.success(),
            "pod{k} getent: {}\n{}",
            describe(&out),
            world.dnsmasq_log()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("198.18.1.10") && text.contains("fd00:ae61:1::10"),
            "getent: {text}"
        );

        let out = world.pod_exec(
            k,
            None,
            &["curl", "-sS", "--max-time", "10", "http://hello.test/"],
        );
        assert!(
            out.status.success(),
            "pod{k} curl by name: {}",
            describe(&out)
        );
    }
    // The node reaches the servers and resolves through dnsmasq too.
    let out = world.node_exec(&["curl", "-sS", "--max-time", "10", &format!("http://{v4}/")]);
    assert!(out.status.success(), "node curl: {}", describe(&out));
    assert!(
        world.dnsmasq_log().contains("hello.test"),
        "dnsmasq logged no query"
    );

    drop(world);
    for ns in &namespaces {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "{ns} left behind"
        );
        assert!(
            !Path::new("/etc/netns").join(ns).exists(),
            "/etc/netns/{ns} left behind"
        );
    }
    assert!(
        !Path::new(&format!("/run/aegis-tests/{id}.pid")).exists(),
        "owner file left behind"
    );
}

#[test]
fn two_worlds_do_not_clash() {
    let a = World::builder().pods(1).build();
    let b = World::builder().pods(1).build();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.node_ns(), b.node_ns());
}

#[test]
fn stale_worlds_are_cleaned_up() {
    // A child that builds a world and aborts, as a crashed test would.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aegis-leak-world"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .lines()
        .find_map(|l| l.split_once("LEAKED ").map(|(_, id)| id.trim()))
        .unwrap_or_else(|| panic!("child did not leak a world: {}", describe(&out)))
        .to_string();
    let node = format!("/run/netns/{id}n");
    assert!(
        Path::new(&node).exists(),
        "the crashed child's namespace {node} should still exist"
    );
    World::cleanup_stale();
    for ns in [format!("{id}n"), format!("{id}i"), format!("{id}p1")] {
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "{ns} not cleaned up"
        );
        assert!(
            !Path::new("/etc/netns").join(&ns).exists(),
            "/etc/netns/{ns} not cleaned up"
        );
    }
    assert!(!Path::new(&format!("/run/aegis-tests/{id}.pid")).exists());
    // The crashed world's temp dir (logs) is not the harness's to judge; this test made it.
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{id}-"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
