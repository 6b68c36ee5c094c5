//! Micro-benchmarks of the hot paths (criterion): HTTP parse + route, client frame decode +
//! JSON parse, broadcast encode, fan-out to 1000 members (queueing only), timer wheel.
//! Run: `cargo bench --bench core`. Figures are recorded in BENCHMARKS.md.

use std::hint::black_box;
use std::net::IpAddr;

use chatloop::api::{self, ApiCtx};
use chatloop::http;
use chatloop::hub::{Action, ConnId, Hub, HubConfig};
use chatloop::ids::{MsgId, RoomId, UserId};
use chatloop::outbox::{Chunk, Outbox, Queue};
use chatloop::protocol::{self, FrameBuf, Who};
use chatloop::ratelimit::CreateLimiter;
use chatloop::time::{Micros, Now, UnixMicros};
use chatloop::timer::Wheel;
use chatloop::ws::{Step, WsState};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

fn http_parse_and_route(c: &mut Criterion) {
    let mut hub = Hub::new(HubConfig::default());
    let now = Now::fake(1_000_000);
    let (sid, _) = hub.create_session("alice", now).unwrap();
    let room = hub.create_room(sid, now).unwrap();
    let req = format!(
        "GET /rooms/{room} HTTP/1.1\r\nHost: localhost:8000\r\nUser-Agent: bench\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nAuthorization: Bearer {sid}\r\n\r\n"
    );
    let mut limiter = CreateLimiter::new(0, 1);
    let mut out = Vec::with_capacity(512);
    c.bench_function("http_parse_route_respond GET /rooms/{id}", |b| {
        b.iter(|| {
            let (r, n) = http::parse(black_box(req.as_bytes()), 16384, 65536)
                .unwrap()
                .unwrap();
            let mut ctx = ApiCtx {
                now,
                room_list: true,
                echo_path: None,
                peer: IpAddr::from([127, 0, 0, 1]),
                limiter: &mut limiter,
                cluster: None,
            };
            let reply = api::handle(&r, &req.as_bytes()[n..], &mut hub, &mut ctx);
            if let api::Reply::Response(resp) = reply {
                out.clear();
                http::write_response(
                    &mut out,
                    &resp,
                    b"Wed, 25 Nov 2026 18:00:00 GMT",
                    true,
                    false,
                );
            }
            black_box(&out);
        })
    });
}

fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn client_frame_decode_and_parse(c: &mut Criterion) {
    let frame = masked_frame(br#"{"type":"chat","message":"Hello, how is everyone doing today?"}"#);
    c.bench_function("ws_decode_unmask_json_parse chat frame", |b| {
        let mut st = WsState::default();
        let mut inflater = chatloop::deflate::Inflater::default();
        b.iter_batched_ref(
            || frame.clone(),
            |buf| match st.decode(buf, 65536, &mut inflater) {
                Ok(Step::Event(chatloop::ws::WsEvent::Text(t), _)) => {
                    black_box(protocol::parse_client(&t).is_ok());
                }
                _ => unreachable!(),
            },
            BatchSize::SmallInput,
        )
    });
}

fn broadcast_encode(c: &mut Criterion) {
    let mut fb = FrameBuf::default();
    let who = Who {
        user: "alice",
        user_id: UserId(0x3f9a1c2b),
    };
    c.bench_function("broadcast_encode chat event + frame", |b| {
        b.iter(|| {
            protocol::write_event(
                fb.start(),
                protocol::EventKind::Chat,
                MsgId(0x0199_0000_0000_7000_8000_0000_0000_0001),
                who,
                black_box("Hello, how is everyone doing today?"),
                UnixMicros(1_755_611_100_123_456),
                RoomId(0xa1b2c3d4e5),
            );
            black_box(fb.finish_text())
        })
    });
}

fn fanout_1000(c: &mut Criterion) {
    let cfg = HubConfig {
        chat_rate: 1_000_000_000,
        chat_burst: 1_000_000_000,
        ..HubConfig::default()
    };
    let mut hub = Hub::new(cfg);
    let mut t = 1_000_000;
    let (sid, _) = hub.create_session("alice", Now::fake(t)).unwrap();
    let room = hub.create_room(sid, Now::fake(t)).unwrap();
    for i in 0..1000 {
        hub.connect(ConnId(i), sid, room, None, &[], Now::fake(t))
            .unwrap();
    }
    hub.drain_actions().for_each(drop);
    let mut queues: Vec<Queue> = (0..1000).map(|_| Queue::default()).collect();
    let mut outbox = Outbox::default();
    c.bench_function(
        "fanout_1000 chat: hub + queue on 1000 members (no I/O)",
        |b| {
            b.iter(|| {
                t += 1000;
                hub.on_text(
                    ConnId(0),
                    room,
                    r#"{"type":"chat","message":"hi all"}"#,
                    Now::fake(t),
                );
                for a in hub.drain_actions() {
                    if let Action::Send(ConnId(i), f) = a {
                        queues[i].push(&mut outbox, Chunk::Shared(f));
                    }
                }
                // Drop the queued chunks as a flush would, without the syscalls.
                for q in &mut queues {
                    q.clear();
                }
                outbox.end_round();
            })
        },
    );
}

fn timer_wheel(c: &mut Criterion) {
    c.bench_function("timer_wheel arm 1000 + cancel 500 + expire", |b| {
        let mut w: Wheel<u32> = Wheel::new();
        let mut ids = Vec::with_capacity(1000);
        let mut out = Vec::with_capacity(1024);
        let mut now = 0u64;
        b.iter(|| {
            for i in 0..1000u32 {
                ids.push(w.arm(Micros(now + 1_000 + u64::from(i) * 37_000), i));
            }
            for id in ids.drain(..).skip(1).step_by(2) {
                w.cancel(id);
            }
            now += 40_000_000;
            w.advance(Micros(now), &mut out);
            let fired = out.len();
            out.clear();
            black_box(fired)
        })
    });
}

criterion_group!(
    benches,
    http_parse_and_route,
    client_frame_decode_and_parse,
    broadcast_encode,
    fanout_1000,
    timer_wheel
);
criterion_main!(benches);
