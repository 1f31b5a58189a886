use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use super::*;
use crate::audit::chain::AuditKey;

struct Fixture {
    _dir: tempfile::TempDir,
    approvals: Approvals,
    audit_path: std::path::PathBuf,
}

fn fixture(token_ttl: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let audit = AuditLog::open(
        &audit_path,
        AuditKey::generate(),
        crate::audit::DEFAULT_QUEUE,
    )
    .unwrap();
    let keys = load_key(&dir.path().join("approval.key")).unwrap();
    let settings = Settings {
        ttl: Duration::from_secs(3600),
        token_ttl,
        hold: Duration::ZERO,
    };
    Fixture {
        approvals: Approvals::new(settings, keys, audit, None, None).unwrap(),
        audit_path,
        _dir: dir,
    }
}

fn file(approvals: &Approvals, who: &Identity, hash: &str) -> Approval {
    approvals
        .request(NewApproval {
            identity: who,
            tool: Some("stripe-payments".into()),
            action: Some("create_payment".into()),
            method: "POST",
            url: "https://api.stripe.com/v1/payment_intents".into(),
            params: serde_json::json!({"amount": 9000}),
            rule: "approval_needed: amount > 5000".into(),
            request_hash: hash.to_owned(),
        })
        .unwrap()
}

#[test]
fn request_hash_canonicalizes_json_and_binds_every_part() {
    let h = |m: &str, pq: &str, ct: Option<&str>, body: &[u8]| {
        request_hash(m, "api.stripe.com", pq, ct, body)
    };
    let json = Some("application/json");
    let base = h(
        "POST",
        "/v1/p",
        json,
        br#"{"amount": 9000, "currency": "usd"}"#,
    );
    assert_eq!(base.len(), 64);
    // Same document, other key order and whitespace: same request.
    assert_eq!(
        base,
        h(
            "POST",
            "/v1/p",
            json,
            br#"{"currency":"usd","amount":9000}"#
        )
    );
    // Any other part: another request.
    for other in [
        h(
            "POST",
            "/v1/p",
            json,
            br#"{"amount": 9001, "currency": "usd"}"#,
        ),
        h(
            "PUT",
            "/v1/p",
            json,
            br#"{"amount": 9000, "currency": "usd"}"#,
        ),
        h(
            "POST",
            "/v1/p?x=1",
            json,
            br#"{"amount": 9000, "currency": "usd"}"#,
        ),
        request_hash(
            "POST",
            "api.other.com",
            "/v1/p",
            json,
            br#"{"amount": 9000, "currency": "usd"}"#,
        ),
    ] {
        assert_ne!(base, other);
    }
    // Non-JSON bodies count byte for byte.
    let form = Some("application/x-www-form-urlencoded");
    assert_ne!(
        h("POST", "/", form, b"a=1&b=2"),
        h("POST", "/", form, b"b=2&a=1")
    );
}

#[test]
fn approval_is_filed_once_and_its_token_passes_one_retry() {
    let f = fixture(Duration::from_secs(60));
    let me = Identity::new("finance-agent", Some("acme")).unwrap();
    let first = file(&f.approvals, &me, "h1");
    // A retry before the decision finds the same approval.
    assert_eq!(file(&f.approvals, &me, "h1").id, first.id);
    assert_eq!(f.approvals.pending(), 1);
    assert_eq!(f.approvals.redeem(&me, "h1", None), Ok(None));

    let (approved, token) = f.approvals.decide(&first.id, true, "uid:0", None).unwrap();
    let token = token.expect("approving mints a token");
    assert!(matches!(approved.state, State::Approved { .. }));
    assert_eq!(f.approvals.pending(), 0);
    // Listing never hands the token out.
    assert!(
        !serde_json::to_string(&f.approvals.list())
            .unwrap()
            .contains(&token)
    );
    // Deciding twice is refused.
    assert!(matches!(
        f.approvals.decide(&first.id, false, "uid:0", None),
        Err(DecideError::NotPending {
            state: "approved",
            ..
        })
    ));

    // Another request or another identity does not match the approved one.
    let other = Identity::new("support-agent", Some("acme")).unwrap();
    assert_eq!(f.approvals.redeem(&me, "h2", None), Ok(None));
    assert_eq!(f.approvals.redeem(&other, "h1", None), Ok(None));
    // The same token presented for another body or by another identity is refused.
    assert_eq!(
        f.approvals.redeem(&me, "h2", Some(&token)),
        Err(OverrideError::RequestMismatch)
    );
    assert!(matches!(
        f.approvals.redeem(&other, "h1", Some(&token)),
        Err(OverrideError::WrongIdentity { .. })
    ));
    // The exact retry passes once.
    let redeemed = f.approvals.redeem(&me, "h1", None).unwrap().unwrap();
    assert_eq!(
        (redeemed.approval_id.as_str(), redeemed.approved_by.as_str()),
        (first.id.as_str(), "uid:0")
    );
    assert_eq!(f.approvals.redeem(&me, "h1", None), Ok(None));
    assert_eq!(
        f.approvals.redeem(&me, "h1", Some(&token)),
        Err(OverrideError::Used(first.id.clone()))
    );
    // A tampered token is invalid.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    assert!(matches!(
        f.approvals.redeem(&me, "h1", Some(&parts.join("."))),
        Err(OverrideError::Invalid(_))
    ));
    // A new request of the same kind files a new approval.
    assert_ne!(file(&f.approvals, &me, "h1").id, first.id);

    drop(f.approvals);
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(&f.audit_path).unwrap();
    for kind in ["approval_requested", "approval_decided", "approval_used"] {
        assert!(
            log.contains(&format!("\"kind\":\"{kind}\"")),
            "{kind} missing:\n{log}"
        );
    }
}

