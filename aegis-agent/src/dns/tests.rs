use std::{net::Ipv4Addr, str::FromStr as _};

use hickory_proto::rr::{
    Record, RecordType,
    rdata::{A, AAAA, CNAME},
};

use super::{upstream::matching, *};

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn response(records: Vec<Record>) -> Message {
    let mut m = Message::new();
    m.set_message_type(MessageType::Response);
    for r in records {
        m.add_answer(r);
    }
    m
}

#[test]
fn follows_the_cname_chain_in_any_order() {
    let reply = response(vec![
        Record::from_rdata(
            name("edge.cdn.test."),
            30,
            RData::A(A(Ipv4Addr::new(198, 18, 1, 30))),
        ),
        Record::from_rdata(
            name("mid.cdn.test."),
            60,
            RData::CNAME(CNAME(name("edge.cdn.test."))),
        ),
        Record::from_rdata(
            name("WWW.chain.test."),
            60,
            RData::CNAME(CNAME(name("mid.cdn.test."))),
        ),
        Record::from_rdata(
            name("edge.cdn.test."),
            30,
            RData::AAAA(AAAA("fd00:ae61:1::30".parse().unwrap())),
        ),
    ]);
    let got = chain_addresses(&reply, &name("www.chain.test."));
    assert_eq!(
        got,
        vec![
            (IpAddr::from([198, 18, 1, 30]), 30),
            ("fd00:ae61:1::30".parse().unwrap(), 30),
        ]
    );
}

#[test]
fn ignores_addresses_of_names_outside_the_chain() {
    let reply = response(vec![
        Record::from_rdata(
            name("api.stripe.com."),
            30,
            RData::A(A(Ipv4Addr::new(198, 18, 1, 10))),
        ),
        Record::from_rdata(
            name("evil.test."),
            30,
            RData::A(A(Ipv4Addr::new(198, 18, 1, 66))),
        ),
    ]);
    let got = chain_addresses(&reply, &name("api.stripe.com."));
    assert_eq!(got, vec![(IpAddr::from([198, 18, 1, 10]), 30)]);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    // Two bytes: only an ID. FORMERR carries it back.
    let reply = error_reply(0xabcd, None, ResponseCode::FormErr).unwrap();
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.id(), 0xabcd);
    assert_eq!(m.response_code(), ResponseCode::FormErr);
}

#[test]
fn deny_replies_echo_the_question() {
    let q = Query::query(name("evil.test."), RecordType::A);
    let reply = error_reply(7, Some(q.clone()), ResponseCode::NXDomain).unwrap();
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.queries(), &[q]);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert_eq!(m.message_type(), MessageType::Response);
}

#[test]
fn names_are_normalized() {
    assert_eq!(normalize(&name("API.Stripe.com.")), "api.stripe.com");
}

#[test]
fn replies_must_match_id_and_question() {
    let mut q = Message::new();
    q.set_id(1)
        .add_query(Query::query(name("a.test."), RecordType::A));
    let mut r = q.clone();
    r.set_message_type(MessageType::Response);
    let bytes = r.to_vec().unwrap();
    assert!(matching(bytes.clone(), 1, &q).is_some());
    assert!(
        matching(bytes.clone(), 2, &q).is_none(),
        "another ID must not match"
    );
    let mut other = Message::new();
    other
        .set_id(1)
        .add_query(Query::query(name("b.test."), RecordType::A));
    assert!(
        matching(bytes, 1, &other).is_none(),
        "another question must not match"
    );
    assert!(matching(vec![0, 1, 2], 1, &q).is_none());
}
