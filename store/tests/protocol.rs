//! The wire protocol's frame and message decoders on raw bytes: exact layout, partial input,
//! limits, malformed input (never a panic, never an allocation past the limit).

use chunkstore::protocol::{decode_body, decode_frame, encode_body, ErrorReply, Frame, FrameError, FrameKind, ReadPolicy, Request, Response, WriteTag};
use chunkstore::{Bin, Key, Value, WriteOp, WritePolicy};
use rand::{Rng, SeedableRng};

const MAX: usize = 1 << 20;

#[test]
fn frame_bytes_are_exactly_as_documented() {
    let frame = Frame { kind: FrameKind::Response, request_id: 0x0102030405060708, body: b"hi".to_vec() };
    let mut out = Vec::new();
    frame.encode(&mut out);
    let crc = crc32fast::hash(b"hi").to_le_bytes();
    let mut expected = vec![1u8, 2, 2, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1];
    expected.extend_from_slice(&crc);
    expected.extend_from_slice(b"hi");
    assert_eq!(out, expected);
    assert_eq!(decode_frame(&out, MAX), Ok(Some((frame, out.len()))));
}

#[test]
fn pipelined_frames_and_every_prefix() {
    let frames: Vec<Frame> = (0..3).map(|i| Frame { kind: FrameKind::Request, request_id: i, body: vec![i as u8; 100 * i as usize] }).collect();
    let mut buf = Vec::new();
    for frame in &frames {
        frame.encode(&mut buf);
    }
    let first_len = 18;
    for cut in 0..first_len {
        assert_eq!(decode_frame(&buf[..cut], MAX), Ok(None), "prefix of {cut} bytes");
    }
    let mut at = 0;
    for frame in &frames {
        let (decoded, used) = decode_frame(&buf[at..], MAX).unwrap().unwrap();
        assert_eq!(&decoded, frame);
        at += used;
    }
    assert_eq!(at, buf.len());
}

#[test]
fn bad_headers_are_refused_before_the_body_arrives() {
    let mut header = vec![1u8, 1];
    header.extend_from_slice(&(MAX as u32 + 1).to_le_bytes());
    header.extend_from_slice(&[0; 12]);
    assert_eq!(decode_frame(&header, MAX), Err(FrameError::TooLarge { len: MAX + 1, max: MAX }));
    assert_eq!(decode_frame(&[9], MAX), Err(FrameError::Version(9)));
    let mut bad_kind = header.clone();
    bad_kind[1] = 7;
    bad_kind[2..6].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(decode_frame(&bad_kind, MAX), Err(FrameError::Kind(7)));
    let mut flipped = Vec::new();
    Frame { kind: FrameKind::Request, request_id: 1, body: vec![1, 2, 3] }.encode(&mut flipped);
    flipped[19] ^= 1;
    assert_eq!(decode_frame(&flipped, MAX), Err(FrameError::Checksum));
}

#[test]
fn messages_round_trip() {
    let requests = vec![
        Request::ClusterMap,
        Request::Get { namespace: "ns".into(), key: Key::new("s", 7i64), bins: Some(vec!["a".into()]), read: ReadPolicy::Linearizable, min_index: 9 },
        Request::Write {
            namespace: "ns".into(),
            key: Key::new("s", "k"),
            op: WriteOp::Put(vec![Bin::new("b", Value::Bytes(vec![1; 512]))]),
            policy: WritePolicy::default(),
            tag: WriteTag { client_id: 3, born_ms: 5, lane: 2, seq: 4 },
        },
    ];
    for request in requests {
        let body = encode_body(&request, MAX).unwrap();
        assert_eq!(decode_body::<Request>(&body, MAX).unwrap(), request);
    }
    let response = Response::Error(ErrorReply::Timeout { in_doubt: true });
    assert_eq!(decode_body::<Response>(&encode_body(&response, MAX).unwrap(), MAX).unwrap(), response);
    let mut trailing = encode_body(&Request::ClusterMap, MAX).unwrap();
    trailing.push(0);
    assert!(decode_body::<Request>(&trailing, MAX).is_err(), "trailing bytes are refused");
}

#[test]
fn a_body_claiming_a_huge_length_is_refused_without_allocating_it() {
    // A Get whose namespace string claims 2^60 bytes.
    let mut body = 1u32.to_le_bytes().to_vec(); // variant 1: Get
    body.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let err = decode_body::<Request>(&body, MAX).unwrap_err();
    assert!(err.contains("malformed"), "{err}");
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    for _ in 0..20_000 {
        let len = rng.gen_range(0..200);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if !bytes.is_empty() && rng.gen_bool(0.5) {
            bytes[0] = 1;
        }
        let _ = decode_frame(&bytes, MAX);
        let _ = decode_body::<Request>(&bytes, MAX);
        let _ = decode_body::<Response>(&bytes, MAX);
    }
}

/// Byte strings (values, offset writes, Raft messages) are encoded as one block, yet in exactly
/// the layout PROTOCOL.md gives for any vector: a u64 length, then the bytes. A length past the
/// limit is refused before anything is allocated.
#[test]
fn byte_strings_are_a_length_then_the_bytes() {
    let body = encode_body(&Value::Bytes(vec![7, 8, 9]), MAX).unwrap();
    let mut expected = 3u32.to_le_bytes().to_vec(); // variant 3: Bytes
    expected.extend_from_slice(&3u64.to_le_bytes());
    expected.extend_from_slice(&[7, 8, 9]);
    assert_eq!(body, expected);
    assert_eq!(decode_body::<Value>(&body, MAX).unwrap(), Value::Bytes(vec![7, 8, 9]));
    let raft = Request::Raft { namespace: "n".into(), group: 2, message: vec![5; 1000] };
    assert_eq!(decode_body::<Request>(&encode_body(&raft, MAX).unwrap(), MAX).unwrap(), raft);
    let mut huge = 3u32.to_le_bytes().to_vec();
    huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(decode_body::<Value>(&huge, MAX).is_err());
}