#[test]
fn denied_and_expired_approvals_let_nothing_through() {
    let f = fixture(Duration::from_secs(1));
    let me = Identity::new("finance-agent", None).unwrap();
    let denied = file(&f.approvals, &me, "d");
    let (after, token) = f
        .approvals
        .decide(&denied.id, false, "api:alice", Some("too much"))
        .unwrap();
    assert!(token.is_none());
    assert!(matches!(after.state, State::Denied { ref reason, .. } if reason == "too much"));
    assert_eq!(f.approvals.redeem(&me, "d", None), Ok(None));

    let approved = file(&f.approvals, &me, "e");
    let (_, token) = f
        .approvals
        .decide(&approved.id, true, "api:alice", None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        f.approvals.redeem(&me, "e", None),
        Ok(None),
        "expired token unused"
    );
    assert!(matches!(
        f.approvals.redeem(&me, "e", Some(&token.unwrap())),
        Err(OverrideError::Invalid(_))
    ));
    assert!(matches!(
        f.approvals.decide("nope", true, "x", None),
        Err(DecideError::NotFound(_))
    ));
}

#[test]
fn webhook_payloads_carry_the_approval() {
    let f = fixture(Duration::from_secs(60));
    let me = Identity::new("finance-agent", None).unwrap();
    let a = file(&f.approvals, &me, "w");
    let slack = webhook::payload(webhook::Format::Slack, &a).to_string();
    let teams = webhook::payload(webhook::Format::Teams, &a).to_string();
    for p in [&slack, &teams] {
        for needle in [
            a.id.as_str(),
            "finance-agent@default",
            "create_payment",
            "amount > 5000",
        ] {
            assert!(p.contains(needle), "{needle} missing in {p}");
        }
    }
    assert!(slack.contains("\"blocks\""));
    assert!(teams.contains("MessageCard"));
}

#[test]
fn approvals_and_spent_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("approval.key");
    let db = dir.path().join("approvals.redb");
    let open = || {
        let audit = AuditLog::open(
            &dir.path().join("audit.jsonl"),
            AuditKey::generate(),
            crate::audit::DEFAULT_QUEUE,
        )
        .unwrap();
        let settings = Settings {
            ttl: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(60),
            hold: Duration::ZERO,
        };
        let store = store::ApprovalStore::open(&db).unwrap();
        Approvals::new(
            settings,
            load_key(&key_path).unwrap(),
            audit,
            None,
            Some(store),
        )
        .unwrap()
    };
    let me = Identity::new("finance-agent", None).unwrap();
    let approvals = open();
    let pending = file(&approvals, &me, "p");
    let approved = file(&approvals, &me, "a");
    let spent = file(&approvals, &me, "s");
    approvals.decide(&approved.id, true, "uid:0", None).unwrap();
    let (_, token) = approvals.decide(&spent.id, true, "uid:0", None).unwrap();
    assert!(approvals.redeem(&me, "s", None).unwrap().is_some());
    drop(approvals);

    let approvals = open();
    assert_eq!(approvals.pending(), 1);
    assert_eq!(
        file(&approvals, &me, "p").id,
        pending.id,
        "still pending, same id"
    );
    let redeemed = approvals
        .redeem(&me, "a", None)
        .unwrap()
        .expect("approved before");
    assert_eq!(redeemed.approval_id, approved.id);
    assert_eq!(
        approvals.redeem(&me, "s", Some(&token.unwrap())),
        Err(OverrideError::Used(spent.id.clone())),
        "a token spent before the restart stays spent"
    );
    assert!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o077 == 0);
}
